"""The search over per-layer schedules: which layers reduce, by how many tokens, with which method.

A schedule is one ``(method, r)`` per layer (``("", 0)``: the layer keeps its tokens); a stream-level
method's r leaves the stream from that layer on, an op-level one's (``Space.op_caps``) is merged around
the layer's attention and given back after it (`reductions`). The search
sees the model only through two functions, so it runs on synthetic ones in the tests:

    predict(schedule) -> Cost(speedup, seconds, gflops)    cheap: the measured cost model
    judge(schedule)   -> Judged(loss, score)              costly: rewrites and runs the model

Three stages, each recording every schedule it judged:

1. seeds: for each method, and for each pair of methods split at half depth, a constant and a
   decreasing schedule scaled to the smallest size that meets the budget;
2. greedy: from no reduction, the move (add ``step`` tokens at one layer, with one method) that buys
   the most predicted speed per unit of loss, until the budget is met with some margin;
3. local refinement from the best schedule that meets the budget: move tokens from one layer to
   another, switch a layer's method, or take tokens back (repaired, when that misses the budget, by
   the fewest tokens added at one other layer), keeping the first change that lowers the loss; until
   a whole round of moves finds none or the judging budget is spent.

Deterministic under a seed: the seed only orders the refinement's moves.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

from tokenopt.ops.matching import max_reduction

Schedule = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Cost:
    speedup: float      # over the original, at the batch size measured
    seconds: float      # per batch
    gflops: float       # per image


@dataclass(frozen=True)
class Judged:
    loss: float         # lower is better; smooth (what the moves compare)
    score: float        # what the user reads: top-1, agreement, or 1 - output distance
    detail: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Point:
    schedule: Schedule
    cost: Cost
    judged: Judged
    stage: str          # "seed", "greedy" or "refine"


def reductions(schedule, tokens: int, prefix: int, op_caps: dict[str, int],
               may_reduce: Callable[[int], bool] = lambda i: True):
    """Each layer of ``schedule`` as ``(method, r, n, op_level)``, ``n`` the tokens entering it and ``r`` capped
    at what it can take (``("", 0, n, False)`` where it takes nothing). A stream-level layer takes at most
    half its unprotected tokens and later layers see ``n - r``; an op-level one (a method of ``op_caps``:
    method -> the most one op merges at the model's ``tokens``) takes at most its cap and leaves ``n`` as it
    is. An op-level layer after a stream-level reduction takes nothing: its matching needs the whole token
    grid (the planner refuses it)."""
    n = tokens
    for i, (m, r) in enumerate(schedule):
        op_level = m in op_caps
        cap = (op_caps[m] if n == tokens else 0) if op_level else max_reduction(n, prefix)
        r = min(max(int(r), 0), cap) if may_reduce(i) else 0
        if r <= 0:
            yield "", 0, n, False
            continue
        yield m, r, n, op_level
        if not op_level:
            n -= r


@dataclass(frozen=True)
class Space:
    """What a schedule may hold: ``layers`` blocks entered by ``tokens`` tokens, ``prefix`` of them never
    reduced, one of ``methods`` per reducing layer; ``allowed`` (per layer): whether it may reduce;
    ``op_caps``: the op-level methods (the stream keeps its tokens), each with the most one op merges."""

    layers: int
    tokens: int
    prefix: int
    methods: tuple[str, ...]
    allowed: tuple[bool, ...] = ()
    op_caps: dict[str, int] = field(default_factory=dict)

    def may_reduce(self, i: int) -> bool:
        return not self.allowed or self.allowed[i]

    def normalize(self, schedule) -> Schedule:
        """The canonical form: each r capped at what its layer can take (`reductions`), no method where r is
        0, so two schedules that run the same model compare equal."""
        return tuple((m, r) for m, r, _, _ in reductions(schedule, self.tokens, self.prefix, self.op_caps,
                                                         self.may_reduce))

    def step(self) -> int:
        """Tokens one greedy move adds at a layer: about a sixth of what the whole depth can take at once."""
        return max(1, math.ceil((self.tokens - self.prefix) / (3 * self.layers)))

    def none(self) -> Schedule:
        return tuple(("", 0) for _ in range(self.layers))


class Searcher:
    """One search: caches judgements, counts them, records every judged schedule as a Point."""

    def __init__(self, space: Space, predict: Callable[[Schedule], Cost], judge: Callable[[Schedule], Judged],
                 met: Callable[[Cost], bool], *, seed: int = 0, max_judged: int = 120,
                 progress: Callable[[Point, Point | None], None] | None = None,
                 out_of_time: Callable[[], bool] = lambda: False):
        self.space, self.predict, self._judge, self.met = space, predict, judge, met
        self.rng = random.Random(seed)
        self.max_judged = max_judged
        self.progress = progress
        self.out_of_time = out_of_time
        self.points: dict[Schedule, Point] = {}
        self._costs: dict[Schedule, Cost] = {}

    # -- bookkeeping ------------------------------------------------------------------------------
    def cost(self, s: Schedule) -> Cost:
        if s not in self._costs:
            self._costs[s] = self.predict(s)
        return self._costs[s]

    def exhausted(self) -> bool:
        return len(self.points) >= self.max_judged or self.out_of_time()

    def judge(self, s: Schedule, stage: str) -> Point | None:
        """The judged point of ``s`` (from the cache when judged before); None once the budget is spent."""
        s = self.space.normalize(s)
        if s in self.points:
            return self.points[s]
        if self.exhausted():
            return None
        p = Point(s, self.cost(s), self._judge(s), stage)
        self.points[s] = p
        if self.progress:
            self.progress(p, self.best())
        return p

    def best(self, margin: float = 1.0) -> Point | None:
        """The lowest-loss judged point that meets the budget (ties: the faster, then the earlier)."""
        ok = [p for p in self.points.values() if self.met(p.cost)]
        return min(ok, key=lambda p: (p.judged.loss, -p.cost.speedup), default=None)

    # -- stage 1 ------------------------------------------------------------------------------------
    def shapes(self) -> list[Callable[[int, int], float]]:
        """Relative r per layer: constant, and falling linearly to a quarter of the first layer's."""
        L = self.space.layers
        return [lambda i, k: k, lambda i, k: k * (1 - 0.75 * i / max(L - 1, 1))]

    def scaled(self, shape, methods_of: Callable[[int], str]) -> Schedule | None:
        """The smallest scale of ``shape`` whose predicted cost meets the budget (None: not even the largest)."""
        top = self.space.tokens - self.space.prefix
        for k in range(1, top + 1):
            s = self.space.normalize((methods_of(i), round(shape(i, k))) for i in range(self.space.layers))
            if self.met(self.cost(s)):
                return s
        return None

    def seeds(self) -> None:
        ms, half = self.space.methods, self.space.layers // 2
        assignments = [lambda i, m=m: m for m in ms]
        assignments += [lambda i, a=a, b=b: a if i < half else b for a in ms for b in ms if a != b]
        for shape in self.shapes():
            for assign in assignments:
                s = self.scaled(shape, assign)
                if s is not None:
                    self.judge(s, "seed")

    # -- stage 2 ------------------------------------------------------------------------------------
    def greedy(self, overshoot: float = 1.08, looks: int = 4, start: Point | None = None) -> None:
        """Add tokens where they buy the most predicted speed per unit of loss, past the budget by
        ``overshoot`` (faster schedules in reserve, for when the measured speed falls short). From no
        reduction, or from ``start``.

        Lazy: a move's ratio from an earlier step is an estimate; each step judges the moves in the
        order of their estimates and takes one whose fresh ratio is at least the next estimate (or the
        best fresh one after ``looks`` judgements), as lazy greedy algorithms do."""
        cur = start or self.judge(self.space.none(), "greedy")
        d = self.space.step()
        estimate: dict[tuple[int, str], float] = {}
        while cur is not None and not self._past_budget(cur.cost, overshoot):
            moves = {}
            for i, (m, r) in enumerate(cur.schedule):
                for method in ([m] if r > 0 else self.space.methods):
                    s = self.space.normalize(cur.schedule[:i] + ((method, r + d),) + cur.schedule[i + 1:])
                    if s != cur.schedule:
                        moves[(i, method)] = s
            if not moves:
                return
            order = sorted(moves, key=lambda k: -estimate.get(k, math.inf))
            best, best_ratio, looked = None, -math.inf, 0
            for n, key in enumerate(order):
                p = self.judge(moves[key], "greedy")
                if p is None:
                    return
                gain = p.cost.speedup - cur.cost.speedup
                estimate[key] = gain / max(p.judged.loss - cur.judged.loss, 1e-6)
                if estimate[key] > best_ratio:
                    best, best_ratio = p, estimate[key]
                looked += 1
                following = estimate.get(order[n + 1], math.inf) if n + 1 < len(order) else -math.inf
                if best_ratio >= following or looked >= looks and following != math.inf:
                    break
            cur = best

    def _past_budget(self, cost: Cost, overshoot: float) -> bool:
        stretched = Cost(cost.speedup / overshoot, cost.seconds * overshoot, cost.gflops * overshoot)
        return self.met(stretched)

    # -- stage 3 ------------------------------------------------------------------------------------
    def neighbours(self, s: Schedule) -> list[Schedule]:
        """Schedules one move away that meet the budget: move tokens from one layer to another, switch a
        layer's method, take tokens back; a move that falls short of the budget is repaired by adding the
        fewest tokens at one other layer that make it up. Those that need no repair come first, each
        group in the seed's order."""
        L, d = self.space.layers, self.space.step()
        sizes = sorted({1, max(1, d // 2), d})
        out = []
        for i in range(L):
            m, r = s[i]
            if r > 0:
                for j in range(L):
                    if i != j:
                        out += [_set(_set(s, i, m, r - k), j, s[j][0] or m, s[j][1] + k) for k in sizes if k <= r]
                out += [_set(s, i, other, r) for other in self.space.methods if other != m]
                out += [_set(s, i, m, r - k) for k in sizes if k <= r]
        seen, direct, repaired = {s}, [], []
        for t in (self.space.normalize(t) for t in out):
            if t in seen:
                continue
            seen.add(t)
            if self.met(self.cost(t)):
                direct.append(t)
                continue
            for j in range(L):
                for fixed in self._repairs(t, j):
                    if fixed not in seen:
                        seen.add(fixed)
                        repaired.append(fixed)
        self.rng.shuffle(direct)
        self.rng.shuffle(repaired)
        return direct + repaired

    def _repairs(self, t: Schedule, j: int) -> list[Schedule]:
        """``t`` with the fewest tokens added at layer ``j`` (with each method, if it has none) that meet the
        budget; none if no count there does."""
        found = []
        for m in ([t[j][0]] if t[j][1] else self.space.methods):
            for extra in range(1, self.space.tokens):
                u = self.space.normalize(_set(t, j, m, t[j][1] + extra))
                if u[j][1] < t[j][1] + extra:      # capped: more tokens at j do not exist
                    break
                if self.met(self.cost(u)):
                    found.append(u)
                    break
        return found

    def refine(self) -> None:
        cur = self.best()
        while cur is not None:
            improved = False
            for s in self.neighbours(cur.schedule):
                p = self.judge(s, "refine")
                if p is None:
                    return
                if p.judged.loss < cur.judged.loss:
                    cur, improved = p, True
                    break
            if not improved:
                return

    def run(self) -> list[Point]:
        self.seeds()
        self.greedy()
        self.refine()
        return list(self.points.values())


def _set(s: Schedule, i: int, method: str, r: int) -> Schedule:
    return s[:i] + ((method, r),) + s[i + 1:]


def search(space: Space, predict, judge, met, **kwargs) -> list[Point]:
    """Every schedule the three stages judged (see the module docstring); the best is
    ``min(p for p in points if met(p.cost), key=loss)``."""
    return Searcher(space, predict, judge, met, **kwargs).run()
