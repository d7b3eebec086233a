"""``tokenopt tune``: the most accurate recipe for a speed, latency or FLOPs budget, measured here.

    tokenopt tune demo:digits-clutter --data digits-clutter --budget speed=1.5 -o tuned.yaml
    # writes tuned.yaml, tuned.pareto.csv and tuned.pareto.png
"""
from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tokenopt.cli.common import (MODEL_HELP, ArchOpt, CropPctOpt, DataSizeOpt, InterpolationOpt, MeanOpt, StdOpt,
                                 TrustOpt, WeightsOpt, console, load_model, open_dataset, preprocess_options, status,
                                 user_errors)
from tokenopt.errors import TokenoptError


@contextlib.contextmanager
def _progress(total: int):
    """A bar on stderr with the best schedule so far (only on a terminal: logs stay clean)."""
    if not sys.stderr.isatty():
        yield lambda done, total_, best: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("judging schedules"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=total)

        def update(done, total_, best):
            text = "" if best is None else \
                f"best: {best.cost.speedup:.2f}x predicted, quality {100 * best.judged.score:.1f}%"
            bar.update(task, completed=min(done, total_), description=text)

        yield update


@user_errors
def tune_(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    data: Annotated[str, typer.Option("--data", "-d", metavar="DATA",
                                      help="Calibration images: digits | digits-clutter (built in) or an ImageFolder "
                                           "directory (its train split; labels give top-1, else agreement).")],
    budget: Annotated[str, typer.Option(
        "--budget", metavar="SPEC",
        help="speed=1.5 (measured speedup over the original), latency=30ms (per batch) or gflops=2.5 (per image).")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="RECIPE",
                                         help="Where to write the tuned recipe (YAML); the Pareto CSV and PNG go "
                                              "beside it as RECIPE.pareto.csv / .png.")],
    methods: Annotated[Optional[str], typer.Option(
        "--methods", metavar="M,M", help="Passes (or single methods) to choose from per layer, e.g. tome,tofu "
                                         "(default: every stream-level training-free reduction the tuner knows); "
                                         "op-level merging by name: tome-op, tofu-op-prune, tofu-op-mlerp.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Batch size to time at.")] = 64,
    compile_: Annotated[bool, typer.Option("--compile", help="Time torch.compile'd models (CPU builds take "
                                                             "minutes).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the calibration sample and the search.")] = 0,
    images: Annotated[int, typer.Option("--images", min=32, help="Calibration images to judge quality on.")] = 256,
    seconds: Annotated[float, typer.Option("--search-seconds", min=1, help="Time limit of the search.")] = 120,
    compare: Annotated[bool, typer.Option("--compare/--no-compare",
                                          help="Time the shipped recipes and constant-r schedules too (the plot).")] = True,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    weights: WeightsOpt = None,
    input_size: DataSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    interpolation: InterpolationOpt = None,
    crop_pct: CropPctOpt = None,
) -> None:
    """Search per-layer reduction counts and methods for the most accurate recipe that meets a budget on this
    machine; write the recipe (measured speedup, GFLOPs and quality in its comments) and its Pareto front."""
    from tokenopt.files import check_output_path
    from tokenopt.tuning import output as out_
    from tokenopt.tuning import parse_budget
    from tokenopt.tuning.methods import MethodError, choose
    from tokenopt.tuning.run import tune

    spec = parse_budget(budget)     # fail before the slow part, not after it
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    try:
        choose(names)
    except MethodError as e:
        raise TokenoptError(f"--methods: {e}") from None
    csv_path, png_path = output.with_suffix(".pareto.csv"), output.with_suffix(".pareto.png")
    for p in (output, csv_path, png_path):
        check_output_path(p)
    pre = preprocess_options(input_size, mean, std, interpolation, crop_pct)
    base_model, _ = load_model(model, arch, trust_pickle, weights)
    ds = open_dataset(data, base_model, "train", None, pre)
    with _progress(90) as update:
        result = tune(base_model, ds, spec, methods=names, batch_size=batch_size, compile=compile_, seed=seed,
                      calibration_images=images, search_seconds=seconds, compare=compare, progress=update,
                      status=lambda message: _say(message))
    command = "tokenopt tune " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    out_.write_recipe(result, output, command)
    out_.write_csv(result, csv_path)
    out_.plot(result, png_path, title=f"{model} on {data}, budget {spec}")
    show = console()
    show.print(out_.recipe_text(result, command).rstrip())
    show.print(f"wrote {output}, {csv_path}, {png_path}")


def _say(message: str) -> None:
    if sys.stderr.isatty():
        console(stderr=True).print(f"[dim]{message}[/dim]")
