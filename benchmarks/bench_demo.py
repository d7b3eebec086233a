"""Accuracy next to speed: every shipped training-free recipe on both trained demo ViTs, one table each.

    python benchmarks/bench_demo.py                      # all shipped ToMe / ToFu recipes, both demo models
    python benchmarks/bench_demo.py --model digits-clutter --batch-size 8

Columns: recipe, GFLOPs, img/s (eager), speedup over the original in the same run, top-1 on the
fixed test split, drop in points. It is `tokenopt demo` with the whole recipe shelf; the demo
models train on first use (about 2 and 4 CPU minutes) and are cached. ToSA needs trained
selectors: see bench_tosa.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tokenopt.cli import app

SHIPPED = Path(__file__).resolve().parent.parent / "recipes"


def main(argv: list[str]) -> None:
    recipes = sorted(p.stem for p in SHIPPED.glob("*.yaml") if not p.stem.startswith("tosa"))
    app(["demo", *[a for stem in recipes for a in ("--recipe", stem)], *argv], prog_name="bench_demo.py")


if __name__ == "__main__":
    main(sys.argv[1:])
