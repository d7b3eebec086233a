"""ToSA's tensor code: the selector's input, the selector networks, top-k select and restore.

A selective layer i runs on a fixed number of tokens chosen from a prediction of its own
attention, made from layer i-1's pre-softmax logits::

    logits  = q @ k^T * scale                  # layer i-1, per head: (B, H, N, N)  ("map")
    stats   = [mean query, prefix query] @ k^T # or two rows per head: (B, H, 2, N)  ("pooled")
    logp    = selector(logits or stats)        # predicted log-attention of layer i
    scores  = exp(logp) summed over heads and queries          # (B, N): column sums
    idx     = prefix + sorted top-k of the non-prefix scores   # (B, prefix + k)
    y       = block(gather(x, idx))                            # attention among the selected
    out     = x.scatter(1, idx, y)                             # the rest bypass, unchanged

When layer i-1 was itself selective its logits cover only the tokens it selected; they are
written over the map (or stats) its own selector read, so every selector sees a full
(B, H, ., N) input where each entry is the most recent logit known for that pair of tokens.

Shapes are static (k is fixed by the recipe): one graph under torch.compile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# the previous layer's logits


def heads_first(t: Tensor, tokens: Tensor) -> Tensor:
    """(B*H, M, N) -> (B, H, M, N); 4-D tensors pass. ``tokens`` (B, N, C) gives the batch size."""
    if t.dim() == 4:
        return t
    return t.reshape(tokens.shape[0], -1, t.shape[-2], t.shape[-1])


def attention_logits(q: Tensor, k: Tensor, scale: float | None, tokens: Tensor) -> Tensor:
    """q @ k^T * scale per head, (B, H, N, N): the logits a fused SDPA computes and hides."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    return heads_first((q @ k.transpose(-2, -1)) * s, tokens)


def logit_stats(q: Tensor, k: Tensor, scale: float | None, tokens: Tensor, prefix: int) -> Tensor:
    """Two logit rows per head in O(N d), (B, H, 2, N): the mean query's and the prefix queries'.

    By linearity ``mean_q(q) @ k^T`` is the mean over queries of the logits, and the prefix row is
    the cls token's view of every key; without prefix tokens the mean row is used twice.
    """
    s = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = heads_first(q, tokens), heads_first(k, tokens)
    mean = q.mean(-2, keepdim=True)
    first = q[..., :prefix, :].mean(-2, keepdim=True) if prefix else mean
    return (torch.cat([mean, first], -2) @ k.transpose(-2, -1)) * s


def stats_from_logits(logits: Tensor, tokens: Tensor, prefix: int) -> Tensor:
    """:func:`logit_stats` from explicit logits (B, H, N, N) or (B*H, N, N)."""
    logits = heads_first(logits, tokens)
    mean = logits.mean(-2, keepdim=True)
    first = logits[..., :prefix, :].mean(-2, keepdim=True) if prefix else mean
    return torch.cat([mean, first], -2)


