"""tune(): measure the cost model, search, then measure the chosen recipe for real.

    result = tokenopt.tune(model, "digits", budget="speed=1.5")
    result.recipe             # {"version": 1, "rules": [...]}, for tokenopt.optimize
    result.measured_speedup   # timed here against the original, same rounds
"""
from __future__ import annotations

import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tokenopt.errors import DataError, TokenoptError
from tokenopt.tuning import cost as cost_
from tokenopt.tuning import quality
from tokenopt.tuning.budget import Budget, BudgetError, parse_budget
from tokenopt.tuning.methods import MethodError, choose, describe, rules_of
from tokenopt.tuning.search import Cost, Judged, Point, Schedule, Searcher, Space

SLACK = 0.03          # a measured speed within 3% of the budget meets it (timing noise on a shared machine)
# when every schedule judged falls short once the predictions are corrected by what was measured: the
# greedy moves judged beyond the search's own. A move judges about 4 schedules, so 32 buy about 8 moves
# of a layer's step: the 10-20% a measured speed can fall below its prediction on a shared machine
EXTRA_JUDGED = 32


@dataclass
class Measured:
    """A model timed for real against the original in the same rounds."""

    name: str
    speedup: float
    gflops: float
    judged: Judged
    predicted: float | None = None     # the cost model's speedup (tuned schedules only)
    kind: str = "tuned"                # "tuned" | "shipped" | "constant"


@dataclass
class TuneResult:
    budget: Budget
    recipe: dict
    schedule: Schedule
    chosen: Measured
    original: Measured
    points: list[Point]
    measured: list[Measured]
    table: cost_.CostTable
    score_name: str
    seconds: float
    device: str
    mode: str
    calibration_images: int
    notes: list[str] = field(default_factory=list)

    @property
    def measured_speedup(self) -> float:
        return self.chosen.speedup

    @property
    def prediction_error(self) -> float:
        """(predicted - measured) / measured speedup of the chosen schedule."""
        return (self.chosen.predicted - self.chosen.speedup) / self.chosen.speedup


