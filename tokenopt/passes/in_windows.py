"""Merging inside attention windows (Swin): ToMe and ToFu on a block whose attention runs per window.

A windowed block's stream keeps every token (the partition, the shift and patch merging need the
whole grid); the reduction lives inside its attention, in every window alike::

    w = partition(shift(norm1(x)))                  # (B*nW, N, C), analysis.windows
    w, size, pos, source = window_merge(w, r, shift)   # the same r in every window, within a shifted region
    y = attention(w, bias=relative_bias[pos, pos] + mask[pos, pos] + log(size))
    y = window_unmerge(source, proj(y))             # (B*nW, N, C) again, before the window reverse
    x = x + unshift(reverse(y))

So ``r`` is per window, at most half of a window's tokens (the sources of the bipartite split), and
r = 0 leaves the graph as it was. A grid the windows do not tile (the model pads it) is refused:
the padding tokens would take part in the matching.
"""
from __future__ import annotations

import operator

from tokenopt.analysis.records import WINDOWED
from tokenopt.errors import RecipeError
from tokenopt.ops import windows as ops


def is_windowed(block) -> bool:
    return block.refused_by == WINDOWED and block.window is not None


def refuse_in_windows(block) -> str | None:
    """None when the windows of ``block`` can be merged in, else why not."""
    w = block.window
    if not w.tiles:
        return (f"its {w.grid[0]}x{w.grid[1]} token grid is not a whole number of {w.size[0]}x{w.size[1]} windows "
                f"(the model pads it to {w.padded[0]}x{w.padded[1]}); merging inside windows would match padding")
    return None


def window_cap(block) -> int:
    """The most tokens one window can give: its bipartite sources (every other token)."""
    return (block.window.area + 1) // 2


def plan_in_windows(block, r: int, pass_name: str) -> str:
    """The layer's description; RecipeError when ``r`` is more than a window can give."""
    w, cap = block.window, window_cap(block)
    if r > cap:
        raise RecipeError(f"{block.path} ({block.index}): r={r} is more than a {w.size[0]}x{w.size[1]} window can give: "
                          f"{pass_name} merges inside each window of {w.area} tokens, at most {cap} of them.\n"
                          f"  Lower r to {cap} or less for this block, or leave it out of the rule's layers.")
    return f"merge r={r} in each of its {w.windows} windows ({w.area} -> {w.area - r} tokens)"


def rewrite_in_windows(g, block, r: int, prop_attn: bool, op: str = "merge") -> None:
    """Bracket ``block``'s windowed attention: reduce ``r`` tokens per window, attend with the bias
    gathered at the kept tokens' positions, restore every token before the window reverse."""
    if r <= 0:
        return          # nothing merged: the graph is the original's, bit for bit
    w = block.window
    made: dict = {}

    def enter(s):
        shift = (w.padded, w.size, w.shift) if any(w.shift) else None
        prev = m = g.insert_after(s, ops.window_merge, s, r, shift, op, label=f"{op} r={r} in each window")
        for i, (key, label) in enumerate((("tokens", "kept window tokens"), ("size", "token sizes"),
                                          ("pos", "in-window position of each kept token"),
                                          ("source", "kept row of every window token"))):
            prev = made[key] = g.insert_after(prev, operator.getitem, m, i, label=label)
        return made["tokens"]

    g.window_bracket(block, enter, lambda s, end: (ops.window_unmerge, (made["source"],),
                                                   "every window token back, before the window reverse"))
    g.attend_in_windows(block, made["pos"], made["size"] if prop_attn else None)
