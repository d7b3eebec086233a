"""Token streams given back to a feature map: the model's output keeps every token's place.

A diffusion UNet's spatial transformer turns a conv map (B, C, H, W) into tokens (B, HW, C), runs
its blocks and turns the tokens back into a map that is added to the map it came from; a
stream-level reduction (fewer tokens from a block on) would leave holes in that map, so it is
refused there, while an op-level one (merge, run the op, unmerge) keeps every token and is fine::

    blocks ... -> reshape (B, H, W, C) -> permute (B, C, H, W) -> conv -> + residual map (B, C, H, W)

A hierarchical ViT's map that goes into a patch merging (a new, smaller stream) is not one of
these: the planner's own check covers reductions before a downsample.
"""
from __future__ import annotations

import torch.fx as fx

from tokenopt.analysis.nodes import is_add, shape_of
from tokenopt.analysis.records import Stream

_HOPS = 5          # proj_out (a Linear or 1x1 conv), the reshape and permute back, the add: a few nodes


def map_exit(stream: Stream, last_output: fx.Node) -> fx.Node | None:
    """The node within a few steps after the stream's last block that holds its tokens as a
    (B, H, W, C) or (B, C, H, W) map of the stream's grid, or None."""
    if stream.grid is None or stream.prefix_tokens:
        return None
    return _ahead(last_output, lambda u, shape: len(shape) == 4 and stream.grid in (tuple(shape[1:3]), tuple(shape[2:4])))


def residual_map_add(back: fx.Node) -> fx.Node | None:
    """An add, a few steps after the map ``back``, of a map of the same size (B, C, H, W): a
    residual around the transformer, so the map keeps its resolution."""
    size = shape_of(back)
    return _ahead(back, lambda u, shape: is_add(u) and sorted(shape) == sorted(size))


def _ahead(start: fx.Node, found) -> fx.Node | None:
    """The first node within a few steps after ``start`` (breadth first) for which ``found(node, shape)``."""
    seen, frontier = {start}, [start]
    for _ in range(_HOPS):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                shape = shape_of(u)
                if shape is not None and found(u, shape):
                    return u
                nxt.append(u)
        frontier = nxt
    return None


def keeps_every_token(stream: Stream, last_output: fx.Node) -> str | None:
    """Why no token of ``stream`` may be lost (its tokens become a feature map again), or None."""
    back = map_exit(stream, last_output)
    if back is None or residual_map_add(back) is None:
        return None
    h, w = stream.grid
    return (f"its tokens go back to a {h}x{w} feature map at {back.name}, so every token must come back "
            "(a reduction that drops tokens leaves holes in the map); use placement: op")
