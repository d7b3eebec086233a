"""The per-layer choices the tuner may make, asked of the registered passes (``Pass.tune_methods``), and
a schedule written as recipe rules. Nothing here names a pass."""
from __future__ import annotations

import tokenopt.passes  # noqa: F401  (registers the passes)
from tokenopt.passes.base import TuneMethod, registered_passes
from tokenopt.tuning.search import Schedule


class MethodError(ValueError):
    pass


def tunable() -> dict[str, dict[str, TuneMethod]]:
    """pass name -> {method name -> TuneMethod} for every pass that offers methods to the tuner."""
    return {cls.name: cls.tune_methods() for cls in registered_passes() if cls.tune_methods()}


def choose(names: list[str] | None) -> dict[str, TuneMethod]:
    """Methods from pass names (the pass's stream-level methods) or method names; None: every stream-level
    method offered. An op-level method is chosen by its name only: it keeps every token between blocks, so
    on a classifier it buys less speed per merged token, and each method the search weighs costs whole
    models timed for the cost model's fit and seeds paired with every other method."""
    offered = tunable()
    every = {m: t for ts in offered.values() for m, t in ts.items()}
    if not names:
        return {m: t for m, t in every.items() if not t.keeps_stream}
    chosen: dict[str, TuneMethod] = {}
    for name in names:
        if name in offered:
            chosen.update({m: t for m, t in offered[name].items() if not t.keeps_stream})
        elif name in every:
            chosen[name] = every[name]
        else:
            stream = sorted(set(offered) | {m for m, t in every.items() if not t.keeps_stream})
            op = sorted(m for m, t in every.items() if t.keeps_stream)
            raise MethodError(f"unknown method {name!r}; choose from {', '.join(stream)}"
                              + (f"; op-level (by name only): {', '.join(op)}" if op else ""))
    return chosen


def rules_of(schedule: Schedule, methods: dict[str, TuneMethod], tokens: int | None = None) -> list[dict]:
    """Recipe rules for ``schedule``: each method's rules for its layers, one r each (``tokens``: entering
    the blocks in the original model; op-level methods need it to write their ratio). A schedule that
    reduces nothing is the first method at r = 0 (the rewritten model with nothing merged)."""
    rules = []
    for m, t in methods.items():
        layers = [i for i, (mi, r) in enumerate(schedule) if mi == m and r > 0]
        if layers:
            rules += t.rules(layers, [schedule[i][1] for i in layers], tokens)
    if not rules:
        first = next(iter(methods.values()))
        rules += first.rules(list(range(len(schedule))), [0] * len(schedule), tokens)
    return rules


def describe(schedule: Schedule) -> str:
    """``tome:8 tome:8 tofu-prune:4 - - -``: one entry per layer."""
    return " ".join(f"{m}:{r}" if r else "-" for m, r in schedule)
