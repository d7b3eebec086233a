"""Attention with an additive per-key bias: proportional attention (ToMe) adds log(size)."""
from __future__ import annotations

import torch
from torch import Tensor


def key_log_size_mask(size: Tensor, dtype, existing: Tensor | None = None) -> Tensor:
    """A float ``attn_mask`` for scaled_dot_product_attention: log(size) along the key axis.

    (B, N, 1) -> (B, 1, 1, N), broadcast over heads and queries, so the fused kernel stays in use.
    The model's own mask, if any, is kept: a float mask adds; a boolean one (True = may attend,
    SDPA's convention) becomes -inf where it forbids.
    """
    bias = size.log().to(dtype).transpose(1, 2).unsqueeze(1)
    if existing is None:
        return bias
    if existing.dtype == torch.bool:
        return bias.masked_fill(~existing, float("-inf"))
    return existing + bias


def add_key_log_size(logits: Tensor, size: Tensor) -> Tensor:
    """Add log(size) to explicit attention logits (B, H, Nq, Nk) or (B*H, Nq, Nk)."""
    bias = size.log().to(logits.dtype).transpose(1, 2)          # (B, 1, N)
    if logits.dim() == 4:
        return logits + bias.unsqueeze(1)
    b = size.shape[0]
    return (logits.reshape(b, -1, *logits.shape[-2:]) + bias.unsqueeze(1)).reshape(logits.shape)


def mha_key_padding_bias(size: Tensor, dtype, existing: Tensor | None = None) -> Tensor:
    """nn.MultiheadAttention adds a float key_padding_mask (B, N) to its logits: log(size) (B, N, 1) -> (B, N).

    The model's own mask is kept: a float one adds; a boolean one (True = ignore this key, MHA's
    convention, the opposite of SDPA's) becomes -inf where it is set.
    """
    bias = size.log().to(dtype).squeeze(-1)
    if existing is None:
        return bias
    if existing.dtype == torch.bool:
        return bias.masked_fill(existing, float("-inf"))
    return existing + bias
