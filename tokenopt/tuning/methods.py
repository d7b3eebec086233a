"""The per-layer choices the tuner may make, asked of the registered passes (``Pass.tune_methods``), and
a schedule written as recipe rules. Nothing here names a pass."""
from __future__ import annotations

from typing import Callable

import tokenopt.passes  # noqa: F401  (registers the passes)
from tokenopt.passes.base import registered_passes
from tokenopt.tuning.search import Schedule


class MethodError(ValueError):
    pass


def tunable() -> dict[str, dict[str, Callable]]:
    """pass name -> {method name -> rule(layers, rs)} for every pass that offers methods to the tuner."""
    return {cls.name: cls.tune_methods() for cls in registered_passes() if cls.tune_methods()}


def choose(names: list[str] | None) -> dict[str, Callable]:
    """Methods from pass names (every method of that pass) or method names; None: every one offered."""
    offered = tunable()
    every = {m: fn for fns in offered.values() for m, fn in fns.items()}
    if not names:
        return every
    chosen: dict[str, Callable] = {}
    for name in names:
        if name in offered:
            chosen.update(offered[name])
        elif name in every:
            chosen[name] = every[name]
        else:
            raise MethodError(f"unknown method {name!r}; choose from {', '.join(sorted(set(offered) | set(every)))}")
    return chosen


def rules_of(schedule: Schedule, methods: dict[str, Callable]) -> list[dict]:
    """Recipe rules for ``schedule``: one rule per method, its layers and one r each. A schedule that
    reduces nothing is the first method at r = 0 (the rewritten model with nothing merged)."""
    rules = []
    for m, fn in methods.items():
        layers = [i for i, (mi, r) in enumerate(schedule) if mi == m and r > 0]
        if layers:
            rules.append(fn(layers, [schedule[i][1] for i in layers]))
    if not rules:
        fn = next(iter(methods.values()))
        rules.append(fn(list(range(len(schedule))), [0] * len(schedule)))
    return rules


def describe(schedule: Schedule) -> str:
    """``tome:8 tome:8 tofu-prune:4 - - -``: one entry per layer."""
    return " ".join(f"{m}:{r}" if r else "-" for m, r in schedule)
