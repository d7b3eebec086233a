"""``tokenopt tune``: the most accurate recipe of the training-free reductions that meets a speed, latency
or FLOPs budget, measured on this machine.

    budget.py    the SPEC: speed=1.5 | latency=30ms | gflops=2.5
    cost.py      per-block latency against the token count, measured here and cached; op overheads
    quality.py   agreement / KL / top-1 against the original on calibration images (dense: output distance)
    methods.py   the per-layer choices the passes offer (Pass.tune_methods), a schedule as recipe rules
    search.py    seeds, greedy moves, local refinement over per-layer (method, r)
    run.py       tune(): all of the above, then the chosen recipe timed for real
    output.py    the recipe YAML with its figures, the Pareto CSV and PNG

``tokenopt.tune(model, data, budget="speed=1.5")`` calls :func:`tokenopt.tune.run.tune`: the package is
callable, since the name ``tokenopt.tune`` is both this package and the library's function.
"""
from __future__ import annotations

import sys
import types

from tokenopt.tune.budget import Budget, BudgetError, parse_budget


def tune(model, data, budget, **kwargs):
    """See :func:`tokenopt.tune.run.tune`."""
    from tokenopt.tune.run import tune as _tune
    return _tune(model, data, budget, **kwargs)


class _CallableModule(types.ModuleType):
    # importing the subpackage sets the attribute tokenopt.tune to it, hiding any function of that name
    # in tokenopt/__init__.py: so the package itself answers tokenopt.tune(model, data, budget=...)
    def __call__(self, model, data, budget, **kwargs):
        return tune(model, data, budget, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Budget", "BudgetError", "parse_budget", "tune"]
