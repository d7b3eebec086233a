"""Token streams given back to a feature map: the model's output keeps every token's place.

A diffusion UNet's spatial transformer turns a conv map (B, C, H, W) into tokens (B, HW, C), runs
its blocks and turns the tokens back into a map for the convs that follow; a stream-level reduction
(fewer tokens from a block on) would leave holes in that map, so it is refused there, while an
op-level one (merge, run the op, unmerge) keeps every token and is fine::

    blocks ... -> reshape (B, H, W, C) -> permute (B, C, H, W) -> conv
"""
from __future__ import annotations

import torch.fx as fx

from tokenopt.analysis.nodes import shape_of
from tokenopt.analysis.records import Stream

_HOPS = 4          # proj_out (a Linear), then the reshape and permute back: a few nodes at most


def map_exit(stream: Stream, last_output: fx.Node) -> fx.Node | None:
    """The node within a few steps after the stream's last block that holds its tokens as a
    (B, H, W, C) or (B, C, H, W) map of the stream's grid, or None."""
    if stream.grid is None or stream.prefix_tokens:
        return None
    h, w = stream.grid
    seen, frontier = {last_output}, [last_output]
    for _ in range(_HOPS):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                shape = shape_of(u)
                if shape is not None and len(shape) == 4 and (tuple(shape[1:3]) == (h, w) or tuple(shape[2:4]) == (h, w)):
                    return u
                nxt.append(u)
        frontier = nxt
    return None


def keeps_every_token(stream: Stream, last_output: fx.Node) -> str | None:
    """Why no token of ``stream`` may be lost (its tokens become a feature map again), or None."""
    back = map_exit(stream, last_output)
    if back is None:
        return None
    h, w = stream.grid
    return (f"its tokens go back to a {h}x{w} feature map at {back.name}, so every token must come back "
            "(a reduction that drops tokens leaves holes in the map); use placement: op")
