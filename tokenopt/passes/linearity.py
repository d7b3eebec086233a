"""Linearity probe (ToFu): how far each block is from linear on interpolated inputs.

For block f and two calibration inputs x1, x2 (the block's real inputs on two different images)
the error is

    || f(a x1 + (1-a) x2) - (a f(x1) + (1-a) f(x2)) || / || a f(x1) + (1-a) f(x2) ||

averaged over image pairs and the interpolation weights ``alphas``. Merging two tokens feeds the
next layers exactly such an interpolation, so where the error is high, merging misleads the
model and pruning is the safer reduction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenopt.analysis import ModelAnalysis, analyse
from tokenopt.errors import AnalysisError
from tokenopt.subgraph import extract_block
from tokenopt.trace import values_at


@dataclass
class LinearityProfile:
    paths: list[str]
    errors: list[float]                  # per block, relative error (0 = linear)
    images: int
    alphas: tuple[float, ...]


def block_inputs(analysis: ModelAnalysis, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the traced model once and keep each block's input."""
    with torch.no_grad():
        return values_at(analysis.graph, {b.input for b in analysis.blocks}, images)


def linearity_profile(model: nn.Module, images: torch.Tensor, alphas=(0.25, 0.5, 0.75),
                      analysis: ModelAnalysis | None = None, leaf_modules=()) -> LinearityProfile:
    if images.shape[0] < 2:
        raise AnalysisError("the linearity probe needs at least 2 calibration images (it interpolates pairs)")
    analysis = analysis or analyse(model, images[:2], leaf_modules)
    inputs = block_inputs(analysis, images)
    half = images.shape[0] // 2
    errors = []
    with torch.no_grad():
        for b in analysis.blocks:
            f = extract_block(analysis.graph, b)
            x = inputs[b.input]
            x1, x2 = x[:half], x[half:2 * half]
            f1, f2 = f(x1), f(x2)
            err = 0.0
            for a in alphas:
                lin = a * f1 + (1 - a) * f2
                err += ((f(a * x1 + (1 - a) * x2) - lin).norm() / lin.norm().clamp_min(1e-12)).item()
            errors.append(err / len(alphas))
    return LinearityProfile([b.path for b in analysis.blocks], errors, images.shape[0], tuple(alphas))
