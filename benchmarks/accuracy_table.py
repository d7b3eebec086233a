"""The accuracy table the size-varying benchmarks share (bench_swin_accuracy, bench_spa_budget), and
its dense per-patch F1.

A row: model, method, setting, mean GFLOPs per image, top-1, per-image kept tokens min / mean / max,
r(area) (the correlation of an image's kept tokens with its digit's area, where the count varies),
and F1: dense per-patch F1 of a linear probe on a feature map of the model.

Dense per-patch F1 (:class:`DenseF1`): a patch is a digit patch when the digit's box (the data's
``box`` mask: the square the digit is drawn in) covers at least half of it
(``tokenopt.data.masks.token_labels``, cover 0.5), on the grid of the map read. A logistic-regression
probe (``tokenopt.probe``: standardised tokens, positives weighted by negatives / positives, 300
full-batch Adam steps, seed 0) is fitted per method on the maps of the first ``train_images``
training images, and F1 of "digit patch" is counted over every patch of the test images. Each
benchmark says which map it reads (Swin: the stage-3 map; plain ViT: the patch tokens
``outputs: tokens`` returns).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from rich.table import Table

from tokenopt.data.masks import token_labels
from tokenopt.probe import probe_f1


@dataclass
class Row:
    model: str
    method: str
    setting: str
    gflops: float
    top1: float
    tokens: tuple[float, float, float]     # min, mean, max over the test images
    f1: float | None = None
    r_area: float | None = None


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def _base(ds):
    return ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds


def _index(ds, i: int) -> int:
    return ds.indices[i] if isinstance(ds, torch.utils.data.Subset) else i


def digit_area(ds) -> torch.Tensor:
    """(n,) the digit's box area in pixels of each image of ``ds``."""
    base = _base(ds)
    return torch.tensor([float((b[2] - b[0]) * (b[3] - b[1]))
                         for b in (base.box(_index(ds, i)) for i in range(len(ds)))])


class DenseF1:
    """Dense per-patch F1 of a probe on a model's feature map (see the module docstring).

    ``score(read)``: ``read(images) -> (n, H, W, C)`` the map of the images; labels are made at the
    map's grid from the box masks of the same images."""

    def __init__(self, train_set, test_set, train_images: int = 1024, steps: int = 300, seed: int = 0):
        n = min(train_images, len(train_set))
        self.sets = {"train": (train_set, n), "test": (test_set, len(test_set))}
        self.images = {k: torch.stack([ds[i][0] for i in range(n)]) for k, (ds, n) in self.sets.items()}
        masks = {k: torch.stack([torch.from_numpy(_base(ds).mask(_index(ds, i), "box")) for i in range(n)])
                 for k, (ds, n) in self.sets.items()}
        self.masks, self.steps, self.seed = masks, steps, seed

    def labels(self, split: str, grid: tuple[int, int]) -> torch.Tensor:
        return token_labels(self.masks[split], grid)

    def score(self, read: Callable[[torch.Tensor], torch.Tensor]) -> float:
        train, test = read(self.images["train"]), read(self.images["test"])
        grid = tuple(train.shape[1:3])
        return probe_f1(train, self.labels("train", grid), test, self.labels("test", grid),
                        steps=self.steps, seed=self.seed)


def accuracy_table(title: str, rows: list[Row]) -> Table:
    t = Table(title=title)
    for c in ("model", "method", "setting", "GFLOPs/img", "top-1 %", "tokens/img min / mean / max", "F1",
              "r(area)"):
        t.add_column(c, justify="left" if c in ("model", "method", "setting") else "right")
    for r in rows:
        t.add_row(r.model, r.method, r.setting, f"{r.gflops:.5f}", f"{100 * r.top1:.1f}",
                  " / ".join(f"{v:.1f}" for v in r.tokens), "" if r.f1 is None else f"{r.f1:.3f}",
                  "" if r.r_area is None else f"{r.r_area:+.2f}")
    return t
