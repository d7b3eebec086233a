"""Accuracy next to cost: evaluate an original and an optimized model together, sweep a method.

Token reduction trades accuracy for speed; a user decides by looking at both, so every figure
here comes with GFLOPs, and the optimized model is always measured against the original on the
same images (top-1, top-5, and how often the two agree on the top-1 class).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from tokenopt.model_outputs import class_logits

from tokenopt.flops import count_flops
import tokenopt.passes  # noqa: F401,E402  (registers the passes: their sweep curves)


@dataclass
class EvalRow:
    method: str          # "original", "tome", "tofu", ... or a recipe name
    setting: str         # e.g. "r=8"
    gflops: float
    top1: float
    top5: float | None
    agreement: float     # top-1 agreement with the original
    n: int
    r: int | None = None


@torch.no_grad()
def evaluate_many(models: dict[str, nn.Module], loader: DataLoader, reference: str = "original",
                  progress: Callable[[int], None] | None = None) -> dict[str, dict]:
    """Top-1/top-5 of each model and its top-1 agreement with ``reference``, in one pass over the data."""
    stats = {k: {"top1": 0, "top5": 0, "agree": 0} for k in models}
    n, classes = 0, 0
    for m in models.values():
        m.eval()
    for images, labels, *_ in loader:
        preds = {}
        for k, m in models.items():
            out = class_logits(m(images))
            classes = out.shape[-1]
            top = out.topk(min(5, classes), dim=-1).indices
            preds[k] = top[:, 0]
            hit = top == labels[:, None]
            stats[k]["top1"] += int(hit[:, 0].sum())
            stats[k]["top5"] += int(hit.any(-1).sum())
        for k in models:
            stats[k]["agree"] += int((preds[k] == preds[reference]).sum()) if reference in preds else 0
        n += len(labels)
        if progress:
            progress(len(labels))
    return {k: {"top1": v["top1"] / max(n, 1), "top5": v["top5"] / max(n, 1) if classes > 5 else None,
                "agreement": v["agree"] / max(n, 1), "n": n} for k, v in stats.items()}


# ------------------------------------------------------------------------------------------------
# sweeps: a recipe family over a range of r

def _curves() -> dict:
    """method name -> rules as a function of r, from every registered pass (Pass.sweep_curves)."""
    from tokenopt.passes.base import registered_passes

    return {name: fn for cls in registered_passes() for name, fn in cls.sweep_curves().items()}


def family_rules(method: str, r: int) -> list[dict]:
    """The recipe rules of one point of a method's curve."""
    curves = _curves()
    if method not in curves:
        raise ValueError(method)
    return curves[method](r)


SWEEP_METHODS = tuple(_curves())


def sweep_values(tokens: int, prefix: int, depth: int, points: int = 9) -> list[int]:
    """r from 0 to where (nearly) every block is capped, about ``points`` values."""
    top = max(1, math.ceil(2 * (tokens - prefix) / depth))
    top = min(top, (tokens - prefix) // 2)
    step = max(1, round(top / (points - 1)))
    return sorted(set(list(range(0, top + 1, step)) + [top]))


def sweep(model: nn.Module, methods: Iterable[str], loader: DataLoader, example: torch.Tensor,
          values: list[int] | None = None, calibration: torch.Tensor | None = None,
          progress: Callable[[str], None] | None = None, capture: str = "auto") -> list[EvalRow]:
    from tokenopt.analysis import analyse
    from tokenopt.pipeline import optimize

    a = analyse(model, example[:2], capture=capture)
    values = values or sweep_values(a.blocks[0].tokens, a.prefix_tokens, len(a.blocks))
    one = example[:1]
    models = {"original": model}
    meta = {"original": ("original", "", None)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # r beyond a layer's tokens is expected at the top of a sweep
        for method in methods:
            for r in values:
                key = f"{method} r={r}"
                if progress:
                    progress(f"building {key}")
                models[key] = optimize(model, {"version": 1, "rules": family_rules(method, r)}, example[:2],
                                       calibration=calibration, report=False, capture=capture)
                meta[key] = (method, f"r={r}", r)
    if progress:
        progress(f"evaluating {len(models)} models")
    results = evaluate_many(models, loader)
    rows = []
    for k, m in models.items():
        method, setting, r = meta[k]
        res = results[k]
        rows.append(EvalRow(method, setting, count_flops(m, one) / 1e9, res["top1"], res["top5"], res["agreement"],
                            res["n"], r))
    return rows


def write_csv(rows: list[EvalRow], path: str | Path) -> None:
    from tokenopt.files import write_csv_rows
    write_csv_rows([asdict(r) for r in rows], path)


def plot(rows: list[EvalRow], path: str | Path, title: str = "") -> None:
    """Top-1 against GFLOPs, one curve per method, the original as a star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenopt.files import atomic_write

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    orig = next((r for r in rows if r.method == "original"), None)
    for method in dict.fromkeys(r.method for r in rows if r.method != "original"):
        pts = sorted((r for r in rows if r.method == method), key=lambda r: r.gflops)
        ax.plot([p.gflops for p in pts], [100 * p.top1 for p in pts], marker="o", label=method)
        for p in pts:
            ax.annotate(str(p.r), (p.gflops, 100 * p.top1), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if orig is not None:
        ax.plot([orig.gflops], [100 * orig.top1], marker="*", markersize=12, color="black", linestyle="",
                label="original")
    ax.set_xlabel("GFLOPs per image (multiply-accumulates)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy against cost (labels: r)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
