"""The noise schedule a demo generator is trained with (DDPM) and the sampler that draws from it (DDIM).

Training adds noise at a random step ``t`` of ``T`` and teaches the denoiser to predict it
(epsilon prediction). Sampling runs DDIM with ``eta = 0``: every step is a deterministic function
of the current image and the predicted noise, so the only randomness is the starting noise, drawn
from a seeded generator — the same seed gives the same images, on the original and on every
optimized model, which is what makes their samples comparable image by image.
"""
from __future__ import annotations

from typing import Callable

import torch

TRAIN_STEPS = 1000


def alphas_cumprod(steps: int = TRAIN_STEPS) -> torch.Tensor:
    """ᾱ_t of DDPM's linear beta schedule (1e-4 to 0.02, as in Ho et al. 2020), float64 for the sampler."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, per image."""
    a = abar[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_timesteps(steps: int, train_steps: int = TRAIN_STEPS) -> list[int]:
    """``steps`` evenly spaced training steps, from the noisiest down (DDIM's "uniform" spacing)."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be in 1..{train_steps}, got {steps}")
    stride = train_steps // steps
    return list(range(train_steps - 1, -1, -stride))[:steps]


@torch.no_grad()
def ddim_sample(predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
                steps: int = 50, seed: int = 0, abar: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images of ``shape`` (B, C, H, W) in about [-1, 1] from ``predict_noise(x_t, t)`` (t: (B,) int64).

    The starting noise is drawn from ``seed``, or given (``noise``: a slice of a larger seeded draw,
    so a set sampled in chunks is the set sampled at once).

    Deterministic (eta = 0): x_{t'} = sqrt(ᾱ_t') x̂_0 + sqrt(1 - ᾱ_t') ε̂ with
    x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t); the last step returns x̂_0.
    """
    abar = alphas_cumprod() if abar is None else abar
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) if noise is None else noise.clone()
    times = ddim_timesteps(steps, len(abar))
    for i, t in enumerate(times):
        eps = predict_noise(x, torch.full((shape[0],), t, dtype=torch.long)).to(x.dtype)
        a = abar[t].item()
        x0 = ((x - (1 - a) ** 0.5 * eps) / a ** 0.5).clamp(-1.5, 1.5)   # keep a bad early guess from exploding
        if i + 1 == len(times):
            return x0
        a_next = abar[times[i + 1]].item()
        x = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
    return x
