"""Op-level token merging on a token grid (the placement ToMe for Stable Diffusion uses):
merge the tokens an op reads, run the op on fewer tokens, copy its outputs back to every position.

    match = grid_matching(x, grid, sx, sy, r)       # once per block, from the block's input tokens
    y = unmerge_tokens(match, op(merge_tokens(n, match)))    # around each op: n = norm(x), (B, N, C)

The tokens are split in two sets: *destinations*, one per ``sx x sy`` cell of the ``H x W`` grid
(the cell's first, top-left position; a seeded random one with ``use_rand``), plus the prefix
tokens, and *sources*, the rest. Each source's most similar destination (cosine similarity) is
its match; the ``r`` sources with the most similar matches are reduced into them, the other
sources stay. How a destination takes its sources is the merge rule (``op``):

    merge   the unweighted mean of the group (the destination and the sources it takes): ToMe's
    mlerp   the group's mean direction rescaled to the norm of its largest member (ToFu's MLERP)
    prune   the destination as it is; the sources it takes are dropped (ToFu's prune)

Unmerging gives every source reduced away the output of the destination it went into, whatever
the rule (ToFu copies a merged token's output to its positions as ToMe does).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class GridMatch(NamedTuple):
    """Which token goes where, per image. ``unm``/``src`` (B, S - r) and (B, r): positions among the
    sources; ``dst_of_src`` (B, r): the destination (position among destinations) each merged source
    joins; ``sources``/``destinations``: the original positions of the two sets, (S,) and (D,)."""

    unm: torch.Tensor
    src: torch.Tensor
    dst_of_src: torch.Tensor
    sources: torch.Tensor
    destinations: torch.Tensor


def destination_positions(grid: tuple[int, int], sx: int, sy: int, prefix: int = 0,
                          use_rand: bool = False, seed: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sources, destinations)``: original token positions (prefix tokens first, then the grid in
    row-major order). One destination per ``sy`` rows x ``sx`` columns cell: its top-left position,
    or one drawn per cell from a generator seeded with ``seed`` (the same seed, the same choice).
    Prefix tokens are always destinations (they are never merged away)."""
    h, w = grid
    cells_y, cells_x = h // sy, w // sx
    if use_rand:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(sy * sx, (cells_y, cells_x), generator=gen)
    else:
        pick = torch.zeros(cells_y, cells_x, dtype=torch.long)
    oy, ox = pick // sx, pick % sx
    rows = torch.arange(cells_y)[:, None] * sy + oy
    cols = torch.arange(cells_x)[None, :] * sx + ox
    is_dst = torch.zeros(h, w, dtype=torch.bool)
    is_dst[rows, cols] = True
    flat = is_dst.flatten()
    grid_pos = torch.arange(h * w) + prefix
    dst = torch.cat([torch.arange(prefix), grid_pos[flat]])
    src = grid_pos[~flat]
    return src.to(device), dst.to(device)


def grid_matching(x: torch.Tensor, grid: tuple[int, int], sx: int, sy: int, r: int, prefix: int = 0,
                  use_rand: bool = False, seed: int = 0) -> GridMatch:
    """Match ``r`` sources of ``x`` (B, N, C), N = prefix + H*W, to destinations by cosine similarity."""
    src_pos, dst_pos = destination_positions(grid, sx, sy, prefix, use_rand, seed, x.device)
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[:, src_pos], metric[:, dst_pos]
    scores = a @ b.transpose(-1, -2)                                       # (B, S, D)
    r = min(r, a.shape[1])
    best, best_dst = scores.max(dim=-1)                                     # (B, S)
    order = best.argsort(dim=-1, descending=True)                           # most similar sources first
    src, unm = order[:, :r], order[:, r:]
    return GridMatch(unm, src, best_dst.gather(1, src), src_pos, dst_pos)


MERGE_RULES = ("merge", "mlerp", "prune")


def merge_tokens(x: torch.Tensor, m: GridMatch, op: str = "merge") -> torch.Tensor:
    """(B, N, C) -> (B, N - r, C): the unmerged sources, then the destinations, each reduced with
    the sources it takes by ``op`` (merge | mlerp | prune, see the module docstring)."""
    c = x.shape[-1]
    xs, xd = x[:, m.sources], x[:, m.destinations]
    unm = xs.gather(1, m.unm[..., None].expand(-1, -1, c))
    if op == "prune":
        return torch.cat([unm, xd], dim=1)
    into = m.dst_of_src[..., None]
    taken = xs.gather(1, m.src[..., None].expand(-1, -1, c))
    dst = xd.scatter_reduce(1, into.expand(-1, -1, c), taken, reduce="mean", include_self=True)
    if op == "mlerp":
        # the largest norm in each group: its destination's, raised by any bigger source it takes
        biggest = xd.norm(dim=-1, keepdim=True).scatter_reduce(1, into, taken.norm(dim=-1, keepdim=True),
                                                               reduce="amax", include_self=True)
        dst = dst / dst.norm(dim=-1, keepdim=True) * biggest
    elif op != "merge":
        raise ValueError(f"unknown merge rule {op!r}; expected one of {', '.join(MERGE_RULES)}")
    return torch.cat([unm, dst], dim=1)


def unmerge_tokens(m: GridMatch, y: torch.Tensor) -> torch.Tensor:
    """(B, N - r, C') -> (B, N, C'): every position gets the output of the token that stood for it."""
    bsz, _, c = y.shape
    n_unm = m.unm.shape[1]
    unm, dst = y[:, :n_unm], y[:, n_unm:]
    out = y.new_zeros(bsz, m.sources.numel() + m.destinations.numel(), c)
    out[:, m.destinations] = dst
    pos = m.sources[m.unm]                                                  # (B, S - r) original positions
    out.scatter_(1, pos[..., None].expand(-1, -1, c), unm)
    merged = dst.gather(1, m.dst_of_src[..., None].expand(-1, -1, c))
    out.scatter_(1, m.sources[m.src][..., None].expand(-1, -1, c), merged)
    return out
