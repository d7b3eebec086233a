"""The cost model: what a schedule costs on this device, from latencies measured here.

Latency is not linear in the token count, so nothing is assumed: each block is cut out of the traced
model (``tokenopt.subgraph.extract_block``) in two parts, input -> merge point (the attention half,
which runs on the tokens a layer gets) and the whole block, and timed on random tokens at a grid of
counts, interleaved with the whole original model (same rounds, so a load that changes during the run
shifts them together). A reduction in layer ``i`` takes ``r_i`` tokens at the merge point, so

    seconds(schedule) = fixed + sum_i attn_i(n_i) + mlp_i(n_i - r_i) + overhead_m(n_i)   [r_i > 0]

with ``mlp = block - attn`` and ``fixed`` the rest of the model (embedding, head). An op-level layer
(merge around the attention, unmerge its output; the stream keeps its n tokens) costs
``attn_i(n_i - r_i) + mlp_i(n_i) + overhead_m(n_i)`` instead, and n stays for the next layer. Then whole rewritten
models are timed against the original (:func:`fit_probes`: no reduction; per method constant schedules;
a few seeded mixed ones) and fitted: ``fixed``, a scale on the blocks timed alone, and each method's
overhead per token it matches (:func:`fit_whole_model`).

Tables are cached per device, model shape, batch size and mode under ``<cache>/tune``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from tokenopt.paths import cache_root
from tokenopt.tuning.search import Cost, Schedule, reductions

COST_VERSION = 6


@dataclass
class CostTable:
    """Measured latencies (seconds per batch) and FLOPs (GFLOPs per image) of one model at one batch size."""

    batch: int
    compiled: bool
    prefix: int
    tokens: list[int]                  # the grid of token counts, descending; tokens[0] enters block 0
    attn: list[list[float]]            # [block][grid]: input -> merge point
    block: list[list[float]]           # [block][grid]: the whole block
    base_seconds: float                # the whole original model
    fixed_seconds: float               # the original minus its blocks
    attn_gflops: list[list[float]]
    block_gflops: list[list[float]]
    fixed_gflops: float
    overhead: dict[str, list[float]] = field(default_factory=dict)   # method -> [a, b]: a + b * n seconds
    # the blocks timed alone, brought to their time inside the rewritten model (fit_whole_model)
    block_scale: float = 1.0
    # "measured": attn/block hold seconds timed here; "flops": they hold GFLOPs (the timings were noise)
    basis: str = "measured"
    # the op-level methods (the stream keeps every token), each with the most one op merges (Space.op_caps)
    op_caps: dict[str, int] = field(default_factory=dict)

    # -- prediction -------------------------------------------------------------------------------
    def _at(self, values: list[float], n: float) -> float:
        """Linear interpolation on the grid (tokens descend), extrapolated from the nearest segment."""
        t = self.tokens
        if len(t) == 1:
            return values[0]
        for k in range(len(t) - 1):
            if n >= t[k + 1] or k == len(t) - 2:
                lo, hi = t[k + 1], t[k]
                w = (n - lo) / (hi - lo)
                return max(values[k + 1] + w * (values[k] - values[k + 1]), 0.0)
        return values[-1]

    def layers(self, schedule: Schedule):
        """`reductions` of ``schedule`` on this table's model: (method, r, n, op_level) per layer."""
        return reductions(schedule, self.tokens[0], self.prefix, self.op_caps)

    def _block(self, i: int, n: int, r: int, op_level: bool, attn: list, block: list) -> float:
        """Layer ``i`` entered by ``n`` tokens: stream-level, its attention half runs on n and the rest on
        n - r; op-level, its attention on n - r and the rest on all n (the stream keeps them)."""
        att_n, whole = (n - r, n) if op_level else (n, n - r)
        return self._at(attn[i], att_n) + self._at(block[i], whole) - self._at(attn[i], whole)

    def predict(self, schedule: Schedule) -> Cost:
        seconds, gflops, overhead = 0.0, self.fixed_gflops, 0.0
        for i, (method, r, n, op_level) in enumerate(self.layers(schedule)):
            seconds += self._block(i, n, r, op_level, self.attn, self.block)
            gflops += self._block(i, n, r, op_level, self.attn_gflops, self.block_gflops)
            if r > 0:
                a, b = self.overhead.get(method, (0.0, 0.0))
                overhead += a + b * n
        seconds = self.fixed_seconds + self.block_scale * seconds + overhead
        return Cost(self.base_seconds / seconds, seconds, gflops)


