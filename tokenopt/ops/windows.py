"""Tensor code for reductions inside attention windows (Swin): every window of every image at once.

Windows are rows: a block's window tokens are (R, N, C) with R = batch x windows (image-major, as
Swin partitions them) and N = wh * ww. Each op works row by row, so no value (nor gradient) crosses
windows or images::

    shift_regions(padded, size, shift)          (nW, N) which shifted region each token came from
    window_merge(x, r, regions)                 bipartite merge of r tokens per window, within a region
    window_unmerge(y, source)                   every token back, from the one it was merged into
    dense_window_bias(n, *terms)                the logit terms (relative bias, shift mask) as (rows, h, N, N)
    window_attention(q, k, v, bias=, pos=, size=)   attention on the kept tokens of each window, with the
                                                bias each pair of kept tokens had at its true positions
    keep_in_windows, gather_kept, scatter_kept  SPA: a gate's per-image selection, per window; the kept
                                                tokens of each row packed (padded to the fullest row) and back
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenopt.ops import matching


def shift_regions(padded: tuple[int, int], size: tuple[int, int], shift: tuple[int, int],
                  device=None) -> torch.Tensor:
    """(nW, N) labels: two tokens of a window attend to each other in a shifted Swin block only when
    their labels are equal (the cyclic shift brought them from different corners of the image)."""
    (h, w), (wh, ww), (sh, sw) = padded, size, shift
    label = torch.zeros(h, w, dtype=torch.long, device=device)
    if sh or sw:
        rows = (slice(0, h - wh), slice(h - wh, h - sh), slice(h - sh, h)) if sh else (slice(0, h),)
        cols = (slice(0, w - ww), slice(w - ww, w - sw), slice(w - sw, w)) if sw else (slice(0, w),)
        for i, rs in enumerate(rows):
            for j, cs in enumerate(cols):
                label[rs, cs] = i * 3 + j
    return label.view(h // wh, wh, w // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)


def window_merge(x: torch.Tensor, r: int, shift: tuple | None = None, op: str = "merge"):
    """Reduce ``r`` tokens in every window of ``x`` (R, N, C) with ToMe's bipartite matching
    (:func:`ops.matching.bipartite_match`, the tokens themselves as the metric).

    ``shift``: (padded grid, window size, shift) of a shifted block, whose windows hold tokens of
    several regions (:func:`shift_regions`): only tokens of one region pair, so a kept token's
    mask at its position holds for every token merged into it. ``op``: merge (ToMe's size-weighted
    mean) | prune | mlerp (ToFu's). Returns (kept (R, n, C), size (R, n, 1), pos (R, n): the
    in-window position each kept token stands at, source (R, N): the kept row each token went to).
    """
    rows, n, _ = x.shape
    if r <= 0:
        pos = torch.arange(n, device=x.device).expand(rows, n)
        return x, x.new_ones(rows, n, 1), pos, pos
    labels = None
    if shift is not None:
        regions = shift_regions(*shift, device=x.device)
        labels = regions[torch.arange(rows, device=x.device) % regions.shape[0]]
    m = matching.bipartite_match(x, r, 0, labels=labels)
    if op == "merge":
        out, size = matching.merge_weighted(x, None, m)
    else:
        ones = x.new_ones(rows, n, 1)
        out = matching.prune(x, m) if op == "prune" else matching.merge_mlerp(x, m)
        size = matching.prune(ones, m) if op == "prune" else matching.merge_sum(ones, m)
    return out, size, m.keep, matching.merged_positions(n, m)


def window_unmerge(source: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(R, N, C): every original token of each window takes the output of the token it merged into."""
    return y.gather(1, source[..., None].expand(-1, -1, y.shape[-1]))


