"""Learning-rate schedule: linear warmup, then cosine decay to ``min_ratio`` × the base rate."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """lr multiplier at optimizer step ``s`` (a picklable callable, not a lambda, so it can be inspected)."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
        self.total, self.warmup, self.min_ratio = max(1, total_steps), max(0, warmup_steps), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            # starts above zero so the very first step already moves the weights
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_ratio: float = 0.0) -> LambdaLR:
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_ratio))
