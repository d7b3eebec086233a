"""ToMe written from the paper's definition, one image at a time, for parity tests.

Deliberately plain (Python lists, explicit loops, explicit softmax attention) and independent of
tokenopt.ops: it runs a timm VisionTransformer's own submodules with ToMe applied between the
attention residual and the MLP of every block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_one_image(x, size, metric, r, prefix):
    """x (N, C), size (N,), metric (N, d) -> merged x, size, in the reference's token order."""
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
    merged = set(best.argsort(descending=True)[:r].tolist())
    groups = {j: [b_pos[j]] for j in range(len(b_pos))}
    for i in merged:
        groups[int(partner[i])].append(a_pos[i])

    def reduce(members):
        w = size[members]
        return (x[members] * w[:, None]).sum(0) / w.sum(), w.sum()

    out = []
    for p in range(prefix):                      # prefix tokens, original order, never merged
        out.append(reduce(groups[b_pos.index(p)]) if p % 2 else (x[p], size[p]))
    out += [(x[p], size[p]) for i, p in enumerate(a_pos) if p >= prefix and i not in merged]
    out += [reduce(groups[j]) for j, p in enumerate(b_pos) if p >= prefix]
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


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


@torch.no_grad()
def tome_reference(model, images, rs, prop_attn=True):
    """Logits of a timm VisionTransformer with ToMe (r per block in ``rs``)."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = torch.ones(x.shape[:2])
    for blk, r in zip(model.blocks, rs):
        a, metric = attention(blk, blk.norm1(x), size, prop_attn)
        x = x + blk.ls1(a)
        if r > 0:
            merged = [merge_one_image(x[i], size[i], metric[i], r, prefix) for i in range(x.shape[0])]
            x = torch.stack([m[0] for m in merged])
            size = torch.stack([m[1] for m in merged])
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    if model.global_pool == "avg":
        w = size[:, prefix:, None]
        pooled = (x[:, prefix:] * w).sum(1) / w.sum(1)
        return model.head(model.fc_norm(pooled))
    return model.forward_head(x)