# ------------------------------------------------------------------------------------------------
# measuring

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores-{torch.get_num_threads()}threads"


def model_key(model: torch.nn.Module, image_shape: tuple[int, ...]) -> str:
    """What the latency depends on: the parameters' names and shapes and the image size (not the values)."""
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    text = repr((type(model).__name__, shapes, tuple(image_shape), torch.__version__))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def cache_path(model, images: torch.Tensor, batch: int, compiled: bool) -> os.PathLike:
    dev = device_name(images.device)
    key = f"{model_key(model, tuple(images.shape[1:]))}-{dev}-b{batch}-{'compiled' if compiled else 'eager'}"
    return cache_root() / "tune" / f"v{COST_VERSION}-{key}.json"


def load_cached(path) -> CostTable | None:
    try:
        return CostTable(**json.loads(open(path).read()))
    except (OSError, ValueError, TypeError):
        return None


def save_cached(table: CostTable, path) -> None:
    from tokenopt.files import atomic_write

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, "w") as f:
        f.write(json.dumps(asdict(table)))


def token_grid(tokens: int, prefix: int, points: int = 8) -> list[int]:
    """``tokens`` down to a few above the prefix, ``points`` counts, descending."""
    low = prefix + 2
    values = {round(tokens - (tokens - low) * k / (points - 1)) for k in range(points)}
    return sorted((v for v in values if v >= low), reverse=True)


def _timer(fn: Callable, compiled: bool):
    return torch.compile(fn) if compiled else fn


GRID_POINTS = 16      # token counts each block is timed at: latency has steps (cache sizes, kernel tiles)
# Whole models are timed in ROUNDS interleaved rounds, each sample at least SAMPLE_SECONDS of calls. One call
# of a demo ViT at batch 64 (60 ms) per sample, 5 rounds, moved a speedup by 10-15% from one session to the
# next on this 2-core machine (ToMe r=4 on demo:digits: 1.38x, then 1.15x); longer samples average it out.
ROUNDS = 7
SAMPLE_SECONDS = 0.15


def measure_table(model, analysis, batch_images: torch.Tensor, compiled: bool = False, rounds: int = 5,
                  status: Callable[[str], None] | None = None, points: int = GRID_POINTS) -> CostTable:
    """Time each distinct block at ``points`` token counts next to the whole original (see the module doc).

    Blocks of the same width and token count share one measurement: a ViT's blocks are the same shape.
    Each block's time is its median ratio to the original timed in the same round, times the original's
    fastest round: a load that comes and goes during the measurement slows both calls of a round."""
    from tokenopt.flops import count_flops
    from tokenopt.subgraph import extract_block
    from tokenopt.timing import interleaved_times

    blocks = analysis.blocks
    B, prefix = batch_images.shape[0], analysis.prefix_tokens
    grid = token_grid(blocks[0].tokens, prefix, points)
    shape_of = {}
    for b in blocks:
        shape_of.setdefault((b.dim, b.tokens), b)
    calls: dict[str, Callable] = {"original": _timer(model, compiled)}
    parts = {}
    dev = batch_images.device
    dtype = batch_images.dtype if batch_images.is_floating_point() else torch.float32
    flops: dict[tuple, float] = {}
    for key, b in shape_of.items():
        whole = extract_block(analysis.graph, b, analysis.index)
        half = extract_block(analysis.graph, replace(b, output=b.merge_point), analysis.index)
        parts[key] = (half, whole)
        for n in grid:
            x = torch.randn(B, n, b.dim, device=dev, dtype=dtype, generator=None)
            for name, gm in (("attn", half), ("block", whole)):
                f = _timer(gm, compiled)
                calls[f"{key}/{name}/{n}"] = (lambda _, f=f, x=x: f(x))
                flops[(key, name, n)] = count_flops(gm, x[:1]) / 1e9
    if status:
        status(f"timing {len(shape_of)} block shape(s) at {len(grid)} token counts, batch {B}")
    times = interleaved_times(calls, batch_images, rounds=rounds, min_seconds=0.05)
    # the original's fastest round (on a shared machine noise only ever adds time), and every part as its
    # ratio to the original in the same round
    base = min(times["original"])
    med = {k: base * statistics.median(t / o for t, o in zip(v, times["original"])) for k, v in times.items()}
    keys = [(b.dim, b.tokens) for b in blocks]
    attn = [_monotone([med[f"{k}/attn/{n}"] for n in grid]) for k in keys]
    block = [_monotone([med[f"{k}/block/{n}"] for n in grid]) for k in keys]
    attn_g = [[flops[(k, "attn", n)] for n in grid] for k in keys]
    block_g = [[flops[(k, "block", n)] for n in grid] for k in keys]
    total_gflops = count_flops(model, batch_images[:1]) / 1e9
    return CostTable(batch=B, compiled=compiled, prefix=prefix, tokens=grid, attn=attn, block=block,
                     base_seconds=base, fixed_seconds=max(base - sum(v[0] for v in block), 0.0),
                     attn_gflops=attn_g, block_gflops=block_g,
                     fixed_gflops=max(total_gflops - sum(v[0] for v in block_g), 0.0))


