"""SPA's tensor code: the token gate, the per-image selection, and the glue around pack/unpack.

Tokens flow through an SPA model as a *stream* whose rows are tokens of the original grid
(B, N0) — the images and token positions of the input::

    dense    x (B, N0, C)       every token; positions are implicit (pos None, valid None)
    packed   x (1, T, C)        the tokens still present, image by image (ops.packing.pack)
    padded   x (B, cap, C)      the same, per image in a static capacity (ops.packing.pack_padded)

``pos`` gives every row's original place as a flat index ``b * N0 + n`` (-1: an empty padded
slot) and ``valid`` (B, N0) which tokens are present. The gate scores rows; the selection runs on
the grid (per-image counts, min/max bounds, prefix tokens always kept); the chosen rows are packed
for the block::

    keep_rows, keep_grid, ste = gate(x, pos, valid)           # TokenGate, a submodule spa_gates.<i>
    xs, lengths, pos_s, ste_s, rows, filled = spa_pack(x, keep_rows, keep_grid, pos, ste, cap, layout)
    y = block(xs)                                             # attention isolated per image
    out = spa_unpack(xs, ste_s, keep_rows, rows, filled, x, y)     # bypass: all rows back in place
    out = straight_through(xs, ste_s, y)                      # prune: the stream stays packed

In training the gate samples its decision (Gumbel-sigmoid) and ``ste`` is ``s - s.detach()`` for
the sampled probability ``s``: zero in value, so outputs are exactly the hard selection's, while
the kept tokens' block update ``y - x`` carries the task loss's gradient back to the gate.
"""
from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenopt.ops.packing import pack, pack_padded, padded_layout, unpack, unpack_padded


# ----------------------------------------------------------------------------------------------
# rows <-> grid


def to_grid(values: Tensor, pos: Tensor | None, valid: Tensor | None, fill: float = 0.0) -> Tensor:
    """Row values (R0, R1) placed on the grid (B, N0) given by ``valid``'s shape; absent tokens
    get ``fill``. ``pos`` None: the rows are the grid already."""
    if pos is None:
        return values
    b, n = valid.shape
    flat = pos.reshape(-1)
    at = torch.where(flat < 0, b * n, flat)                     # empty slots write to a spare cell
    grid = values.new_full((b * n + 1,), fill).scatter(0, at, values.reshape(-1))
    return grid[:-1].reshape(b, n).masked_fill(~valid, fill)


def from_grid(grid: Tensor, pos: Tensor | None, fill=0) -> Tensor:
    """Grid values (B, N0) read at every row's position ``pos`` (R0, R1); empty slots get ``fill``."""
    if pos is None:
        return grid
    flat = torch.cat([grid.reshape(-1), grid.new_full((1,), fill)])
    at = torch.where(pos < 0, grid.numel(), pos)
    return flat[at]


# ----------------------------------------------------------------------------------------------
# selection


_stable_sort = [True]


@contextlib.contextmanager
def sorting_for_onnx():
    """Inside, :func:`top_count` orders by ``topk`` instead of a stable sort: torch's ONNX exporter
    has no ``sort.stable``, and ONNX TopK gives ties to the lower index, which is the order the
    stable sort gives. (Eager, compile and torch.export keep the stable sort.)"""
    _stable_sort[0] = False
    try:
        yield
    finally:
        _stable_sort[0] = True


def top_count(score: Tensor, candidate: Tensor, count: Tensor) -> Tensor:
    """(B, N) bool: per image the ``count[i]`` candidates (candidate (B, N) bool) of highest
    ``score`` (B, N); ties go to the earlier token."""
    s = score.masked_fill(~candidate, float("-inf"))
    if _stable_sort[0]:
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
    else:
        order = torch.topk(s, s.shape[1], dim=1).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return (rank < count[:, None]) & candidate


def select_tokens(prob: Tensor, valid: Tensor, prefix: int, threshold: float, lo: int, hi: int) -> Tensor:
    """SPA's decision per image: prob (B, N0) gate probabilities, valid (B, N0) tokens present ->
    keep (B, N0) bool. Prefix tokens (the first ``prefix``) are always kept; of the others, those
    with prob >= threshold, but never fewer than ``lo`` nor more than ``hi`` (the most probable
    ones fill up or stay), nor more than the image has."""
    position = torch.arange(prob.shape[1], device=prob.device)
    candidate = valid & (position >= prefix)
    count = ((prob >= threshold) & candidate).sum(1).clamp(lo, hi)
    keep = top_count(prob, candidate, count)
    return keep | (valid & (position < prefix))


