"""Variable-length token sets: pack the tokens each image keeps, attend per image, unpack.

SPA (Zhang et al., 2024) keeps a different number of tokens per image. The kept tokens of the
whole batch become one sequence; the block's token-wise layers (norms, linears, MLP) run on it as
they are, attention is isolated so that no token sees another image's, and unpack puts the
results back::

    x (B, N, C), keep (B, N) bool
    packed, lengths = pack(x, keep)                # (1, T, C), T = keep.sum(); (B,) tokens per image
    a = isolated_attention(q, k, v, lengths=lengths)   # q, k, v (1, H, T, d)
    y = unpack(packed, keep, into=x)               # (B, N, C): x where keep is False

Rows of a packed sequence are image by image, each image's tokens in their original order, so
``x[keep]`` (row-major) is the packing and ``masked_scatter`` its inverse.

Under ``torch.compile`` and ``torch.export`` a size that depends on the data breaks the graph;
the padded layout has a static capacity instead::

    padded, rows, filled = pack_padded(x, keep, capacity)   # (B, cap, C); kept tokens first
    a = isolated_attention(q, k, v, lengths=lengths, capacity=cap)   # q, k, v (B, H, cap, d)
    y = unpack_padded(padded, rows, filled, into=x)

Attention over a packed batch has several strategies (:data:`STRATEGIES`), all equal to running
each image's tokens through attention alone; which is fastest depends on the device
(``benchmarks/bench_spa_attention.py``, docs/passes/spa.md):

    loop        one SDPA call per image on its own tokens (no wasted work; B kernel launches)
    padded      scatter to (B, H, L_max, d), SDPA with a key mask, gather back
    blockdiag   one SDPA over the packed length with a same-image mask (T x T: dense-attention cost)
    containers  the paper's: consecutive images filled into fixed-length containers (an image never
                spans two), one SDPA over the containers with a same-image mask
    varlen      PyTorch's variable-length flash attention (torch.nn.attention.varlen; CUDA only)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

STRATEGIES = ("loop", "padded", "blockdiag", "containers", "varlen")

#: The strategy ``auto`` runs, per device type, from benchmarks/bench_spa_attention.py (B=8, N=197,
#: 6 heads, keep 0.5 on 2 CPU cores: loop fastest; docs/passes/spa.md has the table). On CUDA the
#: variable-length flash kernel does the isolation itself, with no padding and one launch.
DEFAULT_STRATEGY = {"cpu": "loop", "cuda": "varlen"}


# ----------------------------------------------------------------------------------------------
# pack / unpack


def padded_layout(layout: str) -> bool:
    """Whether a stream of ``layout`` (packed | padded | auto) is padded now: ``auto`` is packed in
    eager runs and padded while torch.compile or torch.export traces (static shapes there)."""
    if layout == "auto":
        return bool(torch.compiler.is_compiling() or torch.compiler.is_exporting())
    return layout == "padded"


def pack(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The kept rows of every image in one sequence: x (B, N, *) and keep (B, N) bool ->
    (packed (1, T, *), lengths (B,) int64), T = keep.sum(); image i's rows in their original order
    at ``offsets(lengths)[i] : ... + lengths[i]``."""
    return x[keep].unsqueeze(0), keep.sum(1)


def unpack(packed: Tensor, keep: Tensor, into: Tensor) -> Tensor:
    """Inverse of :func:`pack`: a copy of ``into`` (B, N, *) whose kept rows (keep (B, N) bool) are
    the rows of ``packed`` (1, T, *), in order. Rows not kept are ``into``'s, bit for bit."""
    mask = keep.reshape(*keep.shape, *([1] * (into.dim() - 2))).expand_as(into)
    return into.masked_scatter(mask, packed.to(into.dtype))


def offsets(lengths: Tensor) -> Tensor:
    """Where each image starts in a packed sequence: lengths (B,) -> (B,) exclusive cumulative sum."""
    return torch.cumsum(lengths, 0) - lengths