def _monotone(values: list[float]) -> list[float]:
    """Latencies on a descending token grid, made non-increasing: fewer tokens never cost more (a
    measurement that says so is noise)."""
    out = list(values)
    for k in range(len(out) - 2, -1, -1):
        out[k] = max(out[k], out[k + 1])
    return out


def measure_overhead(table: CostTable, original, build: Callable[[Schedule], torch.nn.Module], methods: list[str],
                     layers: int, batch_images: torch.Tensor, rounds: int = ROUNDS,
                     allowed: Callable[[int], bool] = lambda i: True) -> None:
    """Fit the whole-model terms on whole models (:func:`fit_probes`) timed against the original in the
    same rounds. Least squares, no coefficient below 0, on

        seconds = fixed + scale * blocks(schedule) + sum_m b_m * (tokens entering m's reducing layers)

    ``scale`` brings the blocks timed alone to their time inside the model (their inputs were random, the
    calls that do nothing are gone from the rewritten model, the cache holds less); ``b_m`` is the
    method's overhead per token it matches. Compiled, each probe is a compile (tens of seconds on a
    CPU), so fewer are timed."""
    from tokenopt.timing import interleaved_times, per_round_speedup

    probes = fit_probes(table, methods, layers, allowed, compiled=table.compiled)
    calls = {"original": original, **{k: build(s) for k, s in probes.items()}}
    if table.compiled:
        calls = {k: torch.compile(f) for k, f in calls.items()}
    speed = per_round_speedup(interleaved_times(calls, batch_images, rounds=rounds, min_seconds=SAMPLE_SECONDS),
                              "original")
    fit_whole_model(table, [(s, table.base_seconds / speed[k]) for k, s in probes.items()], methods)


RANDOM_PROBES = 8


