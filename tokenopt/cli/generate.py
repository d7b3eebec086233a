"""``tokenopt generate``: a grid of one class's samples from a class-conditional generator.

    tokenopt generate demo:digits-dit --class 3 --steps 50 --seed 0 -o grid.png
    tokenopt generate dit.tokenopt.pt --class 3 -o grid.png      # an artifact optimized from a generator
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tokenopt.cli.common import (MODEL_HELP, ArchOpt, TrustOpt, WeightsOpt, console, load_model_or_artifact, status,
                                 user_errors)


@user_errors
def generate(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    label: Annotated[int, typer.Option("--class", "-c", metavar="CLASS", help="The class to draw (a digit, for "
                                                                                "the demo generators).")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="PNG", help="Where to write the grid.")],
    steps: Annotated[int, typer.Option("--steps", min=1, max=1000, help="DDIM steps (deterministic sampler).")] = 50,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the starting noise: same seed, same images.")] = 0,
    count: Annotated[int, typer.Option("--count", "-n", min=1, max=256, help="How many images.")] = 16,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    weights: WeightsOpt = None,
) -> None:
    """Draw COUNT images of one class from MODEL (a class-conditional denoiser or its artifact) as a PNG grid."""
    import torch

    from tokenopt.files import check_output_path
    from tokenopt.generation import quality

    check_output_path(output)
    base_model, _ = load_model_or_artifact(model, arch, trust_pickle, weights)
    gen = quality.generator_of(base_model, model)
    quality.check_class(gen, label)
    with status(f"sampling {count} images of class {label}, {steps} steps"):
        images = quality.sample(base_model, gen, torch.full((count,), label), steps=steps, seed=seed)
    quality.write_grid(images, output, columns=min(count, 8))
    console().print(f"wrote {output} ({count} images of class {label}, {steps} DDIM steps, seed {seed})")
