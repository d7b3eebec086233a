"""ToMe written from the paper's definition, one image at a time, for parity tests.

Deliberately plain (Python lists, explicit loops, explicit softmax attention) and independent of
tokenopt.ops: it runs a timm VisionTransformer's own submodules with ToMe applied between the
attention residual and the MLP of every block. Every token carries the list of original positions
it stands for, so the reference can also put merged tokens back on the grid (``outputs="tokens"``).
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F


def unit_gain_model(name, **kw):
    """A tiny timm model with weights at unit gain: timm's 0.02-std init (and deit3's 1e-6
    LayerScale) make blocks near-identity, under which merging barely changes the output and a
    parity test would prove little."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def merge_one_image(x, size, metric, r, prefix, members, order="original"):
    """Merge r tokens of one image.

    x (N, C), size (N,), metric (N, d); members: for every token, the original positions it stands
    for (a list of lists). order: "original" keeps the unmerged A tokens in their original order,
    "rank" in descending order of their best similarity (what the reference implementation does
    for models without a class token). Returns merged x, size, members in the output token order.
    """
    n = x.shape[0]
    r = min(r, (n - prefix) // 2)
    m = F.normalize(metric, dim=-1)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    scores = m[a_pos] @ m[b_pos].T
    for i, p in enumerate(a_pos):
        if p < prefix:
            scores[i, :] = float("-inf")
    for j, p in enumerate(b_pos):
        if p < prefix:
            scores[:, j] = float("-inf")
    best, partner = scores.max(dim=-1)
    ranked = best.argsort(descending=True).tolist()
    merged = set(ranked[:r])
    groups = {j: [b_pos[j]] for j in range(len(b_pos))}
    for i in merged:
        groups[int(partner[i])].append(a_pos[i])

    def reduce(positions):
        w = size[positions]
        stands_for = [q for p in positions for q in members[p]]
        return (x[positions] * w[:, None]).sum(0) / w.sum(), w.sum(), stands_for

    out = []
    for p in range(prefix):                      # prefix tokens, original order, never merged
        out.append(reduce(groups[b_pos.index(p)]) if p % 2 else reduce([p]))
    a_order = ranked if order == "rank" else range(len(a_pos))
    out += [reduce([a_pos[i]]) for i in a_order if a_pos[i] >= prefix and i not in merged]
    out += [reduce(groups[j]) for j, p in enumerate(b_pos) if p >= prefix]
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out]), [o[2] for o in out]


def attention(blk, x, size, prop_attn):
    attn = blk.attn
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if prop_attn:
        logits = logits + size.log()[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(attn.norm(out)), k.mean(1)


def unmerge_one_image(x, members, n0):
    """(N, C) tokens -> (n0, C): every original position gets the token that stands for it."""
    out = [None] * n0
    for token, positions in zip(x, members):
        for p in positions:
            assert out[p] is None, f"position {p} claimed twice"
            out[p] = token
    assert all(t is not None for t in out), "a position nobody stands for"
    return torch.stack(out)


@torch.no_grad()
def tome_reference(model, images, rs, prop_attn=True, order="original", outputs="logits", pool="size"):
    """A timm VisionTransformer with ToMe (r per block in ``rs``).

    outputs: "logits", or "tokens" (the final normed patch tokens on the original grid, merged
    tokens repeated at every position they stand for). pool: how average pooling treats merged
    tokens, "size" (weighted by size, tokenopt's choice) or "plain" (each token once, as the
    reference implementation does).
    """
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    n0 = x.shape[1]
    size = torch.ones(x.shape[:2])
    members = [[[p] for p in range(n0)] for _ in range(x.shape[0])]
    for blk, r in zip(model.blocks, rs):
        a, metric = attention(blk, blk.norm1(x), size, prop_attn)
        x = x + blk.ls1(a)
        if r > 0:
            merged = [merge_one_image(x[i], size[i], metric[i], r, prefix, members[i], order)
                      for i in range(x.shape[0])]
            x = torch.stack([m[0] for m in merged])
            size = torch.stack([m[1] for m in merged])
            members = [m[2] for m in merged]
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    if outputs == "tokens":
        return torch.stack([unmerge_one_image(t, ms, n0) for t, ms in zip(x, members)])[:, prefix:]
    if model.global_pool == "avg":
        w = size[:, prefix:, None] if pool == "size" else torch.ones_like(size[:, prefix:, None])
        pooled = (x[:, prefix:] * w).sum(1) / w.sum(1)
        return model.head(model.fc_norm(pooled))
    return model.forward_head(x)
