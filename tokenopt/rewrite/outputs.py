"""After the blocks: what reads the token stream must see what it expects once tokens merged.

Average pooling becomes size-weighted; consumers that need every token (dense heads, attention
pooling, CaiT's class-attention blocks) get the merged tokens put back on the original grid; and
``outputs="tokens"`` makes the graph return every patch token in its original position.
"""
from __future__ import annotations

import operator

import torch

from tokenopt.analysis import ModelAnalysis
from tokenopt.errors import PlanError
from tokenopt.ops import gates as gate_ops
from tokenopt.ops import tome as tome_ops
from tokenopt.rewrite.rewriter import GraphRewriter
from tokenopt.tokens import Packed


def restore_pooling(g: GraphRewriter, analysis: ModelAnalysis) -> None:
    """After merges: dense consumers get tokens put back; average pooling becomes size-weighted.
    After a packed stream (SPA prune): pooling reads each image's kept tokens."""
    if isinstance(g.state.layout, Packed):
        pool_packed(g, analysis, g.state.layout)
        return
    if g.state.index is not None and any(p.kind == "tokens" for p in analysis.pooling):
        # unmerged tokens repeat each merged token once per patch it stands for, so every
        # consumer (average pooling included) sees exactly what a size-weighted version would.
        # after the last block that carries the token stream (CaiT's class-attention blocks that
        # follow it read the restored grid, where duplicates weigh each token by its size)
        carrier = [b for b in analysis.blocks if b.refusal is None] or analysis.blocks
        unmerge_at(g, analysis, g.node(carrier[-1].output))
        return
    for p in analysis.pooling:
        if p.kind == "avg" and p.node is not None:
            n = g.node(p.node)
            if n.target not in ("mean", torch.mean):
                continue  # a sum over tokens already weights each token once per token
            w = g.insert_after(n, tome_ops.size_weighted_mean, n.args[0], g.state.size, p.start,
                               label="size-weighted average pooling")
            g.replace_uses(n, w)


def unmerge_at(g: GraphRewriter, analysis: ModelAnalysis, end) -> None:
    """Close the stream-level reduction at ``end``: from the first block's input to ``end`` the
    stream ran on merged tokens; ``end`` now puts each merged token back on every position it stands
    for, and after it the token state is the first block's again (every token, sizes all one)."""
    index = g.state.index
    g.bracket(g.node(analysis.blocks[0].input), end,
              exit=lambda start, end: (tome_ops.unmerge_into, (index,), "unmerge to the original grid"))


def pool_packed(g: GraphRewriter, analysis: ModelAnalysis, layout: Packed) -> None:
    """The stream ends packed, (1, T, C) (or padded (B, cap, C)): class-token pooling takes each
    image's prefix token, average pooling averages each image's kept tokens. The pass refused
    other kinds of pooling before rewriting."""
    lengths = g.node(layout.lengths)
    for p in analysis.pooling:
        n = g.node(p.node)
        if p.kind == "cls":
            src, i = n.args[0], n.args[1][1]
            new = g.insert_after(n, gate_ops.stream_token, src, lengths, i, layout.layout,
                                 label=f"token {i} of each image (packed stream)")
        elif p.kind == "avg":
            src = n.args[0]
            if src.op == "call_function" and src.target is operator.getitem:   # x[:, start:]
                src = src.args[0]
            new = g.insert_after(n, gate_ops.stream_mean, src, lengths, p.start, layout.layout,
                                 label="average of each image's kept tokens")
        else:
            raise PlanError(f"pooling of kind {p.kind!r} cannot read a packed token stream")
        g.replace_uses(n, new)


def return_tokens(g: GraphRewriter, analysis: ModelAnalysis) -> None:
    """Make the graph return every patch token (prefix tokens dropped) in original order."""
    out = g.node(analysis.features)
    if g.state.index is not None and g.state.reduced:
        unmerge_at(g, analysis, out)
    tokens = g.insert_after(out, operator.getitem, out, (slice(None), slice(analysis.prefix_tokens, None)),
                            label="patch tokens")
    g.set_output(tokens)
