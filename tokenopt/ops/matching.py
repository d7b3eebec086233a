"""Bipartite soft matching (ToMe, Bolya et al. 2023) and the reductions built on it.

Conventions are the reference implementation's, so that published numbers reproduce:

* tokens are split alternately: A = even positions, B = odd positions, prefix tokens included;
* prefix tokens never take part: the reference masks their rows (in A) and columns (in B) with
  -inf; here they are sliced out of the score matrix, which selects the same pairs for less work;
* the r A tokens with the most similar B partner are reduced into that partner;
* output order: prefix tokens first in their original order, then the unmerged A tokens in their
  original order, then the B tokens.

A :class:`Match` is computed once per layer and reused by every reduction (size-weighted sum for
ToMe, prune and MLERP for ToFu), so the project has one implementation of the matching. It is
expressed as token positions in the *input*, so each reduction is two row gathers and one
scatter-add on the flattened (B*N, C) tokens; no strided copies, no final concatenation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Match(NamedTuple):
    keep: Tensor      # (B, N - r) input positions of the output tokens, in output order
    src: Tensor       # (B, r)     input positions of the reduced A tokens
    dst: Tensor       # (B, r)     output positions of their B partners


def max_reduction(tokens: int, prefix: int) -> int:
    """The largest r a layer with ``tokens`` tokens can take: half the unprotected tokens."""
    return max((tokens - prefix) // 2, 0)


def bipartite_match(metric: Tensor, r: int, prefix: int) -> Match:
    """Pair each A token with its most similar B token; choose the r best pairs.

    metric: (B, N, d) per-token features (ToMe: keys averaged over heads).
    """
    bsz, n, _ = metric.shape
    r = min(r, max_reduction(n, prefix))
    pa, pb = (prefix + 1) // 2, prefix // 2          # prefix tokens in A (even) and B (odd)
    na, nb = (n + 1) // 2, n // 2
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, 2 * pa::2], metric[:, 2 * pb + 1::2]
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src_a = edge_idx[:, :r]                            # in non-prefix A coordinates
    unm_a = edge_idx[:, r:].sort(dim=-1).values
    dev = metric.device
    n_unm = na - pa - r
    keep = torch.cat([
        torch.arange(prefix, device=dev).expand(bsz, -1),
        2 * (pa + unm_a),
        (2 * torch.arange(pb, nb, device=dev) + 1).expand(bsz, -1),
    ], dim=1)
    dst = prefix + n_unm + node_idx.gather(1, src_a)
    return Match(keep, 2 * (pa + src_a), dst)


def take(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` (B, k) of tokens x (B, N, C) -> (B, k, C), as one index_select."""
    bsz, n, c = x.shape
    flat = (idx + torch.arange(bsz, device=x.device).unsqueeze(1) * n).reshape(-1)
    return x.reshape(bsz * n, c).index_select(0, flat).reshape(bsz, idx.shape[1], c)


def add_rows(out: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """out[b, idx[b, j]] += rows[b, j], in place on ``out`` (a fresh tensor), returned."""
    bsz, n, c = out.shape
    flat = (idx + torch.arange(bsz, device=out.device).unsqueeze(1) * n).reshape(-1)
    out.view(bsz * n, c).index_add_(0, flat, rows.reshape(-1, c))
    return out


def merge_sum(x: Tensor, m: Match) -> Tensor:
    """Sum each reduced A token into its B partner (x: (B, N, C))."""
    out = take(x, m.keep)
    if m.src.shape[1] == 0:
        return out
    return add_rows(out, m.dst, take(x, m.src))


def merge_mlerp(x: Tensor, m: Match) -> Tensor:
    """MLERP (ToFu): each group's mean direction, rescaled to the norm of its largest member.

    A group is a B token and the A tokens reduced into it, counted once each (unweighted), so
    merged tokens keep the norms later layers expect instead of shrinking like an average.
    """
    out = merge_sum(x, m)
    if m.src.shape[1] == 0:
        return out
    count = merge_sum(x.new_ones(x.shape[0], x.shape[1], 1), m)
    norms = x.norm(dim=-1, keepdim=True)
    biggest = take(norms, m.keep)
    bsz, k, _ = biggest.shape
    flat = (m.dst + torch.arange(bsz, device=x.device).unsqueeze(1) * k).reshape(-1)
    biggest.view(-1).scatter_reduce_(0, flat, take(norms, m.src).reshape(-1), "amax")
    mean = out / count
    return mean / mean.norm(dim=-1, keepdim=True) * biggest


def prune(x: Tensor, m: Match) -> Tensor:
    """Drop the reduced A tokens; their partners are left unchanged (ToFu's prune)."""
    return take(x, m.keep)


def merged_positions(n: int, m: Match) -> Tensor:
    """(B, n): the output position of every input token after a reduction with ``m``."""
    bsz, k = m.keep.shape
    pos = torch.empty(bsz, n, dtype=torch.long, device=m.keep.device)
    pos.scatter_(1, m.keep, torch.arange(k, device=m.keep.device).expand(bsz, -1))
    pos.scatter_(1, m.src, m.dst)
    return pos
