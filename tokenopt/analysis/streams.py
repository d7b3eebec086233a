"""Streams: which blocks share one token stream, and the steps between streams.

    ViT            embed ─ [0] ─ [1] ─ ... ─ [11] ─ head                     one stream
    hierarchical   embed ─ [0] ─ [1] ─ merge ─ [2] ─ [3] ─ pool ─ head       streams (0, 1), (2, 3)
                   (B, 64, 32)        │      (B, 16, 64)                     Downsample(0, 1, kind="merge")
    UNet           conv map ─ (B, HW, C) ─ [0] ─ back to a map ─ conv ─ ... one stream per resolution

Two consecutive blocks are on one stream when the tokens the second one reads (its input) are
computed from the first one's output and have the same count and width: norms, dropout, a
getitem or a reshape there and back in between keep the stream, and so do learned tokens joining it
(``cat([cls, x], 1)`` before XCiT's class-attention blocks). A grid op that gives the same
grid back (a conditional positional encoding's conv) keeps it too: it has no second grid, and a
reduction before it is caught when the rewritten model is run. A change of count or width (patch
merging, pooling, a strided conv, an upsampling) starts a new stream, and the step is recorded as
a :class:`Downsample`.

A block whose input is not computed from the previous block (CaiT's class-attention blocks carry
the class token alone, and read the patch tokens through their keys) stays on the stream its
attention reads; one that reads neither starts a stream with no Downsample before it.
"""
from __future__ import annotations

import math
from collections import deque

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from tokenopt.analysis.index import GraphIndex
from tokenopt.analysis.nodes import aten_overloads, cat_parts, is_module, is_token_cat, shape_of
from tokenopt.analysis.records import BlockRecord, Downsample, Stream

CONV_FN = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d} | aten_overloads("convolution", "conv2d")
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
_GRID_SEARCH = 64          # nodes looked at around a stream for the map it came from or goes to


def find_streams(blocks: list[BlockRecord], gm: fx.GraphModule, index: GraphIndex,
                 prefix: int) -> tuple[list[Stream], list[Downsample], list[int]]:
    """(streams, the Downsample steps between them, the stream of each block). ``prefix``: the prefix
    tokens of the first stream (those of later streams are read from the shapes)."""
    groups: list[list[BlockRecord]] = [[blocks[0]]]
    downsamples: list[Downsample] = []
    for a, b in zip(blocks, blocks[1:]):
        step = _step(a, b, gm, index)
        if step is None:
            groups[-1].append(b)
            continue
        if step:
            downsamples.append(Downsample(len(groups) - 1, len(groups), *step))
        groups.append([b])
    streams = []
    for i, group in enumerate(groups):
        before = index.node(groups[i - 1][-1].output) if i else None
        after = index.node(groups[i + 1][0].input) if i + 1 < len(groups) else None
        # later streams: the first stream's prefix tokens carried on (PiT keeps its class token), else none
        candidates = (prefix,) if i == 0 else tuple(dict.fromkeys((prefix, 0)))
        streams.append(_stream(i, group, index, candidates, before, after))
    of_block = [i for i, group in enumerate(groups) for _ in group]
    return streams, downsamples, of_block


def tokens_and_dim(shape) -> tuple[int, int] | None:
    """(tokens, channels) of a (B, N, C) or (B, H, W, C) stream."""
    if shape is None or len(shape) < 3:
        return None
    return math.prod(shape[1:-1]), shape[-1]


def _step(a: BlockRecord, b: BlockRecord, gm: fx.GraphModule, index: GraphIndex) -> tuple[str, str] | None | bool:
    """None: ``b`` is on ``a``'s stream. (node, kind): a new stream made from ``a``'s. False: a new
    stream not made from ``a``'s. Size queries do not count: ``cls.expand(x.shape[0], ...)`` is not
    computed from ``x``."""
    out, inp = index.node(a.output), index.node(b.input)
    if inp is not out and out not in index.data_ancestors(inp):
        return None if out in index.data_ancestors(b.attention.node) else False
    before, now = tokens_and_dim(shape_of(out)), tokens_and_dim(shape_of(inp))
    if before == now:
        return None
    path = {n for n in index.between(out, inp) if out in index.data_ancestors(n)} | {inp}
    if _joins_learned_tokens(out, path, before, index):
        return None
    if before is None or now is None:
        return _maker(inp, path, index).name, "other"
    if now[0] > before[0]:
        return _maker(inp, path, index).name, "upsample"
    convs = sorted((n for n in path if _is_conv(n, gm)), key=index.position)
    if convs:
        return convs[-1].name, "conv"
    if now[0] < before[0] and now[1] > before[1]:
        return _maker(inp, path, index).name, "merge"
    return _maker(inp, path, index).name, "other"


