"""Cut one transformer block out of a traced model as its own GraphModule: x -> block(x).

Used to measure blocks in isolation (ToFu's linearity probe) and, later, to run a block on a
subset of tokens (ToSA). Parameters are shared with the source graph, not copied.
"""
from __future__ import annotations

import torch.fx as fx

from tokenopt.analysis import BlockRecord
from tokenopt.errors import AnalysisError


def extract_block(gm: fx.GraphModule, block: BlockRecord) -> fx.GraphModule:
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    start, end = by_name[block.input], by_name[block.output]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: g.placeholder("x")}

    def lookup(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "get_attr":            # parameters and buffers come along by reference
            env[n] = g.node_copy(n, lookup)
            return env[n]
        raise AnalysisError(f"{block.path}: the block reads {n.name}, computed outside it; "
                            "it cannot be run on its own")

    for n in nodes[order[start] + 1: order[end] + 1]:
        if n.op in ("placeholder", "output"):
            continue
        if end not in _users_closure(n, end, order) and n is not end:
            continue                      # not on the way to the block output (e.g. asserts)
        env[n] = g.node_copy(n, lookup)
    g.output(env[end])
    return fx.GraphModule(gm, g, class_name=f"Block{block.index}")


def _users_closure(n: fx.Node, end: fx.Node, order) -> set:
    """Nodes reachable from n (bounded by ``end``'s position), to skip dead side branches."""
    seen, stack = set(), [n]
    while stack:
        m = stack.pop()
        for u in m.users:
            if u not in seen and order.get(u, 1 << 30) <= order[end]:
                seen.add(u)
                stack.append(u)
    return seen
