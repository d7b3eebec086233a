"""Measured trade-offs, from one file: ``docs/results/tradeoffs.yaml``.

Each run there is one command on one day, with the rows it printed. The "Which method?" page,
the results page and every pass page render their tables from it, so the same comparison never
shows two sets of numbers. Rows name their method by the pass's title (ToMe, ToSA, ...), the
way the pages do; ``original`` rows are each run's baseline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

FILE = "results/tradeoffs.yaml"          # relative to the docs folder
ORIGINAL = "original"
FLOPS_HEADER = "GFLOPs (MACs) per image"  # multiply-accumulates, as timm's GMACs and the papers count


class ResultsError(ValueError):
    """The trade-offs file is malformed; the message names the run and row."""


@dataclass(frozen=True)
class Row:
    run: str
    method: str
    setting: str
    training: str
    gflops: float
    top1: float | None = None
    drop: float | None = None          # top-1 points against the run's original with the same training
    speedup: str = ""


@dataclass(frozen=True)
class Run:
    key: str
    date: str
    model: str
    command: str
    note: str = ""
    rows: list[Row] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return f"run-{self.key}"


def load(docs_dir: Path) -> list[Run]:
    """The runs of ``docs_dir/results/tradeoffs.yaml`` in file order (empty when there is no file)."""
    path = docs_dir / FILE
    if not path.is_file():
        return []
    data = yaml.safe_load(path.read_text()) or {}
    runs = []
    for key, run in (data.get("runs") or {}).items():
        try:
            rows = []
            for i, r in enumerate(run["rows"]):
                drop = r.get("drop")
                if drop is None and r.get("vs") is not None and r.get("top1") is not None:
                    drop = round(float(r["top1"]) - float(r["vs"]), 1)
                rows.append(Row(key, str(r["method"]), str(r.get("setting", "")), str(r.get("training", "")),
                                float(r["gflops"]), None if r.get("top1") is None else float(r["top1"]),
                                None if drop is None else float(drop), str(r.get("speedup", ""))))
            runs.append(Run(key, str(run["date"]), str(run["model"]), str(run["command"]), str(run.get("note", "")),
                            rows))
        except (KeyError, TypeError, ValueError) as e:
            raise ResultsError(f"{path}: run {key!r}: {type(e).__name__}: {e}") from None
    return runs


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _flops(x: float) -> str:
    return f"{x:.2f}" if x >= 1 else f"{x:.4f}"


def table(runs: list[Run], methods: list[str] | None = None, results_link: str | None = "") -> list[str]:
    """Markdown: for each run with a row of ``methods`` (default all), a caption (date, model, a
    link to the run on the results page at ``results_link``; None: no link) and a table of the
    run's original and those rows."""
    out = []
    for run in runs:
        mine = [r for r in run.rows if (methods is None or r.method in methods) and r.method != ORIGINAL]
        if not mine:
            continue
        base = [r for r in run.rows if r.method == ORIGINAL]
        where = f" ([the run]({results_link}#{run.anchor}))" if results_link is not None else ""
        out += [f"*{run.date}, {run.model.split(' (')[0]}*{where}", "", '<div class="compact" markdown="1">', "",
                f"| method | setting | training | {FLOPS_HEADER} | top-1 (%) | Δ top-1 (points) | speed (× original) |",
                "|---|---|---|---:|---:|---:|---:|"]
        for r in base + mine:
            out.append(f"| {r.method} | {r.setting or '—'} | {r.training} | {_flops(r.gflops)} | "
                       f"{_num(r.top1, '.1f')} | {_num(r.drop, '+.1f')} | {r.speedup or '—'} |")
        out += ["", "</div>", ""]
    return out


def runs_section(runs: list[Run]) -> list[str]:
    """The results page's account of every run: date, command, what was measured, its rows."""
    out = []
    for run in runs:
        out += [f"### {run.date}: {run.model.split(' (')[0]} {{ #{run.anchor} }}", "",
                f"`{run.command}`", "", f"{run.model}. {run.note}".strip(), "",
                *table([run], results_link=None)[2:]]
    return out