def kept_counts(prob: Tensor, valid: Tensor, threshold: float, lo: int, hi: int) -> Tensor:
    """(n,) patch tokens :func:`select_tokens` keeps per image at ``threshold``: prob, valid (n, P)
    of the patch tokens only."""
    n_valid = valid.sum(1)
    above = ((prob >= threshold) & valid).sum(1)
    return torch.minimum(above.clamp(lo, hi), n_valid)


def threshold_for_share(prob: Tensor, valid: Tensor, lo: int, hi: int, target: float) -> tuple[float, float]:
    """The threshold at which :func:`select_tokens` keeps a mean share ``target`` of the patch tokens
    over these images, and the share it keeps there (the closest the images allow): prob, valid
    (n, P) of the patch tokens only; the share counts every one of the P positions.

    The share only grows as the threshold falls, so a bisection over the images' own probabilities
    (each one a threshold at which the kept set changes) finds the two neighbours of the target.
    """
    total = prob.shape[0] * prob.shape[1]
    cands = torch.unique(prob[valid].float()).flip(0)          # descending: shares non-decreasing
    top = float(cands[0]) if len(cands) else 0.5
    # above every probability: only the per-image minimum stays
    thresholds = [min(1.0, (top + 1.0) / 2) if top < 1.0 else 1.0 + 1e-6] + cands.tolist()

    def share(k: int) -> float:
        return float(kept_counts(prob, valid, thresholds[k], lo, hi).sum()) / total

    a, b = 0, len(thresholds) - 1
    if share(b) <= target:
        return thresholds[b], share(b)
    if share(a) >= target:
        return thresholds[a], share(a)
    while b - a > 1:                                           # share(a) < target < share(b)
        mid = (a + b) // 2
        if share(mid) < target:
            a = mid
        else:
            b = mid
    k = a if target - share(a) <= share(b) - target else b
    return thresholds[k], share(k)


def random_keep(valid: Tensor, prefix: int, fraction: float, hi: int, generator: torch.Generator | None = None) -> Tensor:
    """Benchmarks' forced gate: per image a random ``fraction`` of its present patch tokens
    (at most ``hi``), plus its prefix tokens. valid (B, N0) -> keep (B, N0) bool."""
    position = torch.arange(valid.shape[1], device=valid.device)
    candidate = valid & (position >= prefix)
    count = (candidate.sum(1).double() * fraction).round().long().clamp(max=hi)
    score = torch.rand(valid.shape, generator=generator).to(valid.device)
    return top_count(score, candidate, count) | (valid & (position < prefix))


def logistic_noise(like: Tensor) -> Tensor:
    """Logistic(0, 1) samples, the difference of two Gumbel(0, 1): Gumbel-sigmoid's noise."""
    u = torch.rand_like(like).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


@dataclass
class GateOutput:
    """What one gate decided in a forward pass, on the ORIGINAL token grid (B, N0).

    prob: gate probability (keeps its autograd graph; 0 where ``valid`` is False); valid: tokens
    present at that layer (False for tokens pruned earlier); keep: the hard decision.
    """

    prob: Tensor
    valid: Tensor
    keep: Tensor