def _calibration(data, model, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(images, labels or None, where) from a data set name, a Dataset, images, or (images, labels)."""
    if isinstance(data, torch.Tensor):
        return data[:n], None, "the images given"
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data[0][:n], data[1][:n], "the images given"
    where = "the data"
    if isinstance(data, (str, Path)):
        from tokenopt.data import get_dataset
        where = f"data set '{data}' (train split)"
        data = get_dataset(data, "train", model=model)
    if len(data) < quality.MIN_IMAGES:
        raise DataError(f"{where} has {len(data)} image(s); tune needs at least {quality.MIN_IMAGES} calibration "
                        "images to measure agreement with the original (give a larger data set)")
    # a seeded sample: a data set sorted by class would give its first n images one class
    idx = sorted(random.Random(seed).sample(range(len(data)), min(n, len(data))))
    items = [data[i] for i in idx]
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([int(it[1]) for it in items]) if len(items[0]) > 1 else None
    return images, labels, where


def _timing_batch(images: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // len(images))
    return images.repeat(reps, *([1] * (images.dim() - 1)))[:batch]


def tune(model: torch.nn.Module, data, budget: Budget | str, *, methods: list[str] | None = None,
         batch_size: int = 64, compile: bool = False, seed: int = 0, calibration_images: int = 256,
         search_seconds: float = 120.0, max_judged: int = 90, compare: bool = True,
         progress: Callable[[int, int, Point | None], None] | None = None,
         status: Callable[[str], None] | None = None) -> TuneResult:
    """The most accurate schedule of the training-free token reductions that meets ``budget`` on this
    machine, at ``batch_size``, eager or compiled (``compile``).

    data: a data set name (its train split), a Dataset of (image, label), a batch of images, or
        (images, labels); ``calibration_images`` of it (a seeded sample) judge quality.
    budget: ``"speed=1.5"``, ``"latency=30ms"``, ``"gflops=2.5"`` or a `Budget`.
    methods: pass names (the stream-level methods the pass offers the tuner) or method names (also the
        op-level ones, e.g. ``tome-op``: merge around the attention, the stream keeps every token); default:
        every stream-level method.
    search_seconds, max_judged: stop the search after this long or this many schedules judged (the
        result is deterministic under ``seed`` unless the time runs out first).
    compare: also time the shipped recipes of those passes and constant-r schedules of the first
        method (for the Pareto plot).
    """
    from tokenopt.analysis import analyse
    from tokenopt.flops import count_flops
    from tokenopt.pipeline import optimize

    t0 = time.perf_counter()
    say = status or (lambda _: None)
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    try:
        chosen_methods = choose(methods)
    except MethodError as e:
        raise TokenoptError(f"--methods: {e}") from None
    model.eval()
    images, labels, where = _calibration(data, model, calibration_images, seed)
    batch = _timing_batch(images, batch_size)
    ref = quality.reference(model, images, labels, batch=batch_size, where=where)

    say("tracing")
    analysis = analyse(model, images[:2])
    L, prefix = len(analysis.blocks), analysis.prefix_tokens
    allowed = tuple(b.refusal is None and not b.keeps_tokens for b in analysis.blocks)
    if not any(allowed):
        raise TokenoptError("no block of this model can lose tokens (see `tokenopt inspect`); there is nothing to tune")
    tokens = analysis.blocks[0].tokens
    # op-level methods keep the stream: each layer's cap is the pass's own (TuneMethod.cap)
    op_caps = {m: t.cap(tokens, prefix) for m, t in chosen_methods.items() if t.keeps_stream}
    space = Space(L, tokens, prefix, tuple(chosen_methods), allowed, op_caps)

    def build(s: Schedule):
        rules = rules_of(space.normalize(s), chosen_methods, tokens)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # r capped at a layer: the schedule says so already
            return optimize(model, {"version": 1, "rules": rules}, images[:2], report=False)

    def timed(m):
        return torch.compile(m) if compile else m

    # -- the cost model ----------------------------------------------------------------------------
    path = cost_.cache_path(model, batch, batch_size, compile)
    table = cost_.load_cached(path)
    if table is None or table.tokens[0] != space.tokens:
        say("measuring each block's latency against its token count")
        table = cost_.measure_table(model, analysis, batch, compiled=compile)
    table.op_caps = {**table.op_caps, **op_caps}
    missing = [m for m in chosen_methods if m not in table.overhead]
    if missing:
        say(f"measuring the cost of {', '.join(missing)}")
        cost_.measure_overhead(table, timed(model), lambda s: timed(build(s)), list(chosen_methods), L, batch,
                               allowed=lambda i: allowed[i])
        cost_.save_cached(table, path)

    def met(c: Cost, slack: float = 0.0) -> bool:
        return budget.met(c.speedup, table.base_seconds, c.gflops, slack)

    def judge(s: Schedule) -> Judged:
        return quality.judge(ref, build(s))

    # -- reachable at all? ----------------------------------------------------------------------------
    fastest = [space.normalize((m, space.tokens) for _ in range(L)) for m in chosen_methods]
    best_fast = max(fastest, key=lambda s: table.predict(s).speedup)
    if not met(table.predict(best_fast), SLACK):
        _check_reachable(budget, model, build(best_fast), best_fast, batch, judge(best_fast), ref.score_name, table,
                           timed, table.predict(best_fast).gflops, slack=SLACK)

    # -- search ------------------------------------------------------------------------------------------
    deadline = time.perf_counter() + search_seconds
    done = [0]

    def report(p: Point, best: Point | None) -> None:
        done[0] += 1
        if progress:
            progress(done[0], max_judged, best)

    searcher = Searcher(space, table.predict, judge, met, seed=seed, max_judged=max_judged, progress=report,
                        out_of_time=lambda: time.perf_counter() > deadline)
    points = searcher.run()
    notes = []
    if table.basis != "measured":
        notes.append("the cost model prices blocks by their FLOPs, scaled to whole models timed against the original: "
                     "that predicted the whole models better than the blocks' own timings (a busy machine?)")
    if searcher.out_of_time():
        notes.append(f"the search stopped at its time limit ({search_seconds:.0f} s) after {len(points)} schedules")

    # -- measure for real ----------------------------------------------------------------------------
    original = Measured("original", 1.0, count_flops(model, images[:1]) / 1e9, quality.judge(ref, model), 1.0,
                        "original")
    references = _references(model, chosen_methods, build, images, space, ref) if compare else {}
    chosen, measured = None, []
    correction, tried = 1.0, set()
    for attempt in range(5):
        def corrected(c: Cost) -> bool:
            return met(_scaled(c, correction))

        # once a schedule meets the budget for real, only one of lower loss is worth timing
        bar = chosen[0].judged.loss if chosen else None
        pool = _pool(points, tried, corrected, bar)
        if not pool and chosen is None:
            # the predictions were optimistic past every schedule judged: a few more greedy moves from the
            # best, whatever the time limit said
            searcher.met, searcher.out_of_time = corrected, (lambda: False)
            best = min(points, key=lambda p: (not corrected(p.cost), p.judged.loss))
            searcher.max_judged = len(searcher.points) + EXTRA_JUDGED
            searcher.greedy(start=best)
            points = list(searcher.points.values())
            pool = _pool(points, tried, corrected, bar)
        if not pool:
            break
        say(f"timing the {len(pool)} best schedules against the original")
        tried |= {p.schedule for p in pool}
        models = {describe(p.schedule): build(p.schedule) for p in pool}
        extra = references if attempt == 0 else {}
        speed = _speeds(model, {**models, **{k: m for k, (m, _) in extra.items()}}, batch, timed)
        for k, (m, (kind, j)) in extra.items():
            measured.append(Measured(k, speed[k], count_flops(m, images[:1]) / 1e9, j, None, kind))
        this = [Measured(describe(p.schedule), speed[describe(p.schedule)],
                         count_flops(models[describe(p.schedule)], images[:1]) / 1e9, p.judged, p.cost.speedup)
                for p in pool]
        measured += this
        ok = [(p, m) for p, m in zip(pool, this) if budget.met(m.speedup, table.base_seconds, m.gflops, SLACK)]
        if ok and (chosen is None or ok[0][0].judged.loss < chosen[0].judged.loss):
            chosen = ok[0]
        # ask the predictions for the speed they missed (or gave away) here
        correction *= statistics.median(m.speedup / m.predicted for m in this)
        faster_than_asked = chosen and budget.kind != "gflops" and \
            budget.met(chosen[1].speedup, table.base_seconds, chosen[1].gflops, slack=-SLACK)
        if chosen and not faster_than_asked:
            break    # met, and not by more than the slack: no speed left to trade back for quality
    if chosen is None:
        tuned = [m for m in measured if m.kind == "tuned"]
        top = max(tuned, key=lambda m: m.speedup, default=None)
        raise BudgetError(f"budget {budget} not reached: the fastest schedule timed ran "
                          f"{top.speedup:.2f}x at {ref.score_name} {100 * top.judged.score:.1f}% "
                          f"({top.name}); ask for less" if top else f"budget {budget} not reached; ask for less")
    point, m = chosen
    m.name = "tuned"
    recipe = {"version": 1, "rules": rules_of(point.schedule, chosen_methods, tokens)}
    return TuneResult(budget, recipe, point.schedule, m, original, points, measured, table, ref.score_name,
                      time.perf_counter() - t0, cost_.device_name(batch.device), "compiled" if compile else "eager",
                      len(images), notes)


def _pool(points: list[Point], tried: set, met, below: float | None, size: int = 3) -> list[Point]:
    """The ``size`` lowest-loss schedules not timed yet that meet the budget by ``met`` (and have a loss
    ``below`` that one's, when given)."""
    return sorted((p for p in points if p.schedule not in tried and met(p.cost) and (below is None or
                                                                                      p.judged.loss < below)),
                  key=lambda p: (p.judged.loss, -p.cost.speedup))[:size]


def _scaled(c: Cost, factor: float) -> Cost:
    return Cost(c.speedup * factor, c.seconds / factor, c.gflops)


def _speeds(model, models: dict, batch: torch.Tensor, timed, rounds: int = cost_.ROUNDS) -> dict[str, float]:
    from tokenopt.timing import interleaved_times, per_round_speedup

    calls = {"original": timed(model), **{k: timed(m) for k, m in models.items()}}
    return per_round_speedup(interleaved_times(calls, batch, rounds=rounds, min_seconds=cost_.SAMPLE_SECONDS),
                             "original")


def _references(model, methods: dict, build, images, space: Space, ref) -> dict:
    """name -> (module, (kind, judged)): the shipped recipes that use only the tuned passes and learn nothing,
    and constant-r schedules of the first method."""
    from tokenopt.passes import get_pass
    from tokenopt.paths import SHIPPED_RECIPES
    from tokenopt.pipeline import optimize
    from tokenopt.recipe import load_recipe

    passes = {rule["pass"] for t in methods.values() for rule in t.rules([0], [1], space.tokens)}
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(SHIPPED_RECIPES.glob("*.yaml")):
            rec = load_recipe(path)
            if all(r.pass_name in passes and get_pass(r.pass_name).learned is None for r in rec.rules):
                m = optimize(model, rec, images[:2], calibration=images[:64], report=False)
                out[path.stem] = (m, ("shipped", quality.judge(ref, m)))
        first = next(iter(methods))
        top = (space.tokens - space.prefix) // space.layers
        for r in sorted({max(1, round(top * f)) for f in (0.5, 1.0, 1.5, 2.0)}):
            s = space.normalize((first, r) for _ in range(space.layers))
            m = build(s)
            out[f"{first} r={r}"] = (m, ("constant", quality.judge(ref, m)))
    return out


def _check_reachable(budget, model, fastest_model, fastest: Schedule, batch, judged: Judged, score_name: str,
                       table, timed, gflops: float, slack: float):
    """The cost model says even the fastest schedule misses ``budget``: time it, and unless it makes the
    budget after all, refuse with what it reached."""
    speed = _speeds(model, {"fastest": fastest_model}, batch, timed)["fastest"]
    if budget.met(speed, table.base_seconds, gflops, slack):
        return
    raise BudgetError(
        f"budget {budget} is out of reach on this machine: the fastest schedule ({describe(fastest)}) measured "
        f"{speed:.2f}x (predicted {table.predict(fastest).speedup:.2f}x; {table.base_seconds / speed * 1e3:.1f} ms "
        f"per batch of {table.batch}, {gflops:.4f} GFLOPs per image) at {score_name} {100 * judged.score:.1f}%; "
        "ask for less")