def pack_padded(x: Tensor, keep: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Static-shape packing: x (B, N, *), keep (B, N) bool -> (padded (B, capacity, *), rows
    (B, capacity) int64 the row of x each slot holds, filled (B, capacity) bool).

    Each image's kept rows come first in their original order; slots past its count hold rows of x
    that were not kept (``filled`` False): attention masks them as keys and unpack ignores them.
    An image keeping more than ``capacity`` rows keeps its first ``capacity`` (SPA's selection
    never asks for more).
    """
    n = x.shape[1]
    position = torch.arange(n, device=x.device).expand(keep.shape)
    # kept rows first, each group in original order: sort by (not kept, position), keys that are
    # all different, so no stable sort is needed (ONNX has none)
    order = torch.sort(torch.where(keep, position, position + n), dim=1).indices
    rows = order[:, :capacity]
    filled = keep.gather(1, rows)
    gathered = x.gather(1, rows.reshape(*rows.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))
    return gathered, rows, filled


def unpack_padded(padded: Tensor, rows: Tensor, filled: Tensor, into: Tensor) -> Tensor:
    """Inverse of :func:`pack_padded`: a copy of ``into`` (B, N, *) with the filled slots of
    ``padded`` (B, cap, *) written at ``rows`` (B, cap); every other row is ``into``'s."""
    shape = (*rows.shape, *([1] * (into.dim() - 2)))
    idx = rows.reshape(shape).expand(-1, -1, *into.shape[2:])
    old = into.gather(1, idx)
    return into.scatter(1, idx, torch.where(filled.reshape(shape), padded.to(into.dtype), old))


# ----------------------------------------------------------------------------------------------
# attention with image isolation


def isolated_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                       is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                       lengths: Tensor, capacity: int | None = None, layout: str = "packed",
                       strategy: str = "auto") -> Tensor:
    """SDPA where every token attends only to tokens of its own image.

    Packed layout: q, k, v (1, H, T, d) or (H, T, d), image i's tokens at
    ``offsets(lengths)[i] : ... + lengths[i]``; ``strategy`` picks the implementation (see
    the module docstring; ``auto``: :data:`DEFAULT_STRATEGY` of q's device). Padded layout
    (``layout`` "padded", or "auto" while compiling; see :func:`padded_layout`): q, k, v
    (B, H, capacity, d) or (B*H, capacity, d), image i's tokens in its first ``lengths[i]`` slots;
    the other slots are masked as keys (their outputs are unused). Returns q's shape.
    ``attn_mask`` (a model's own mask) is refused: SPA's blocks have none to keep.
    """
    if attn_mask is not None or is_causal:
        raise NotImplementedError("isolated attention keeps no mask of the model's own (SPA refuses such blocks)")
    if padded_layout(layout):
        return _padded_slots(q, k, v, lengths, capacity, dropout_p, scale)
    flat = q.dim() == 3
    if flat:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if strategy == "auto":
        strategy = DEFAULT_STRATEGY.get(q.device.type, "padded")
        if strategy == "varlen" and not varlen_available(q):
            strategy = "padded"
    out = _STRATEGY_FN[strategy](q, k, v, lengths, dropout_p, scale)
    return out.squeeze(0) if flat else out


def _padded_slots(q, k, v, lengths, capacity, dropout_p, scale):
    """Padded layout: (B, H, cap, d) or (B*H, cap, d); key j of image i is valid when j < lengths[i]."""
    b = lengths.shape[0]
    shape = q.shape
    if q.dim() == 3:
        q, k, v = (t.reshape(b, -1, *t.shape[1:]) for t in (q, k, v))
    valid = torch.arange(capacity, device=q.device) < lengths[:, None]            # (B, cap)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], dropout_p=dropout_p,
                                         scale=scale)
    return out.reshape(shape)


def _split(lengths: Tensor) -> list[int]:
    return [int(n) for n in lengths.tolist()]


def attention_loop(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, dropout_p: float = 0.0,
                   scale: float | None = None) -> Tensor:
    """One SDPA per image: q, k, v (1, H, T, d), lengths (B,) -> (1, H, T, d)."""
    sizes = _split(lengths)
    parts = [F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout_p, scale=scale)
             for qi, ki, vi in zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2))]
    return torch.cat(parts, 2)


def _slots(lengths: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """For a packed sequence with ``lengths`` (B,): (image of every row (T,), slot of every row in
    its image (T,)); rows with slot >= width do not exist (width >= max length)."""
    b = lengths.shape[0]
    image = torch.repeat_interleave(torch.arange(b, device=lengths.device), lengths)
    slot = torch.arange(image.shape[0], device=lengths.device) - offsets(lengths)[image]
    return image, slot


def attention_padded(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, dropout_p: float = 0.0,
                     scale: float | None = None) -> Tensor:
    """Scatter to (B, H, L, d) with L the longest image, SDPA with a key mask, gather back:
    q, k, v (1, H, T, d), lengths (B,) -> (1, H, T, d)."""
    b, h = lengths.shape[0], q.shape[1]
    width = int(lengths.max()) if b else 0
    image, slot = _slots(lengths, width)

    def to_slots(t: Tensor) -> Tensor:
        out = t.new_zeros(b, width, h, t.shape[-1])
        out[image, slot] = t[0].transpose(0, 1)
        return out.transpose(1, 2)                                               # (B, H, L, d)

    valid = torch.arange(width, device=q.device) < lengths[:, None]               # (B, L)
    a = F.scaled_dot_product_attention(to_slots(q), to_slots(k), to_slots(v), attn_mask=valid[:, None, None, :],
                                       dropout_p=dropout_p, scale=scale)
    return a.transpose(1, 2)[image, slot].transpose(0, 1).unsqueeze(0)


def same_image_mask(lengths: Tensor) -> Tensor:
    """(T, T) bool, True where query row and key row belong to the same image of a packed sequence."""
    image = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths)
    return image[:, None] == image[None, :]


