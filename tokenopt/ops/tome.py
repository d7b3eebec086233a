"""The ToMe reduction step: match on the keys, merge by size-weighted average, track sizes.

Token state threaded through the rewritten graph:

* ``size``  (B, N, 1): how many input patches each token stands for (None until the first merge);
* ``index`` (B, N0): for every original token, its position now (None unless tracked), so that
  `unmerge` can put merged tokens back on the original grid for dense outputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokenopt.ops import native
from tokenopt.ops.matching import bipartite_match, max_reduction, merge_mlerp, merge_sum, merge_weighted, merged_positions, prune


def keys_per_token(k: Tensor, tokens: Tensor) -> Tensor:
    """ToMe's metric, the keys averaged over heads, handed on as the heads: (B, N, H, d).

    k is (B, H, N, d) or (B*H, N, d); ``tokens`` (B, N, C) gives the batch size of a flattened k.
    The result is a view (no copy); the matching takes the mean over H (matching.head_mean), and
    the native step sums the heads while it normalises, so eager inference runs no separate
    reduction for the metric.
    """
    if k.dim() == 3:
        k = k.reshape(tokens.shape[0], -1, k.shape[-2], k.shape[-1])
    return k.transpose(1, 2)


def key_log_size(size: Tensor) -> Tensor:
    """Proportional attention's bias per key: log of the patches each token stands for, (B, N, 1) -> (B, N)."""
    return size.log().squeeze(-1)


def tome_merge(x: Tensor, metric: Tensor, size: Tensor | None, index: Tensor | None, r: int, prefix: int,
               order: str = "original"):
    """Merge r tokens of x (B, N, C) into their most similar partners; returns (x, size, index).

    Eager CPU inference takes the native step (one C call, same result; see ops/native); the
    PyTorch operators below define the method and serve autograd, torch.compile and GPUs.
    ``order="rank"`` (unmerged tokens in rank order, see ops/matching) exists only in PyTorch.
    """
    n = x.shape[1]
    done = _native_step(x, metric, size, index, r, prefix, "merge", order)
    if done is not None:
        return done
    m = bipartite_match(metric, r, prefix, order)
    x, size = merge_weighted(x, size, m)
    if index is not None:
        index = merged_positions(n, m).gather(1, index)
    return x, size, index


def _native_step(x: Tensor, metric: Tensor, size: Tensor | None, index: Tensor | None, r: int, prefix: int,
                 op: str, order: str):
    """(x, size, index) from the native step when this call may take it (see ops/native), else None."""
    # the C step writes the original order only
    if r > 0 and op in native.OPS and order == "original" and native.usable(x, metric, size, index):
        return native.reduce(x, metric, size, index, min(r, max_reduction(x.shape[1], prefix)), prefix, op)
    return None


def initial_index(x: Tensor) -> Tensor:
    """Identity token map (B, N): every original token is where it started."""
    return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)


def unmerge(x: Tensor, index: Tensor) -> Tensor:
    """Put merged tokens back on the original grid: (B, N, C) -> (B, N0, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def unmerge_into(index: Tensor, x: Tensor) -> Tensor:
    """`unmerge` with the tokens last, as a region's exit receives them (GraphRewriter.bracket):
    index (B, N0), x (B, N, C) -> (B, N0, C)."""
    return unmerge(x, index)


def size_weighted_mean(x: Tensor, size: Tensor, start: int) -> Tensor:
    """Average pooling where each token counts as many patches as it stands for."""
    s = size[:, start:]
    return (x * s).sum(1) / s.sum(1)


def tofu_reduce(x: Tensor, metric: Tensor, size: Tensor | None, index: Tensor | None, r: int, prefix: int,
                op: str, order: str = "original"):
    """ToFu's reduction step: ToMe's matching, then ``op`` = prune | merge | mlerp.

    prune drops the matched A tokens (their partners keep their size: a pruned token adds no
    patches); merge is ToMe's size-weighted average; mlerp merges with norm-preserving MLERP and
    sizes add up as in ToMe.
    """
    if op == "merge":
        return tome_merge(x, metric, size, index, r, prefix, order)
    n = x.shape[1]
    done = _native_step(x, metric, size, index, r, prefix, op, order)
    if done is not None:
        return done
    m = bipartite_match(metric, r, prefix, order)
    if size is None:
        size = x.new_ones(x.shape[0], n, 1)
    if op == "prune":
        x, size = prune(x, m), prune(size, m)
    elif op == "mlerp":
        x, size = merge_mlerp(x, m), merge_sum(size, m)
    else:
        raise ValueError(f"unknown ToFu op {op!r}")
    if index is not None:
        # a pruned token has no place any more; it points at the partner that absorbed its
        # match, the nearest stand-in, so dense outputs stay defined everywhere
        index = merged_positions(n, m).gather(1, index)
    return x, size, index


native.CALLERS.update({tome_merge, tofu_reduce})   # both may take the one-call C step
