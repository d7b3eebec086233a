"""Throughput measurement shared by the benchmarks and the demo.

Timings on a shared CPU are noisy, so configurations are measured *interleaved* (one round runs
every model once, in an order that rotates from round to round, rounds repeat) and each reports
its median; speedups are medians of the per-round ratios to the unmodified model
(:func:`per_round_speedup`).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(models: dict[str, Callable], x: torch.Tensor, rounds: int = 7, warmup: int = 2,
                      min_seconds: float = 0.2) -> dict[str, list[float]]:
    """Seconds per call of each model, one value per interleaved round."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for f in models.values():
            for _ in range(warmup):
                f(x)
        reps = {}
        for k, f in models.items():  # enough calls per sample that short runs are not all noise
            _sync(x.device)
            t = time.perf_counter()
            f(x)
            _sync(x.device)
            reps[k] = max(1, int(min_seconds / max(time.perf_counter() - t, 1e-6)))
        names = list(models)
        for i in range(rounds):
            # each round starts one model later, so no model always runs right after the same one
            for k in names[i % len(names):] + names[:i % len(names)]:
                f = models[k]
                _sync(x.device)
                t = time.perf_counter()
                for _ in range(reps[k]):
                    f(x)
                _sync(x.device)
                times[k].append((time.perf_counter() - t) / reps[k])
    return times


def interleaved_throughput(models: dict[str, Callable], x: torch.Tensor, rounds: int = 7, warmup: int = 2,
                           min_seconds: float = 0.2) -> dict[str, float]:
    """Images per second for each model, medians over ``rounds`` interleaved rounds."""
    return _images_per_second(interleaved_times(models, x, rounds, warmup, min_seconds), x.shape[0])


def _images_per_second(times: dict[str, list[float]], batch: int) -> dict[str, float]:
    return {k: batch / statistics.median(v) for k, v in times.items()}


def per_round_speedup(times: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Speedup of every model over ``reference``: the median over rounds of the ratio of times
    measured in the same round. A machine whose speed drifts during the run (a shared VM) shifts
    both times of a round together, which this cancels and a ratio of medians does not."""
    ref = times[reference]
    return {k: statistics.median(r / t for r, t in zip(ref, v)) for k, v in times.items()}


def measure_speed(models: dict[str, Callable], x: torch.Tensor, reference: str = "original",
                  rounds: int = 7, min_seconds: float = 0.2) -> tuple[dict[str, float], dict[str, float]]:
    """(images per second, speedup over ``reference``) for every model, interleaved rounds."""
    times = interleaved_times(models, x, rounds, min_seconds=min_seconds)
    return _images_per_second(times, x.shape[0]), per_round_speedup(times, reference)


def compile_all(models: dict[str, Callable], x: torch.Tensor,
                status: Callable[[str], object] | None = None) -> dict[str, Callable]:
    """``torch.compile`` every model and run it once on ``x``, so timing never includes the build.

    ``status(message)`` may return a context manager (e.g. ``rich.console.Console.status``) shown
    while each model compiles; CPU builds of a ViT take minutes.
    """
    compiled = {}
    for k, m in models.items():
        with (status(f"torch.compile {k} (CPU builds take minutes)") if status else contextlib.nullcontext()):
            c = torch.compile(m)
            with torch.inference_mode():
                c(x)
        compiled[k] = c
    return compiled