def mha_qk(x: Tensor, in_proj_weight: Tensor, in_proj_bias: Tensor | None, heads: int) -> tuple[Tensor, Tensor]:
    """Queries and keys of ``nn.MultiheadAttention`` (batch_first), (B, H, N, d) each."""
    b, n, c = x.shape
    bias = (None, None) if in_proj_bias is None else (in_proj_bias[:c], in_proj_bias[c:2 * c])
    q = F.linear(x, in_proj_weight[:c], bias[0]).reshape(b, n, heads, c // heads).transpose(1, 2)
    k = F.linear(x, in_proj_weight[c:2 * c], bias[1]).reshape(b, n, heads, c // heads).transpose(1, 2)
    return q, k


def mha_attention_logits(x: Tensor, in_proj_weight: Tensor, in_proj_bias: Tensor | None, heads: int) -> Tensor:
    q, k = mha_qk(x, in_proj_weight, in_proj_bias, heads)
    return attention_logits(q, k, None, x)


def mha_logit_stats(x: Tensor, in_proj_weight: Tensor, in_proj_bias: Tensor | None, heads: int,
                    prefix: int) -> Tensor:
    q, k = mha_qk(x, in_proj_weight, in_proj_bias, heads)
    return logit_stats(q, k, None, x, prefix)


def fill_map(full: Tensor, sub: Tensor, idx: Tensor) -> Tensor:
    """Write logits among the selected tokens ``sub`` (B, H, m, m) into ``full`` (B, H, N, N)."""
    b, h, n, _ = full.shape
    m = idx.shape[1]
    rows_at = idx[:, None, :, None].expand(b, h, m, n)
    rows = full.gather(2, rows_at).scatter(3, idx[:, None, None, :].expand(b, h, m, m), sub)
    return full.scatter(2, rows_at, rows)


def fill_stats(full: Tensor, sub: Tensor, idx: Tensor) -> Tensor:
    """Write key statistics of the selected tokens ``sub`` (B, H, S, m) into ``full`` (B, H, S, N)."""
    return full.scatter(3, idx[:, None, None, :].expand_as(sub), sub)


# ----------------------------------------------------------------------------------------------
# selectors


class TokenSelector(nn.Module):
    """Base of the selector networks. ``trained`` is a buffer (so it is saved): False until
    :func:`tokenopt.train.selector.train_selectors` has fitted it."""

    def __init__(self, in_channels: int, heads: int, hidden: int, kernel: int, residual: bool):
        super().__init__()
        self.heads, self.residual = heads, residual
        self.conv1 = nn.Conv1d(in_channels, hidden, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(hidden, heads, kernel, padding=kernel // 2)
        if residual:
            # the untrained selector predicts "like the layer before", and training starts there
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)
        self.register_buffer("trained", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


class MapSelector(TokenSelector):
    """The paper's selector: 1-D convolutions along the keys of every query row, heads as channels.

    (B, H, M, N) logits -> (B, H, M, N) predicted log-attention of the next layer (log-softmax
    over keys). Costs O(M N H hidden kernel).
    """

    kind = "map"

    def __init__(self, heads: int, hidden: int = 64, kernel: int = 3, residual: bool = True):
        super().__init__(heads, heads, hidden, kernel, residual)

    def forward(self, logits: Tensor) -> Tensor:
        b, h, m, n = logits.shape
        x = logits.transpose(1, 2).reshape(b * m, h, n)
        y = self.conv2(F.relu(self.conv1(x)))
        if self.residual:
            y = y + x
        return F.log_softmax(y.reshape(b, m, h, n).transpose(1, 2), dim=-1)


class PooledSelector(TokenSelector):
    """A cheap selector on per-key statistics (B, H, 2, N) -> (B, H, N): the predicted log of the
    next layer's attention averaged over queries (how much each key is attended), per head."""

    kind = "pooled"

    def __init__(self, heads: int, hidden: int = 64, kernel: int = 3, residual: bool = True):
        super().__init__(2 * heads, heads, hidden, kernel, residual)

    def forward(self, stats: Tensor) -> Tensor:
        b, h, s, n = stats.shape
        y = self.conv2(F.relu(self.conv1(stats.reshape(b, h * s, n))))
        if self.residual:
            y = y + stats[:, :, 0]
        return F.log_softmax(y, dim=-1)


SELECTORS = {"map": MapSelector, "pooled": PooledSelector}


def token_scores(logp: Tensor) -> Tensor:
    """Importance of every token (B, N): predicted attention it receives, over heads (and queries)."""
    p = logp.exp()
    return p.sum(dim=(1, 2)) if p.dim() == 4 else p.sum(dim=1)


# ----------------------------------------------------------------------------------------------
# select and restore


def topk_tokens(scores: Tensor, k: int, prefix: int) -> Tensor:
    """Positions (B, prefix + k): every prefix token, then the k best others in their original order."""
    top = scores[:, prefix:].topk(k, dim=1, sorted=False).indices.sort(dim=1).values + prefix
    if not prefix:
        return top
    head = torch.arange(prefix, device=scores.device).expand(scores.shape[0], -1)
    return torch.cat([head, top], dim=1)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """The selected tokens (B, m, C) of x (B, N, C)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(x: Tensor, idx: Tensor, y: Tensor) -> Tensor:
    """A copy of x with the selected positions replaced by y: bypassed tokens are x's, bit for bit."""
    return x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), y)
