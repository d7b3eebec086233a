"""Cut one transformer block out of a traced model as its own GraphModule: x -> block(x).

Used to measure blocks in isolation (ToFu's linearity probe) and, later, to run a block on a
subset of tokens (ToSA). Parameters are shared with the source graph, not copied.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from tokenopt.analysis import BlockRecord, GraphIndex
from tokenopt.analysis.nodes import is_input_batch_size
from tokenopt.errors import AnalysisError


def extract_block(gm: fx.GraphModule, block: BlockRecord, index: GraphIndex | None = None) -> fx.GraphModule:
    """``block`` of ``gm`` as its own GraphModule ``x -> output``. ``index``: a GraphIndex of
    ``gm.graph`` to reuse (e.g. ``ModelAnalysis.index`` while the graph is unchanged)."""
    if index is None or index.graph is not gm.graph or index.stale:
        index = GraphIndex(gm.graph)
    start, end = index.node(block.input), index.node(block.output)
    on_the_way = index.ancestors(end)     # skips dead side branches (e.g. asserts)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: g.placeholder("x")}

    def lookup(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "get_attr":            # parameters and buffers come along by reference
            env[n] = g.node_copy(n, lookup)
            return env[n]
        if is_input_batch_size(n):             # an exported graph reads the batch size off the image once
            env[n] = g.call_method("size", (env[start], 0))
            return env[n]
        raise AnalysisError(f"{block.path}: the block reads {n.name}, computed outside it; "
                            "it cannot be run on its own")

    for n in index.nodes[index.position(start) + 1: index.position(end) + 1]:
        if n.op in ("placeholder", "output"):
            continue
        if n is not end and n not in on_the_way:
            continue
        env[n] = g.node_copy(n, lookup)
    g.output(env[end])
    return fx.GraphModule(gm, g, class_name=f"Block{block.index}")

