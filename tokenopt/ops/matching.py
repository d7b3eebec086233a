"""Bipartite soft matching (ToMe, Bolya et al. 2023) and the reductions built on it.

Conventions are the reference implementation's, so that published numbers reproduce:

* tokens are split alternately: A = even positions, B = odd positions, prefix tokens included;
* prefix tokens never take part: the reference masks their rows (in A) and columns (in B) with
  -inf; here they are sliced out of the score matrix, which selects the same pairs for less work;
* the r A tokens with the most similar B partner are reduced into that partner;
* output order: prefix tokens first in their original order, then the unmerged A tokens in their
  original order, then the B tokens. ``order="rank"`` leaves the unmerged A tokens in rank order
  (most similar first), as the reference does for models without a class token; with no prefix
  token to anchor it, the next layer's alternate A/B split, and so every later result, depends on it.

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
    # the same as row numbers of the flattened (B*N, C) input / (B*(N-r), C) output, so every
    # reduction is index_select / index_add on rows, computed once per layer
    keep_rows: Tensor
    src_rows: Tensor
    dst_rows: Tensor


def max_reduction(tokens: int, prefix: int) -> int:
    """The largest r a layer with ``tokens`` tokens can take: half the unprotected tokens."""
    return max((tokens - prefix) // 2, 0)


def head_mean(metric: Tensor) -> Tensor:
    """(B, N, H, d) per-head features -> their mean over heads (B, N, d); (B, N, d) unchanged."""
    return metric.mean(2) if metric.dim() == 4 else metric


ORDERS = ("original", "rank")


def bipartite_match(metric: Tensor, r: int, prefix: int, order: str = "original",
                    labels: Tensor | None = None) -> Match:
    """Pair each A token with its most similar B token; choose the r best pairs.

    metric: (B, N, d) per-token features, or (B, N, H, d) whose mean over heads is the feature
    (ToMe: the keys). order: where the unmerged A tokens go, "original" or "rank" (module docstring).
    labels: (B, N) or None; two tokens with different labels never pair (a shifted Swin window holds
    tokens from regions that must not attend to each other).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    metric = head_mean(metric)
    bsz, n, _ = metric.shape
    r = min(r, max_reduction(n, prefix))
    pa, pb = (prefix + 1) // 2, prefix // 2          # prefix tokens in A (even) and B (odd)
    na, nb = (n + 1) // 2, n // 2
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, 2 * pa::2], metric[:, 2 * pb + 1::2]
    scores = a @ b.transpose(-1, -2)
    if labels is not None:
        apart = labels[:, 2 * pa::2, None] != labels[:, None, 2 * pb + 1::2]
        scores = scores.masked_fill(apart, -torch.inf)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src_a = edge_idx[:, :r]                            # in non-prefix A coordinates
    unm_a = edge_idx[:, r:] if order == "rank" else edge_idx[:, r:].sort(dim=-1).values
    dev = metric.device
    n_unm = na - pa - r
    keep = torch.cat([
        torch.arange(prefix, device=dev).expand(bsz, -1),
        2 * (pa + unm_a),
        (2 * torch.arange(pb, nb, device=dev) + 1).expand(bsz, -1),
    ], dim=1)
    dst = prefix + n_unm + node_idx.gather(1, src_a)
    src = 2 * (pa + src_a)
    batch = torch.arange(bsz, device=dev).unsqueeze(1)
    k = keep.shape[1]
    return Match(keep, src, dst, (keep + batch * n).reshape(-1), (src + batch * n).reshape(-1),
                 (dst + batch * k).reshape(-1))


def take(x: Tensor, rows: Tensor) -> Tensor:
    """Rows of tokens x (B, N, C) by flat row numbers (a Match's *_rows) -> (B, k, C)."""
    bsz, _, c = x.shape
    return x.reshape(-1, c).index_select(0, rows).view(bsz, -1, c)


def _scatter_rows(out: Tensor, rows: Tensor, values: Tensor, accumulate: bool) -> Tensor:
    c = out.shape[-1]
    out.view(-1, c).index_put_((rows,), values.reshape(-1, c), accumulate=accumulate)
    return out


def merge_sum(x: Tensor, m: Match) -> Tensor:
    """Sum each reduced A token into its B partner (x: (B, N, C))."""
    out = take(x, m.keep_rows)
    return _scatter_rows(out, m.dst_rows, take(x, m.src_rows), accumulate=True)


def merge_weighted(x: Tensor, size: Tensor | None, m: Match) -> tuple[Tensor, Tensor]:
    """ToMe's size-weighted average: each group becomes sum(size_i x_i) / sum(size_i).

    Only the r destination rows change, so the update is written on those rows alone:
    x_d += sum_j s_j (x_j - x_d) / S_d  with S_d the group's new size. The full token tensor is
    copied once; everything else is (B, r)-sized, which matters at batch 1 where every op on
    the whole tensor costs a thread-pool round trip.
    """
    bsz, n, _ = x.shape
    if size is None:
        size = x.new_ones(bsz, n, 1)
    out = take(x, m.keep_rows)
    s_src = take(size, m.src_rows)
    new_size = _scatter_rows(take(size, m.keep_rows), m.dst_rows, s_src, accumulate=True)
    x_src = take(x, m.src_rows)
    x_dst = take(out, m.dst_rows)
    s_new = take(new_size, m.dst_rows)
    return _scatter_rows(out, m.dst_rows, (x_src - x_dst) * (s_src / s_new), accumulate=True), new_size


def merge_mlerp(x: Tensor, m: Match) -> Tensor:
    """MLERP (ToFu): each group's mean direction, rescaled to the norm of its largest member.

    A group is a B token and the A tokens reduced into it, counted once each (unweighted), so
    merged tokens keep the norms later layers expect instead of shrinking like an average.
    Computed on the destination rows only (see :func:`merge_weighted`).
    """
    bsz, n, _ = x.shape
    out = merge_sum(x, m)                                            # group sums in dst rows
    ones = x.new_ones(bsz, n, 1)
    count = _scatter_rows(take(ones, m.keep_rows), m.dst_rows, take(ones, m.src_rows), accumulate=True)
    norms = x.norm(dim=-1, keepdim=True)
    biggest = take(norms, m.keep_rows)
    biggest.view(-1).scatter_reduce_(0, m.dst_rows, take(norms, m.src_rows).reshape(-1), "amax")
    mean = take(out, m.dst_rows) / take(count, m.dst_rows)
    fused = mean / mean.norm(dim=-1, keepdim=True) * take(biggest, m.dst_rows)
    return _scatter_rows(out, m.dst_rows, fused, accumulate=False)  # duplicates write equal rows


def prune(x: Tensor, m: Match) -> Tensor:
    """Drop the reduced A tokens; their partners are left unchanged (ToFu's prune)."""
    return take(x, m.keep_rows)


def merged_positions(n: int, m: Match) -> Tensor:
    """(B, n): the output position of every input token after a reduction with ``m``."""
    bsz, k = m.keep.shape
    pos = torch.empty(bsz, n, dtype=torch.long, device=m.keep.device)
    pos.scatter_(1, m.keep, torch.arange(k, device=m.keep.device).expand(bsz, -1))
    pos.scatter_(1, m.src, m.dst)
    return pos
