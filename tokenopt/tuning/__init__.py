"""``tokenopt tune``: the most accurate recipe of the training-free reductions that meets a speed, latency
or FLOPs budget, measured on this machine.

    budget.py    the SPEC: speed=1.5 | latency=30ms | gflops=2.5
    cost.py      per-block latency against the token count, measured here and cached; op overheads
    quality.py   agreement / KL / top-1 against the original on calibration images (dense: output distance)
    methods.py   the per-layer choices the passes offer (Pass.tune_methods), a schedule as recipe rules
    search.py    seeds, greedy moves, local refinement over per-layer (method, r)
    run.py       tune(): all of the above, then the chosen recipe timed for real
    output.py    the recipe YAML with its figures, the Pareto CSV and PNG

``tokenopt.tune(model, data, budget="speed=1.5")`` is `tokenopt.tuning.run.tune`.
"""
from __future__ import annotations

from tokenopt.tuning.budget import Budget, BudgetError, parse_budget


def tune(model, data, budget, **kwargs):
    """See `tokenopt.tuning.run.tune` (imported on call: the run needs the whole pipeline)."""
    from tokenopt.tuning.run import tune as _tune
    return _tune(model, data, budget, **kwargs)


__all__ = ["Budget", "BudgetError", "parse_budget", "tune"]