def _joins_learned_tokens(out: fx.Node, path: set, before: tuple[int, int] | None, index: GraphIndex) -> bool:
    """True when the stream only gains tokens not computed from it, whole and unchanged: a class
    token joining before class-attention blocks (XCiT), ``cat([cls, x], 1)``."""
    for c in path:
        if not is_token_cat(c):
            continue
        parts = [p for p in cat_parts(c) if isinstance(p, fx.Node)]
        ours = [p for p in parts if p is out or out in index.data_ancestors(p)]
        if len(ours) == 1 and tokens_and_dim(shape_of(ours[0])) == before:
            return True
    return False


def _is_conv(n: fx.Node, gm: fx.GraphModule) -> bool:
    return (n.op == "call_function" and n.target in CONV_FN) or is_module(n, gm, _CONV_MODULES)


def _maker(inp: fx.Node, path: frozenset, index: GraphIndex) -> fx.Node:
    """The first node, walking back from ``inp``, that has the new stream's tokens and width: the
    one that made them (the projection after a patch merging, ...)."""
    want, n = tokens_and_dim(shape_of(inp)), inp
    while True:
        prev = next((a for a in n.all_input_nodes if a in path and tokens_and_dim(shape_of(a)) == want), None)
        if prev is None:
            return n
        n = prev


def _stream(i: int, group: list[BlockRecord], index: GraphIndex, candidates: tuple[int, ...],
            before: fx.Node | None, after: fx.Node | None) -> Stream:
    """The stream of ``group``; its prefix tokens are the first of ``candidates`` that its grid fits."""
    first, last = group[0], group[-1]
    shape = shape_of(index.node(first.input))
    layout = "bhwc" if shape is not None and len(shape) == 4 else "bnc"
    blocks = tuple(b.index for b in group)
    if layout == "bhwc":
        return Stream(i, blocks, (shape[1], shape[2]), layout, 0, first.tokens, first.dim)
    for p in candidates:
        grid = _map_grid(index.node(first.input), index.node(last.output), first.tokens - p, index, before, after)
        if grid is not None:
            return Stream(i, blocks, grid, layout, p, first.tokens, first.dim)
    for p in candidates:
        side = math.isqrt(max(first.tokens - p, 0))
        if side and side * side == first.tokens - p:
            return Stream(i, blocks, (side, side), layout, p, first.tokens, first.dim)
    return Stream(i, blocks, None, layout, candidates[-1], first.tokens, first.dim)


def _map_grid(inp: fx.Node, out: fx.Node, patches: int, index: GraphIndex, before: fx.Node | None,
              after: fx.Node | None) -> tuple[int, int] | None:
    """(H, W) of a 4-D tensor with ``patches`` = H * W positions that the stream came from (walking
    back from its first input, not into the stream before) or goes to (forward from its last
    output, not into the stream after)."""
    if patches <= 0:
        return None
    back_stop = (index.ancestors(before) | {before}) if before is not None else frozenset()
    fwd_stop = (index.descendants(after) | {after}) if after is not None else frozenset()
    for start, step, stop in ((inp, lambda n: n.all_input_nodes, back_stop), (out, lambda n: n.users, fwd_stop)):
        todo, seen = deque([start]), {start}
        while todo and len(seen) < _GRID_SEARCH:
            n = todo.popleft()
            s = shape_of(n)
            if s is not None and len(s) == 4:
                if s[2] * s[3] == patches:           # (B, C, H, W)
                    return s[2], s[3]
                if s[1] * s[2] == patches:           # (B, H, W, C)
                    return s[1], s[2]
            for m in step(n):
                if m not in seen and m not in stop and shape_of(m) is not None:
                    seen.add(m)
                    todo.append(m)
    return None