def fit_probes(table: CostTable, methods: list[str], layers: int, allowed: Callable[[int], bool] = lambda i: True,
               seed: int = 0, compiled: bool = False) -> dict[str, Schedule]:
    """The whole models the fit is measured on: the rewritten model without reduction; per method a
    constant r that shortens the stream and twice that r in every other layer (half the layers pay the
    op); and ``RANDOM_PROBES`` seeded mixed schedules, r up to a quarter of the tokens per layer, methods
    side by side, as the search's schedules have them. An op-level method (``table.op_caps``) never
    shortens the stream, so its constant r is half its cap and its mixed r reach the cap. ``compiled``:
    no every-other probes and two mixed ones (each probe is a compile).

    No r = 1 probes: a schedule that pays every op and saves nothing is one the search never keeps, and
    fitted on, it pulled the predictions of the schedules it does keep 10-20% low (measured on the
    digits-clutter demo: mean error 4.8% with them, 3.3% without, the same timings)."""
    n0 = table.tokens[0]
    r_big = max(1, (n0 - table.prefix) // (2 * layers))
    probes: dict[str, Schedule] = {"rewritten": tuple(("", 0) for _ in range(layers))}
    for m in methods:
        big = max(1, table.op_caps[m] // 2) if m in table.op_caps else r_big
        probes[f"{m}/{big}"] = tuple((m, big) if allowed(i) else ("", 0) for i in range(layers))
        if compiled:
            continue
        probes[f"{m}/{2 * big} every other"] = tuple((m, 2 * big) if allowed(i) and i % 2 == 0 else ("", 0)
                                                     for i in range(layers))
    rng = random.Random(seed)
    top = max(1, (n0 - table.prefix) // 4)

    def mixed_layer() -> tuple[str, int]:
        m = rng.choice(methods)
        return m, rng.randint(0, table.op_caps.get(m, top))

    for k in range(2 if compiled else RANDOM_PROBES):
        probes[f"mixed {k}"] = tuple(mixed_layer() if allowed(i) else ("", 0) for i in range(layers))
    return probes


def fit_whole_model(table: CostTable, measured: list[tuple[Schedule, float]], methods: list[str]) -> None:
    """Set ``fixed_seconds``, ``block_scale`` and each method's overhead from (schedule, seconds) pairs; an
    op-level method's overhead (its matching, the merge before its op and the unmerge after) is fitted the
    same way, per token entering its layers.

    The blocks are priced either by their times measured alone (``basis`` "measured") or by their FLOPs
    scaled to seconds ("flops"); the fit takes the basis that predicts each whole model better when that
    model is left out of the fit (the blocks' times alone come from a session of their own and can carry
    its machine state, FLOPs do not drift; measured on digits-clutter, the two predicted whole models
    timed in one session equally well, 3.3% against 2.8%, and blocks timed in another session of the
    same machine ran 0.6 to 1.07 of their time in the model), and falls back to FLOPs when the blocks
    timed alone are more than 2x off the whole models."""
    if table.basis == "measured" and len(measured) > len(methods) + 3:
        flops = replace(table, basis="flops", attn=table.attn_gflops, block=table.block_gflops)
        if _left_out_error(flops, measured, methods) < 0.8 * _left_out_error(table, measured, methods):
            table.basis, table.attn, table.block = "flops", table.attn_gflops, table.block_gflops
    _fit(table, measured, methods)
    if table.basis == "measured" and not 0.5 <= table.block_scale <= 2.0:
        # the blocks timed alone disagree with the whole models by more than 2x: the machine was too busy
        # for short timings to mean anything. Price the blocks by their FLOPs instead, scaled to the
        # whole models (timed as ratios to the original in the same rounds, which survive the load)
        table.basis = "flops"
        table.attn, table.block = table.attn_gflops, table.block_gflops
        _fit(table, measured, methods)


def _left_out_error(table: CostTable, measured: list[tuple[Schedule, float]], methods: list[str]) -> float:
    """Mean relative error of each whole model's seconds predicted by a fit on the others."""
    errs = []
    for k, (s, seconds) in enumerate(measured):
        t = replace(table)
        _fit(t, measured[:k] + measured[k + 1:], methods)
        errs.append(abs(t.predict(s).seconds - seconds) / seconds)
    return sum(errs) / len(errs)


def _fit(table: CostTable, measured: list[tuple[Schedule, float]], methods: list[str]) -> None:
    rows, ys = [], []
    for s, seconds in measured:
        table.block_scale, table.fixed_seconds, table.overhead = 1.0, 0.0, {}
        blocks = table.predict(s).seconds
        matched = {m: 0.0 for m in methods}
        for m, r, n, _ in table.layers(s):
            if r > 0:
                matched[m] += n
        rows.append([1.0, blocks] + [matched[m] for m in methods])
        ys.append(seconds)
    coef = _nonnegative_least_squares(rows, ys)
    table.fixed_seconds, table.block_scale = coef[0], coef[1]
    table.overhead = {m: [0.0, c] for m, c in zip(methods, coef[2:])}


def _nonnegative_least_squares(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0: drop the most negative and solve again (an active set)."""
    A, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    free = list(range(A.shape[1]))
    coef = torch.zeros(A.shape[1], dtype=torch.float64)
    while free:
        sol = torch.linalg.lstsq(A[:, free], y[:, None]).solution[:, 0]
        if (sol >= 0).all():
            coef[free] = sol
            break
        free.pop(int(sol.argmin()))
    return coef.tolist()
