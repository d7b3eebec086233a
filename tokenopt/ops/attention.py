"""Attention helpers the rewriter inserts: per-key biases in each attention's convention, and
``nn.MultiheadAttention`` written out as in-projection, SDPA and out-projection.

Proportional attention (ToMe) is one such bias: log(size) per key, from ``ops.tome.key_log_size``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------------
# per-key biases in each attention convention (what add_attention_bias inserts)


def sdpa_mask_with_key_bias(bias: Tensor, like: Tensor, existing: Tensor | None = None) -> Tensor:
    """A float ``attn_mask`` for SDPA adding ``bias`` (B, N) along the key axis: (B, 1, 1, N).

    ``like`` (the queries) gives the dtype. The model's own mask is kept (float: added; boolean,
    True = may attend: -inf where it forbids). Broadcasting over heads keeps the fused kernel.
    """
    b = bias.to(like.dtype)[:, None, None, :]
    if existing is None:
        return b
    if existing.dtype == torch.bool:
        return b.masked_fill(~existing, float("-inf"))
    return existing + b


def logits_with_key_bias(logits: Tensor, bias: Tensor) -> Tensor:
    """Explicit attention logits (B, H, Nq, Nk) or (B*H, Nq, Nk) plus ``bias`` (B, Nk) per key."""
    b = bias.to(logits.dtype)[:, None, None, :]
    if logits.dim() == 4:
        return logits + b
    return (logits.reshape(bias.shape[0], -1, *logits.shape[-2:]) + b).reshape(logits.shape)


def mha_padding_with_key_bias(bias: Tensor, existing: Tensor | None = None) -> Tensor:
    """``nn.MultiheadAttention``'s float key_padding_mask (B, N) adding ``bias``; its own mask kept
    (float: added; boolean, True = ignore this key, MHA's convention: -inf where set)."""
    if existing is None:
        return bias
    if existing.dtype == torch.bool:
        return bias.masked_fill(existing, float("-inf"))
    return existing + bias.to(existing.dtype)


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention written out (GraphRewriter.decompose_mha), so its q, k, v are graph nodes


def mha_in_projection(x: Tensor, weight: Tensor, bias: Tensor | None, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Self-attention in-projection of a batch_first MHA: x (B, N, C) -> q, k, v, each (B, H, N, C/H)."""
    b, n, c = x.shape
    qkv = F.linear(x, weight, bias).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def mha_float_mask(q: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    """MHA's masks as one additive float mask for SDPA, broadcastable to (B, H, Nq, Nk).

    key_padding_mask (B, Nk): True or -inf = ignore that key; attn_mask (Nq, Nk) or (B*H, Nq, Nk):
    True = not allowed (MHA's convention, the opposite of SDPA's boolean masks).
    """
    b, h, nq, _ = q.shape
    out = None
    if key_padding_mask is not None:
        kp = key_padding_mask
        kp = torch.zeros(kp.shape, dtype=q.dtype, device=q.device).masked_fill(kp, float("-inf")) \
            if kp.dtype == torch.bool else kp.to(q.dtype)
        out = kp[:, None, None, :]
    if attn_mask is not None:
        am = attn_mask
        am = torch.zeros(am.shape, dtype=q.dtype, device=q.device).masked_fill(am, float("-inf")) \
            if am.dtype == torch.bool else am.to(q.dtype)
        am = am.reshape(b, h, nq, -1) if am.dim() == 3 else am
        out = am if out is None else out + am
    return out


def attention_dropout(module) -> float:
    """The attention dropout ``module`` (an nn.MultiheadAttention) applies now: its p in training, else 0."""
    return module.dropout if module.training else 0.0


def merge_heads(a: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    b, h, n, d = a.shape
    return a.transpose(1, 2).reshape(b, n, h * d)


def head_weights(p: Tensor, average: bool) -> Tensor:
    """MHA's returned attention weights from probabilities (B, H, Nq, Nk): averaged over heads or not."""
    return p.mean(1) if average else p


def with_weights(out: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """What ``nn.MultiheadAttention.forward`` returns: (output, weights or None)."""
    return out, weights
