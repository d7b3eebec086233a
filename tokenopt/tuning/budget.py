"""The budget a tuned recipe must meet: ``speed=1.5``, ``latency=30ms`` or ``gflops=2.5``, parsed to a
`Budget` that says whether a (predicted or measured) cost meets it.

    speed=1.5      measured speedup over the original on this machine, at the batch size asked
    latency=30ms   seconds per batch (ms, s or us; a bare number is milliseconds)
    gflops=2.5     GFLOPs (multiply-accumulates) per image
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tokenopt.errors import TokenoptError


class BudgetError(TokenoptError):
    """A budget spec that does not parse, or a budget no schedule reaches."""


_FORMS = "write speed=1.5 (speedup over the original), latency=30ms (per batch) or gflops=2.5 (per image)"
_SPEC = re.compile(r"^\s*(speed|latency|gflops)\s*=\s*([0-9]*\.?[0-9]+(?:e[-+]?\d+)?)\s*(ms|s|us)?\s*(x)?\s*$", re.I)
_LATENCY_UNITS = {None: 1e-3, "ms": 1e-3, "s": 1.0, "us": 1e-6}


@dataclass(frozen=True)
class Budget:
    kind: str       # "speed" | "latency" | "gflops"
    value: float    # speedup (x), seconds per batch, or GFLOPs per image

    def __str__(self) -> str:
        if self.kind == "speed":
            return f"speed={self.value:g}x"
        if self.kind == "latency":
            return f"latency={self.value * 1e3:g}ms"
        return f"gflops={self.value:g}"

    def met(self, speedup: float, base_seconds: float, gflops: float, slack: float = 0.0) -> bool:
        """Whether a schedule of this ``speedup`` (over an original taking ``base_seconds`` per batch)
        and ``gflops`` per image meets the budget; ``slack`` (a fraction) forgives a shortfall that small."""
        if self.kind == "speed":
            return speedup >= self.value * (1 - slack)
        if self.kind == "latency":
            return base_seconds / speedup <= self.value * (1 + slack)
        return gflops <= self.value * (1 + slack)

    def shortfall(self, speedup: float, base_seconds: float, gflops: float) -> float:
        """How far from the budget, as a factor >= 1 of speed (or of FLOPs) still to be gained; 1: met."""
        if self.kind == "speed":
            return max(1.0, self.value / speedup)
        if self.kind == "latency":
            return max(1.0, (base_seconds / speedup) / self.value)
        return max(1.0, gflops / self.value)


def parse_budget(spec: str) -> Budget:
    """``speed=1.5`` | ``latency=30ms`` | ``gflops=2.5`` -> a `Budget`; anything else a BudgetError."""
    m = _SPEC.match(spec or "")
    if m is None:
        raise BudgetError(f"--budget {spec!r} does not parse: {_FORMS}")
    kind, number, unit, times = m.group(1).lower(), float(m.group(2)), m.group(3), m.group(4)
    unit = unit.lower() if unit else None
    if (unit and kind != "latency") or (times and kind != "speed"):
        raise BudgetError(f"--budget {spec!r}: a unit belongs to latency only (and x to speed); {_FORMS}")
    if not math.isfinite(number) or number <= 0:
        raise BudgetError(f"--budget {spec!r}: the value must be above 0; {_FORMS}")
    if kind == "speed":
        if number <= 1:
            raise BudgetError(f"--budget {spec!r}: a speedup must be above 1 (1 is the original model); {_FORMS}")
        return Budget("speed", number)
    if kind == "latency":
        return Budget("latency", number * _LATENCY_UNITS[unit])
    return Budget("gflops", number)