class TokenGate(nn.Module):
    """SPA's gate: a linear layer on each token (``hidden`` > 0: a small MLP), sigmoid, and the
    per-image selection of :func:`select_tokens`.

    forward(x (R0, R1, C) stream rows, pos (R0, R1) | None, valid (B, N0) | None, context (B, N0) | None)
    -> (keep_rows (R0, R1) bool, keep_grid (B, N0) bool, ste (R0, R1) float | None, score (B, N0)).
    ``ste`` is None in eval mode. ``score`` is the gate's logit on the grid, after ``context`` (an
    earlier gate's score on this grid) was max-combined into it: what a later gate takes as context. ``trained`` is a buffer (saved with the model): False until gate training.
    ``threshold`` is a buffer too: the recipe's, or the one calibrated for ``target_keep`` (the mean
    share of patch tokens to keep, :func:`threshold_for_share`), so a saved model keeps its budget.
    """

    def __init__(self, dim: int, hidden: int = 0, threshold: float = 0.5, prefix: int = 0, lo: int = 0,
                 hi: int = 1 << 30, layer: int = 0, noise: float = 1.0, target_keep: float | None = None):
        super().__init__()
        self.score = nn.Linear(dim, 1) if hidden == 0 else nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.prefix, self.lo, self.hi, self.layer = prefix, lo, hi, layer
        self.target_keep = target_keep
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.temperature = 1.0          # Gumbel-sigmoid temperature in training
        # scale of the sampling noise in training; 0: the decision is inference's (prob >= threshold),
        # so fine-tuning sees the keep rate inference will (with noise it keeps more: see docs)
        self.noise = noise
        self.capture: dict | None = None           # set by capture_gate_outputs
        self.forced: tuple | None = None           # (fraction, generator), set by force_keep
        self.register_buffer("trained", torch.tensor(False))

    def extra_repr(self) -> str:
        target = f", target_keep={self.target_keep}" if self.target_keep is not None else ""
        return (f"threshold={float(self.threshold):.4g}{target}, prefix={self.prefix}, keep {self.lo}..{self.hi} "
                f"per image, noise={self.noise}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # artifacts saved before the threshold was a buffer: the recipe's threshold, as they ran
        state_dict.setdefault(prefix + "threshold", self.threshold.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def logits(self, x: Tensor) -> Tensor:
        """(R0, R1, C) -> (R0, R1)."""
        return self.score(x).squeeze(-1)

    def forward(self, x: Tensor, pos: Tensor | None = None, valid: Tensor | None = None,
                context: Tensor | None = None):
        if valid is None:
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        logit = to_grid(self.logits(x), pos, valid)
        if context is not None:     # gate context: previous, the paper's s = max(f(r), s_up)
            logit = torch.maximum(logit, context.to(logit.dtype))
        prob = torch.sigmoid(logit).masked_fill(~valid, 0.0)
        ste = None
        if self.forced is not None:
            keep = random_keep(valid, self.prefix, self.forced[0], self.hi, self.forced[1])
        elif self.training:
            noisy = logit + self.noise * logistic_noise(logit) if self.noise else logit
            sample = torch.sigmoid(noisy / self.temperature)
            keep = select_tokens(sample.detach(), valid, self.prefix, self.threshold, self.lo, self.hi)
            ste = from_grid(sample - sample.detach(), pos)
        else:
            keep = select_tokens(prob, valid, self.prefix, self.threshold, self.lo, self.hi)
        if self.capture is not None:
            self.capture[self.layer] = GateOutput(prob, valid, keep)
        return from_grid(keep, pos, False), keep, ste, logit


def pool_scores(score: Tensor, grid: tuple[int, int], to: tuple[int, int]) -> Tensor:
    """An earlier gate's score (B, h*w) on its grid ``grid``, max-pooled to the grid ``to`` (B, h2*w2):
    each cell takes the highest score of the cells it covers after patch merging (which pads an odd
    grid and halves it: a cell covers ceil(h / h2) x ceil(w / w2) of the earlier ones)."""
    (h, w), (h2, w2) = grid, to
    if (h, w) == (h2, w2):
        return score
    kh, kw = -(-h // h2), -(-w // w2)
    m = score.reshape(-1, 1, h, w)
    m = F.pad(m, (0, kw * w2 - w, 0, kh * h2 - h), value=float("-inf"))
    return F.max_pool2d(m, (kh, kw)).reshape(score.shape[0], h2 * w2)


# ----------------------------------------------------------------------------------------------
# around the block


def spa_pack(x: Tensor, keep_rows: Tensor, keep_grid: Tensor, pos: Tensor | None, ste: Tensor | None,
             capacity: int, layout: str):
    """Pack the kept rows of the stream x (R0, R1, C) for the block.

    Returns (xs, lengths (B,), pos_s, ste_s, rows, filled): xs (1, T, C) packed or (B, capacity, C)
    padded (see :func:`padded_layout`); pos_s the flat grid position of each of xs's rows (-1:
    empty slot); ste_s the straight-through term per row (None in eval); rows/filled
    (B, capacity) for :func:`~tokenopt.ops.packing.unpack_padded` (None when packed).
    """
    if pos is None:
        b, n = keep_grid.shape
        pos = torch.arange(b * n, device=x.device).reshape(b, n)
    lengths = keep_grid.sum(1)
    if not padded_layout(layout):
        xs, _ = pack(x, keep_rows)
        ste_s = None if ste is None else pack(ste, keep_rows)[0]
        return xs, lengths, pack(pos, keep_rows)[0], ste_s, None, None
    xs, rows, filled = pack_padded(x, keep_rows, capacity)
    pos_s = torch.where(filled, pos.gather(1, rows), -1)
    ste_s = None if ste is None else ste.gather(1, rows).masked_fill(~filled, 0.0)
    return xs, lengths, pos_s, ste_s, rows, filled


def straight_through(xs: Tensor, ste: Tensor | None, y: Tensor) -> Tensor:
    """The block's result y for the packed rows xs, plus ``ste * (y - xs)`` when training: zero in
    value (y exactly), the gate's gradient through it. xs, y (R0, R1, C); ste (R0, R1) | None."""
    if ste is None:
        return y
    return y + ste.unsqueeze(-1).to(y.dtype) * (y - xs)


def spa_unpack(xs: Tensor, ste: Tensor | None, keep_rows: Tensor, rows: Tensor | None, filled: Tensor | None,
               into: Tensor, y: Tensor) -> Tensor:
    """Bypass: the block's output rows y (shaped like xs) back into the stream ``into`` (R0, R1, C);
    rows the gate did not keep are ``into``'s, bit for bit."""
    y = straight_through(xs, ste, y)
    if rows is None:
        return unpack(y, keep_rows, into)
    return unpack_padded(y, rows, filled, into)


# ----------------------------------------------------------------------------------------------
# after the blocks (prune): pooling over the tokens each image kept


def stream_token(x: Tensor, lengths: Tensor, i: int, layout: str) -> Tensor:
    """Token ``i`` (a prefix token, always kept) of every image: x (1, T, C) packed or (B, cap, C)
    padded -> (B, C)."""
    if padded_layout(layout):
        return x[:, i]
    start = torch.cumsum(lengths, 0) - lengths
    return x[0, start + i]


def stream_mean(x: Tensor, lengths: Tensor, start: int, layout: str) -> Tensor:
    """Mean of every image's tokens from its ``start``-th on: x (1, T, C) packed or (B, cap, C)
    padded -> (B, C). Average pooling over the kept tokens only."""
    b = lengths.shape[0]
    if padded_layout(layout):
        slot = torch.arange(x.shape[1], device=x.device)
        w = ((slot >= start) & (slot < lengths[:, None])).to(x.dtype)
        return (x * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
    image = torch.repeat_interleave(torch.arange(b, device=x.device), lengths)
    slot = torch.arange(image.shape[0], device=x.device) - (torch.cumsum(lengths, 0) - lengths)[image]
    w = (slot >= start).to(x.dtype)
    total = x.new_zeros(b, x.shape[-1]).index_add(0, image, x[0] * w.unsqueeze(-1))
    return total / (lengths - start).clamp(min=1).unsqueeze(-1).to(x.dtype)


def count_from_fraction(value: int | float, free: int) -> int:
    """A min_keep/max_keep option as a token count out of ``free``: a float is a fraction (rounded
    up, so a small positive fraction keeps at least one), an int a count (capped at ``free``)."""
    if isinstance(value, float):
        return min(free, math.ceil(value * free - 1e-9))
    return min(free, value)


@contextlib.contextmanager
def capture_outputs(gates):
    """A dict that every forward pass through ``gates`` (TokenGate modules) fills while the block
    runs: layer index -> :class:`GateOutput` (prob, valid, keep on the original (B, N) grid; prob
    keeps its graph, so a loss on it reaches the gates)."""
    seen: dict = {}
    gates = list(gates)
    for m in gates:
        m.capture = seen
    try:
        yield seen
    finally:
        for m in gates:
            m.capture = None
