"""Op-level token merging on a token grid (the placement ToMe for Stable Diffusion uses):
merge the tokens an op reads, run the op on fewer tokens, copy its outputs back to every position.

    match = grid_matching(x, grid, sx, sy, r)       # once per block, from the block's input tokens
    y = unmerge_tokens(match, op(merge_tokens(n, match)))    # around each op: n = norm(x), (B, N, C)

The tokens are split in two sets: *destinations*, one per ``sx x sy`` cell of the ``H x W`` grid
(the cell's first, top-left position; a seeded pseudo-random one with ``use_rand``), plus the prefix
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


def _cell_picks(cells: int, size: int, seed: int) -> list[int]:
    """A seeded pick in [0, size) per cell: splitmix64 of (seed, cell), plain integers, so the
    positions are constants to torch.export and torch.compile (a tensor draw would be traced)."""
    picks = []
    for c in range(cells):
        z = (seed * 0x9E3779B97F4A7C15 + (c + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        picks.append((z ^ (z >> 31)) % size)
    return picks


def destination_positions(grid: tuple[int, int], sx: int, sy: int, prefix: int = 0,
                          use_rand: bool = False, seed: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sources, destinations)``: original token positions (prefix tokens first, then the grid in
    row-major order). One destination per ``sy`` rows x ``sx`` columns cell: its top-left position,
    or one picked per cell from ``seed`` (the same seed, the same choice). Prefix tokens are always
    destinations (they are never merged away). Computed in Python from the static grid, so the
    sizes are known when a graph is exported or compiled (no boolean mask of data-dependent length)."""
    h, w = grid
    cells_y, cells_x = h // sy, w // sx
    picks = _cell_picks(cells_y * cells_x, sy * sx, seed) if use_rand else [0] * (cells_y * cells_x)
    is_dst = [False] * (h * w)
    for cell, pick in enumerate(picks):
        y, x = divmod(cell, cells_x)
        oy, ox = divmod(pick, sx)
        is_dst[(y * sy + oy) * w + x * sx + ox] = True
    dst = list(range(prefix)) + [prefix + p for p in range(h * w) if is_dst[p]]
    src = [prefix + p for p in range(h * w) if not is_dst[p]]
    return (torch.tensor(src, dtype=torch.long, device=device),
            torch.tensor(dst, dtype=torch.long, device=device))


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
    # the group mean as sum / count: ONNX has no scatter "mean" (the exporter's stand-in gives other values)
    total = xd.scatter_add(1, into.expand(-1, -1, c), taken)
    count = torch.ones_like(xd[..., :1]).scatter_add(1, into, torch.ones_like(taken[..., :1]))
    dst = total / count
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