def attention_blockdiag(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, dropout_p: float = 0.0,
                        scale: float | None = None) -> Tensor:
    """One SDPA over the whole packed length with a block-diagonal mask: (1, H, T, d) -> (1, H, T, d)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same_image_mask(lengths), dropout_p=dropout_p,
                                          scale=scale)


def container_layout(lengths: list[int], size: int) -> list[list[int]]:
    """The paper's packing: images in batch order fill containers of ``size`` tokens, a new container
    starting when the next image does not fit (an image never spans two containers, so isolation
    stays a mask within each). Returns the images of each container."""
    size = max([size, *lengths])
    out: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if used + n > size and out[-1]:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return out


def attention_containers(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, dropout_p: float = 0.0,
                         scale: float | None = None, size: int | None = None) -> Tensor:
    """Fixed-length containers (default size: twice the longest image): (1, H, T, d) -> (1, H, T, d).

    Rows go into (K, H, size, d) containers; each container attends with a same-image mask, its
    empty tail masked as keys; results are gathered back to the packed order.
    """
    sizes = _split(lengths)
    h = q.shape[1]
    size = size or 2 * max(sizes, default=1)
    groups = container_layout(sizes, size)
    size = max([size, *sizes])
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    container, slot, owner = [], [], []          # per packed row: its container and slot; per slot: image
    owner_grid = torch.full((len(groups), size), -1, dtype=torch.long)
    for c, images in enumerate(groups):
        s = 0
        for i in images:
            container += [c] * sizes[i]
            slot += range(s, s + sizes[i])
            owner_grid[c, s:s + sizes[i]] = i
            s += sizes[i]
    dev = q.device
    container_t = torch.tensor(container, dtype=torch.long, device=dev)
    slot_t = torch.tensor(slot, dtype=torch.long, device=dev)
    owner_grid = owner_grid.to(dev)

    def fill(t: Tensor) -> Tensor:
        out = t.new_zeros(len(groups), size, h, t.shape[-1])
        out[container_t, slot_t] = t[0].transpose(0, 1)
        return out.transpose(1, 2)                                               # (K, H, size, d)

    # same image; empty slots (owner -1) see only each other, so no real token attends to them and
    # their own rows (discarded) are not all-masked (no NaN)
    mask = owner_grid[:, :, None] == owner_grid[:, None, :]
    a = F.scaled_dot_product_attention(fill(q), fill(k), fill(v), attn_mask=mask[:, None], dropout_p=dropout_p,
                                       scale=scale)
    return a.transpose(1, 2)[container_t, slot_t].transpose(0, 1).unsqueeze(0)


def varlen_available(q: Tensor) -> bool:
    """Whether PyTorch's variable-length flash attention can run on ``q`` (CUDA, half precision)."""
    if q.device.type != "cuda":
        return False
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return q.dtype in (torch.float16, torch.bfloat16)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, dropout_p: float = 0.0,
                     scale: float | None = None) -> Tensor:
    """torch.nn.attention.varlen.varlen_attn on (T, H, d) with cumulative lengths:
    (1, H, T, d) -> (1, H, T, d). CUDA (fp16/bf16) only; no dropout."""
    from torch.nn.attention.varlen import varlen_attn

    if dropout_p:
        raise NotImplementedError("varlen attention has no dropout; train with strategy 'padded' or 'loop'")
    cu = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int32)
    longest = int(lengths.max())
    out = varlen_attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, longest, longest,
                      scale=scale)
    return out.transpose(0, 1).unsqueeze(0)


_STRATEGY_FN = {"loop": attention_loop, "padded": attention_padded, "blockdiag": attention_blockdiag,
                "containers": attention_containers, "varlen": attention_varlen}