def dense_window_bias(n: int, *terms: torch.Tensor) -> torch.Tensor:
    """The sum of the terms a windowed attention adds to its logits, as (rows, heads or 1, N, N).

    Each term's axes before the last three fold into one row axis (1, windows or batch x windows rows,
    window w of image b at row (b * windows + w) % rows): timm's shift mask (1, nW, 1, N, N), its bias
    (1, heads, N, N), Hugging Face's mask expanded per image (B * nW, 1, N, N).
    """
    folded = [t.reshape(-1, t.shape[-3] if t.dim() >= 3 else 1, n, n) for t in terms]
    rows = max(t.shape[0] for t in folded)
    total = None
    for t in folded:
        t = t.repeat(rows // t.shape[0], 1, 1, 1) if t.shape[0] != rows else t
        total = t if total is None else total + t
    return total


def gather_pair_bias(bias: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(R, h, n, n): the bias between every two kept tokens of each window, from ``bias``
    (rows, h, N, N) at their true in-window positions ``pos`` (R, n)."""
    rows_all, n = pos.shape
    b = bias[torch.arange(rows_all, device=pos.device) % bias.shape[0]]          # (R, h, N, N)
    h, full = b.shape[1], b.shape[-1]
    b = b.gather(2, pos[:, None, :, None].expand(rows_all, h, n, full))
    return b.gather(3, pos[:, None, None, :].expand(rows_all, h, n, n))


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None, *, bias: torch.Tensor | None,
                     pos: torch.Tensor | None, size: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over the kept tokens of each window: q, k, v (R, heads, n, d); the logits get the window's
    bias at the kept tokens' positions and, when tokens were merged, log(size) per key (proportional
    attention); keys that are padding (``valid`` (R, n) False) get the lowest logit. ``attn_mask`` is
    taken for SDPA's signature; the bias stands for every term on the logits."""
    if attn_mask is not None or is_causal:
        raise ValueError("window_attention takes its logit terms as bias=, not attn_mask")
    if bias is None:
        add = None
    elif pos is None:           # the bias is per row already (SPA's containers)
        add = bias.to(q.dtype)
    else:
        add = gather_pair_bias(bias, pos).to(q.dtype)
    if size is not None:
        log_size = size.log()[:, None, None, :, 0].to(q.dtype)
        add = log_size if add is None else add + log_size
    if valid is not None:       # a finite floor: a row with no kept token gives numbers (discarded), not NaN
        floor = torch.where(valid, 0.0, torch.finfo(q.dtype).min)[:, None, None, :].to(q.dtype)
        add = floor if add is None else (add + floor).clamp_min(torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=add, dropout_p=dropout_p, scale=scale)


# ---------------------------------------------------------------- SPA in windows: kept tokens, packed per row

def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) or (B, N, C) -> (B, N, C)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def straight_through_map(x: torch.Tensor, ste: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """A windowed SPA block's output y, plus ``ste * (y - x)`` per token when training: zero in value
    (y exactly), and the gate's gradient through it, as the packed path's straight-through term.
    x, y (B, H, W, C) or (B, N, C), the block's input and output (each may be either: timm's block
    takes the map and ends on tokens); ste (B, H*W) | None (eval)."""
    if ste is None:
        return y
    return y + ste.reshape(*y.shape[:-1], 1).to(y.dtype) * (y - x.reshape(y.shape))


def keep_in_windows(keep: torch.Tensor, grid: tuple[int, int], padded: tuple[int, int], size: tuple[int, int],
                    shift: tuple[int, int]) -> torch.Tensor:
    """(B*nW, N): ``keep`` (B, H*W) on the block's grid, shifted and partitioned as the block does its
    tokens (padding is never kept)."""
    b = keep.shape[0]
    (h, w), (ph, pw), (wh, ww) = grid, padded, size
    k = keep.view(b, h, w)
    if any(shift):
        k = torch.roll(k, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    if (ph, pw) != (h, w):
        k = F.pad(k, (0, pw - w, 0, ph - h), value=False)
    return k.view(b, ph // wh, wh, pw // ww, ww).permute(0, 1, 3, 2, 4).reshape(-1, wh * ww)


def gather_kept(x: torch.Tensor, keep: torch.Tensor):
    """The kept tokens of every row of ``x`` (R, N, C), first in their order, padded to the most any
    row keeps: (xs (R, n, C), pos (R, n) their positions, valid (R, n)). Padding slots hold the
    row's unkept tokens (their values are never used)."""
    counts = keep.sum(1)
    n = max(int(counts.max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = torch.arange(n, device=x.device) < counts[:, None]
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])), order, valid


def scatter_kept(pos: torch.Tensor, valid: torch.Tensor, n: int, y: torch.Tensor) -> torch.Tensor:
    """(R, N, C): the rows' results ``y`` (R, n, C) back at their positions, zero for every token that
    was not kept (it skips the region: a residual add leaves it as it was)."""
    out = y.new_zeros(y.shape[0], n, y.shape[-1])
    return out.scatter(1, pos[..., None].expand(-1, -1, y.shape[-1]), y * valid[..., None].to(y.dtype))


# ---------------------------------------------------------------- SPA containers (the paper's grouping)

def window_coords(grid: tuple[int, int], padded: tuple[int, int], size: tuple[int, int],
                  shift: tuple[int, int], device=None) -> torch.Tensor:
    """(nW, N, 2): the true (row, column) on the block's grid of every window token, after the shift
    (a cyclic shift's wrapped tokens keep where they really are; padding gets rows past the grid)."""
    (ph, pw), (wh, ww), (sh, sw) = padded, size, shift
    ys, xs = torch.meshgrid(torch.arange(ph, device=device), torch.arange(pw, device=device), indexing="ij")
    yx = torch.stack([ys, xs], -1)
    if sh or sw:        # the token at (i, j) of the shifted grid came from (i + sh, j + sw) mod the grid
        yx = torch.roll(yx, shifts=(-sh, -sw), dims=(0, 1))
    return yx.view(ph // wh, wh, pw // ww, ww, 2).permute(0, 2, 1, 3, 4).reshape(-1, wh * ww, 2)


def fill_containers(x: torch.Tensor, keep: torch.Tensor, windows: int):
    """Each image's kept window tokens, in window order, filling containers of N tokens (N: a window's).

    x (B*nW, N, C) window tokens, keep (B*nW, N). Returns (xc (B*K, N, C), slot (B*K, N): the flat
    position among its image's nW*N window tokens of each container slot, valid (B*K, N)); K: the
    containers of the image that needs most (the others get empty ones). Slots past an image's kept
    tokens hold its unkept ones (never used), so no two slots of an image share a position."""
    rows, n, c = x.shape
    b = rows // windows
    flat_keep = keep.reshape(b, windows * n)
    counts = flat_keep.sum(1)
    k = max(int((counts.max() + n - 1) // n), 1)          # <= windows: never more slots than tokens
    slot = torch.argsort((~flat_keep).to(torch.int8), dim=1, stable=True)[:, :k * n]
    valid = torch.arange(k * n, device=x.device) < counts[:, None]
    xc = x.reshape(b, windows * n, c).gather(1, slot[..., None].expand(-1, -1, c))
    return xc.reshape(b * k, n, c), slot.reshape(b * k, n), valid.reshape(b * k, n)


def empty_containers(slot: torch.Tensor, valid: torch.Tensor, like: torch.Tensor, windows: int,
                     y: torch.Tensor) -> torch.Tensor:
    """Shaped as the window tokens ``like`` (B*nW, N, C): the containers' results ``y`` (B*K, N, C) back
    in their windows, zero for every token that was not kept."""
    rows, n, c = like.shape
    b = rows // windows
    out = y.new_zeros(b, windows * n, c)
    flat = (y * valid[..., None].to(y.dtype)).reshape(b, -1, c)
    out = out.scatter(1, slot.reshape(b, -1)[..., None].expand(-1, -1, c), flat)
    return out.reshape(rows, n, c)


def container_bias(table: torch.Tensor, slot: torch.Tensor, grid: tuple[int, int], padded: tuple[int, int],
                   size: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(B*K, heads, N, N): the relative position bias between the tokens of each container, from the table
    (rows (2wh-1)(2ww-1), heads) at their true grid offsets, clamped to the table's range (a container can
    hold tokens further apart than a window spans; clamping gives them the bias of the farthest offset)."""
    wh, ww = size
    flat = window_coords(grid, padded, size, shift, device=slot.device).reshape(-1, 2)                                     # (nW*N, 2): same windows in every image
    yx = flat[slot]                                                  # (B*K, N, 2)
    d = yx[:, :, None, :] - yx[:, None, :, :]
    dy = d[..., 0].clamp(-(wh - 1), wh - 1) + wh - 1
    dx = d[..., 1].clamp(-(ww - 1), ww - 1) + ww - 1
    return table[dy * (2 * ww - 1) + dx].permute(0, 3, 1, 2)
