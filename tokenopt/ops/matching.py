"""Bipartite soft matching (ToMe, Bolya et al. 2023) and the merges built on it.

Conventions are the reference implementation's, so that published numbers reproduce:

* tokens are split alternately: A = even positions, B = odd positions, prefix tokens included;
* prefix tokens are protected by -inf rows (those in A) and columns (those in B) of the scores;
* the r A tokens with the most similar B partner are reduced into that partner;
* output order: prefix tokens first in their original order, then the unmerged A tokens in their
  original order, then the B tokens.

A *match* is computed once per layer and reused by every reduction (size-weighted average for
ToMe, prune and MLERP for ToFu), so the project has one implementation of the matching.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Match(NamedTuple):
    unm_idx: Tensor   # (B, Na - r)  A positions kept, ascending
    src_idx: Tensor   # (B, r)       A positions reduced into B
    dst_idx: Tensor   # (B, r)       their B partners
    prefix: int       # prefix tokens (protected, kept at the front)


def max_reduction(tokens: int, prefix: int) -> int:
    """The largest r a layer with ``tokens`` tokens can take: half the unprotected tokens."""
    return max((tokens - prefix) // 2, 0)


def bipartite_match(metric: Tensor, r: int, prefix: int) -> Match:
    """Pair each A token with its most similar B token; choose the r best pairs.

    metric: (B, N, d) per-token features (ToMe: keys averaged over heads).
    """
    n = metric.shape[1]
    r = min(r, max_reduction(n, prefix))
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if prefix:
        # prefix tokens at even positions sit in A, odd ones in B
        scores[:, : (prefix + 1) // 2, :] = -torch.inf
        scores[:, :, : prefix // 2] = -torch.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src_idx = edge_idx[:, :r]
    unm_idx = edge_idx[:, r:].sort(dim=-1).values
    dst_idx = node_idx.gather(1, src_idx)
    return Match(unm_idx, src_idx, dst_idx, prefix)


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _order(unm: Tensor, dst: Tensor, prefix: int) -> Tensor:
    """[prefix tokens in original order, unmerged A, B]."""
    pb = prefix // 2
    if pb == 0:
        return torch.cat([unm, dst], dim=1)
    pa = (prefix + 1) // 2
    front = []
    for i in range(pa):  # interleave back: original position 2i is A[i], 2i+1 is B[i]
        front.append(unm[:, i:i + 1])
        if i < pb:
            front.append(dst[:, i:i + 1])
    return torch.cat(front + [unm[:, pa:], dst[:, pb:]], dim=1)


def merge_sum(x: Tensor, m: Match) -> Tensor:
    """Sum each reduced A token into its B partner (x: (B, N, C))."""
    a, b = x[:, ::2], x[:, 1::2]
    unm = _gather_tokens(a, m.unm_idx)
    if m.src_idx.shape[1] == 0:
        return _order(unm, b, m.prefix)
    src = _gather_tokens(a, m.src_idx)
    dst = b.scatter_add(1, m.dst_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), src)
    return _order(unm, dst, m.prefix)


def prune(x: Tensor, m: Match) -> Tensor:
    """Drop the reduced A tokens; their partners are left unchanged (ToFu's prune)."""
    a, b = x[:, ::2], x[:, 1::2]
    return _order(_gather_tokens(a, m.unm_idx), b, m.prefix)


def merged_positions(n: int, m: Match, device) -> Tensor:
    """(B, n): the output position of every input token after a reduction with ``m``."""
    bsz, n_unm = m.unm_idx.shape
    na, nb = (n + 1) // 2, n // 2
    pos_a = torch.empty(bsz, na, dtype=torch.long, device=device)
    pos_a.scatter_(1, m.unm_idx, torch.arange(n_unm, device=device).expand(bsz, -1))
    # reduced A tokens land where their partner lands
    pos_a.scatter_(1, m.src_idx, n_unm + m.dst_idx)
    pos_b = (n_unm + torch.arange(nb, device=device)).expand(bsz, -1)
    pos = torch.empty(bsz, n, dtype=torch.long, device=device)
    pos[:, ::2] = pos_a
    pos[:, 1::2] = pos_b
    if m.prefix // 2:
        pos = _reorder_positions(pos, n_unm, nb, m.prefix)
    return pos


def _reorder_positions(pos: Tensor, n_unm: int, nb: int, prefix: int) -> Tensor:
    """Apply the prefix interleave of :func:`_order` to positions in the plain [unm, B] layout."""
    pa, pb = (prefix + 1) // 2, prefix // 2
    lut = torch.empty(n_unm + nb, dtype=torch.long, device=pos.device)
    out = 0
    for i in range(pa):
        lut[i] = out
        out += 1
        if i < pb:
            lut[n_unm + i] = out
            out += 1
    lut[pa:n_unm] = torch.arange(out, out + n_unm - pa, device=pos.device)
    out += n_unm - pa
    lut[n_unm + pb:] = torch.arange(out, out + nb - pb, device=pos.device)
    return lut[pos]
