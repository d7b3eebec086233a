"""Selection labels for SPA's gates: which patch tokens a layer should keep, per image.

Two sources (``labels=`` of :func:`tokenopt.train.gate.train_gates`, ``--labels`` of ``tokenopt train``):

``masks``
    The data yields ``(image, label, mask (H, W))``. The mask is pooled to the token grid
    (tokenopt.data.masks.pool_to_grid): a patch token is positive when the object covers at least
    ``cover`` (default 0.5) of its patch, on each gated layer's own grid (a Swin stage's grid halves at
    each patch merging, so its labels are rasterised coarser).
``attention``
    No masks: the tokens the *original* model attends to. At each gated layer, the attention a
    patch token receives is the mean over heads and over every query (prefix tokens' queries
    included) of its column of the original's attention at that layer; the positive set is the
    smallest set of patch tokens, most-attended first, whose received attention reaches ``mass``
    (default 0.5) of what all patch tokens receive. So an image whose attention is concentrated
    gets few positives and one whose attention is spread gets many, which is what a per-image
    gate should learn. The attention comes from tokenopt.train.selector.AttentionTeacher.

Labels are over patch tokens only, (B, P) with P = tokens - prefix tokens: prefix tokens are
always kept, so their gate output is neither supervised nor counted.
"""
from __future__ import annotations

import torch

from tokenopt.data.masks import DEFAULT_COVER, square_grid, token_labels
from tokenopt.errors import DataError

DEFAULT_MASS = 0.5
SOURCES = ("masks", "attention")


def received_attention(attention: torch.Tensor, prefix: int) -> torch.Tensor:
    """Attention each patch token receives: (B, H, N, N) probabilities → (B, N - prefix), mean over heads and queries."""
    return attention.mean(dim=(1, 2))[:, prefix:]


def attention_labels(attention: torch.Tensor, prefix: int, mass: float = DEFAULT_MASS) -> torch.Tensor:
    """(B, H, N, N) attention probabilities → (B, N - prefix) bool: the smallest most-attended set holding ``mass``.

    A token is in the set when the tokens ranked before it hold less than ``mass`` of the total, so
    the set always has at least one token and reaches ``mass`` exactly at its last member. Ties
    rank by position (a stable sort).
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"attention mass must be in (0, 1], got {mass}")
    received = received_attention(attention.to(torch.float32), prefix)
    share = received / received.sum(-1, keepdim=True).clamp_min(torch.finfo(received.dtype).tiny)
    order = share.argsort(dim=-1, descending=True, stable=True)
    before = share.gather(-1, order).cumsum(-1) - share.gather(-1, order)   # mass ranked strictly before
    chosen = before < mass
    return torch.zeros_like(chosen).scatter(-1, order, chosen)


def mask_labels(masks: torch.Tensor, patch_tokens: int, cover: float = DEFAULT_COVER) -> torch.Tensor:
    """(B, H, W) masks → (B, patch_tokens) bool labels on a square patch grid (see the module docstring)."""
    if masks.dim() != 3:
        raise DataError(f"masks must be (batch, height, width), got shape {tuple(masks.shape)}")
    return token_labels(masks, square_grid(patch_tokens), cover)


def has_masks(data) -> bool:
    """True when ``data`` (a Dataset, a Subset of one, or a DataLoader over one) yields (image, label, mask)."""
    dataset = getattr(data, "dataset", data)
    try:
        item = dataset[0]
    except Exception:
        return False
    return isinstance(item, (tuple, list)) and len(item) >= 3 and isinstance(item[2], torch.Tensor)


def check_source(labels: str, data, name: str | None = None) -> None:
    """A DataError when ``labels`` cannot be made from ``data`` (``name``: what the user called it)."""
    if labels not in SOURCES:
        raise DataError(f"unknown gate label source '{labels}': use one of {', '.join(SOURCES)}")
    if labels == "masks" and not has_masks(data):
        where = name or getattr(getattr(data, "dataset", data), "root", None) or type(getattr(data, "dataset", data)).__name__
        raise DataError(f"mask labels need data with object masks, and '{where}' has none: use labels 'attention' "
                        f"(from the original model), the built-in digits-clutter (it draws its digits' masks), or "
                        f"an ImageFolder with a masks directory (--masks DIR: one PNG per image, same relative paths)")
