"""A linear probe on a dense feature map and the F1 of its per-patch answer: how well each token
of a (reduced) model still says where the object is.

    probe = fit_linear_probe(train_maps, train_labels)        # (n, H, W, C), (n, H*W) bool
    f1 = f1_score(probe.predict(test_maps), test_labels)

The probe is logistic regression on the tokens (one weight per channel and a bias), full-batch
Adam from a small seeded random start on features standardised with the training tokens' mean and
spread. Object patches are usually the minority (a quarter of them on digits-clutter-sizes), so the
positives' loss is weighted by negatives / positives (balanced: otherwise the probe gains by calling
everything background); a token is called positive when its logit is at least 0. F1 counts every
patch of every image together (micro average): 2 tp / (2 tp + fp + fn), 0 when there is no positive.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LinearProbe:
    mean: torch.Tensor       # (C,) of the training tokens
    scale: torch.Tensor      # (C,) their standard deviation (1 where it is 0)
    weight: torch.Tensor     # (C,)
    bias: torch.Tensor       # ()

    def logits(self, maps: torch.Tensor) -> torch.Tensor:
        """(n, H, W, C) -> (n, H*W) logits."""
        x = (maps.reshape(len(maps), -1, maps.shape[-1]).float() - self.mean) / self.scale
        return x @ self.weight + self.bias

    def predict(self, maps: torch.Tensor) -> torch.Tensor:
        """(n, H, W, C) -> (n, H*W) bool: logit at least 0."""
        return self.logits(maps) >= 0


def fit_linear_probe(maps: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 1e-2,
                     seed: int = 0) -> LinearProbe:
    """Logistic regression of ``labels`` (n, H*W) bool on the tokens of ``maps`` (n, H, W, C)."""
    x = maps.reshape(len(maps), -1, maps.shape[-1]).reshape(-1, maps.shape[-1]).float().detach()
    y = labels.reshape(-1).float()
    if len(x) != len(y):
        raise ValueError(f"{len(x)} tokens but {len(y)} labels: labels are (n, H*W), one per patch of the map")
    mean, scale = x.mean(0), x.std(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    x = (x - mean) / scale
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x.shape[1], generator=g) * 0.01).requires_grad_()
    bias = torch.zeros(()).requires_grad_()
    opt = torch.optim.Adam([weight, bias], lr=lr)
    pos = y.sum()
    pos_weight = (len(y) - pos) / pos if 0 < pos < len(y) else torch.tensor(1.0)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y, pos_weight=pos_weight)
            loss.backward()
            opt.step()
    return LinearProbe(mean, scale, weight.detach(), bias.detach())


def f1_counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) over every element."""
    pred, target = pred.bool(), target.bool()
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(target.shape)} differ in shape")
    return int((pred & target).sum()), int((pred & ~target).sum()), int((~pred & target).sum())


def f1_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Micro F1 of the positive class over every element; 0 when neither has a positive."""
    tp, fp, fn = f1_counts(pred, target)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def probe_f1(train_maps: torch.Tensor, train_labels: torch.Tensor, test_maps: torch.Tensor,
             test_labels: torch.Tensor, steps: int = 300, seed: int = 0) -> float:
    """F1 on the test patches of a probe fitted on the training ones (maps (n, H, W, C), labels (n, H*W))."""
    probe = fit_linear_probe(train_maps, train_labels, steps=steps, seed=seed)
    return f1_score(probe.predict(test_maps), test_labels)
