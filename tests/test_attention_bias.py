"""Proportional attention's bias keeps the model's own masks, float or boolean, in each convention.

References are written out: softmax(q k^T * scale + log(size) [+ mask]) v, one image at a time.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenopt.ops.attention import logits_with_key_bias, mha_padding_with_key_bias, sdpa_mask_with_key_bias
from tokenopt.ops.tome import key_log_size


def key_log_size_mask(size, dtype, existing=None):
    return sdpa_mask_with_key_bias(key_log_size(size), torch.empty(0, dtype=dtype), existing)


def add_key_log_size(logits, size):
    return logits_with_key_bias(logits, key_log_size(size))


def mha_key_padding_bias(size, dtype, existing=None):
    return mha_padding_with_key_bias(key_log_size(size).to(dtype), existing)

B, H, N, D = 2, 3, 5, 4


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def sizes():
    return torch.tensor([[1., 2., 1., 3., 1.], [4., 1., 1., 1., 2.]]).unsqueeze(-1)   # (B, N, 1)


def by_hand(q, k, v, size, forbid=None, add=None):
    """Per image and head: softmax over keys of q.k/sqrt(d) + log(size_j) (+ add), -inf where forbid."""
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                w = []
                for j in range(N):
                    s = float(q[b, h, i] @ k[b, h, j]) / D ** 0.5 + float(size[b, j, 0].log())
                    if add is not None:
                        s += float(add[b, j])
                    if forbid is not None and bool(forbid[b, j]):
                        s = float("-inf")
                    w.append(s)
                p = torch.tensor(w).softmax(0)
                out[b, h, i] = (p[:, None] * v[b, h]).sum(0)
    return out


def test_sdpa_mask_alone_and_with_a_float_mask():
    q, k, v = qkv()
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=key_log_size_mask(sizes(), torch.float32))
    assert torch.allclose(got, by_hand(q, k, v, sizes()), atol=1e-5)
    extra = torch.randn(B, N)
    mask = key_log_size_mask(sizes(), torch.float32, extra[:, None, None, :])
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(got, by_hand(q, k, v, sizes(), add=extra), atol=1e-5)


def test_sdpa_boolean_mask_true_means_attend():
    q, k, v = qkv(1)
    allowed = torch.ones(B, N, dtype=torch.bool)
    allowed[0, 3] = allowed[1, 0] = False
    mask = key_log_size_mask(sizes(), torch.float32, allowed[:, None, None, :])
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(got, by_hand(q, k, v, sizes(), forbid=~allowed), atol=1e-5)


def test_explicit_logits_both_layouts():
    q, k, v = qkv(2)
    logits = q @ k.transpose(-2, -1) / D ** 0.5
    want = by_hand(q, k, v, sizes())
    assert torch.allclose(add_key_log_size(logits, sizes()).softmax(-1) @ v, want, atol=1e-5)
    flat = add_key_log_size(logits.reshape(B * H, N, N), sizes()).reshape(B, H, N, N)
    assert torch.allclose(flat.softmax(-1) @ v, want, atol=1e-5)


@pytest.mark.parametrize("existing", [None, "float", "bool"])
def test_mha_key_padding_mask_in_its_convention(existing):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(H * D, H, batch_first=True).eval()
    x = torch.randn(B, N, H * D)
    extra = torch.randn(B, N)
    ignore = torch.zeros(B, N, dtype=torch.bool)
    ignore[0, 1] = ignore[1, 4] = True
    given = {None: None, "float": extra, "bool": ignore}[existing]
    with torch.no_grad():
        got = mha(x, x, x, key_padding_mask=mha_key_padding_bias(sizes(), torch.float32, given), need_weights=False)[0]
        w, bias = mha.in_proj_weight, mha.in_proj_bias
        q, k, v = (F.linear(x, w[i * H * D:(i + 1) * H * D], bias[i * H * D:(i + 1) * H * D])
                   .reshape(B, N, H, D).transpose(1, 2) for i in range(3))
        heads = by_hand(q, k, v, sizes(), forbid=ignore if existing == "bool" else None,
                        add=extra if existing == "float" else None)
        want = mha.out_proj(heads.transpose(1, 2).reshape(B, N, H * D))
    assert torch.allclose(got, want, atol=1e-5)
