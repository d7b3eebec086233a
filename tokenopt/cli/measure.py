"""Commands that measure on data: ``tokenopt eval`` (accuracy next to GFLOPs, sweeps), ``tokenopt probe``
(ToFu's per-block linearity, written out as a recipe) and ``tokenopt demo`` (compares the shipped
recipes on the demo ViTs, shipped trained with their ToSA selectors and SPA gates; ``--retrain`` trains them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tokenopt.cli.common import (MODEL_HELP, ArchOpt, CaptureOpt, CropPctOpt, DataSizeOpt, InterpolationOpt, MeanOpt,
                                 StdOpt, StrictOpt, TrustOpt, WeightsOpt, console, first_images, load_model,
                                 load_model_or_artifact, load_recipe, open_dataset, preprocess_options, print_notes,
                                 quiet_plan_warnings, status, user_errors)
from tokenopt.errors import TokenoptError
from tokenopt.record import record_of

DataOpt = Annotated[str, typer.Option(
    "--data", "-d", metavar="DATA", help="digits | digits-clutter (built in) or an ImageFolder directory.")]
SplitOpt = Annotated[str, typer.Option("--split", help="Which split to use: test (default) or train.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", min=2, help="Use only the first N images.")]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


@user_errors
def eval_(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    data: Annotated[Optional[str], typer.Option(
        "--data", "-d", metavar="DATA", help="digits | digits-clutter (built in) or an ImageFolder directory "
                                              "(not for a generator: it is compared with the test digits).")] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", metavar="RECIPE",
                                                  help="Evaluate the model optimized by this recipe too.")] = None,
    sweep: Annotated[Optional[str], typer.Option(
        "--sweep", metavar="METHODS",
        help="Comma-separated families to sweep over r: tome, tofu (prune first half, MLERP second), "
             "tofu-mlerp, tofu-prune, tofu-auto.")] = None,
    r_values: Annotated[Optional[str], typer.Option("--r", metavar="R,R,...",
                                                    help="The r values of a sweep (default: 0 to max).")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write the sweep's rows as CSV.")] = None,
    plot_out: Annotated[Optional[Path], typer.Option("--plot", help="Write the sweep's accuracy-vs-GFLOPs PNG.")] = None,
    strict: StrictOpt = False,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    weights: WeightsOpt = None,
    input_size: DataSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    interpolation: InterpolationOpt = None,
    crop_pct: CropPctOpt = None,
    split: SplitOpt = "test",
    batch_size: BatchOpt = 128,
    limit: LimitOpt = None,
    capture: CaptureOpt = "auto",
    ratios: Annotated[str, typer.Option("--ratios", metavar="R,R,...", help="Generators: the ratios a --sweep "
                                        "merges at (placement: op).")] = "0.3,0.5,0.7",
    samples: Annotated[int, typer.Option("--samples", min=10, help="Generators: images drawn per setting.")] = 1000,
    steps: Annotated[int, typer.Option("--steps", min=1, max=1000, help="Generators: DDIM steps.")] = 25,
    grids: Annotated[Optional[Path], typer.Option("--grids", metavar="DIR", help="Generators: write a sample "
                                                  "grid PNG per setting into DIR.")] = None,
) -> None:
    """Top-1 (and top-5) of MODEL and of its optimized version, their agreement, and GFLOPs.

    For a class-conditional generator (demo:digits-dit, demo:digits-unet, a diffusers DiT/UNet with
    class labels, or its artifact): per setting, GFLOPs per denoising call, digits-FID against the
    test digits, class accuracy of the samples (by demo:digits) and seconds per image.
    """
    from rich.table import Table

    from tokenopt import evaluation as ev
    from tokenopt.data import get_loader
    from tokenopt.flops import count_flops

    if recipe is None and sweep is None:
        raise TokenoptError("nothing to compare: give --recipe RECIPE, --sweep METHODS, or both")
    for out in (csv_out, plot_out):
        if out is not None:
            from tokenopt.files import check_output_path
            check_output_path(out)
    from tokenopt.generation.quality import denoiser_example
    base_model, base = load_model_or_artifact(model, arch, trust_pickle, weights)
    if denoiser_example(base_model) is not None:
        _eval_generator(model, base_model, recipe, strict, sweep, ratios, samples, steps, grids, csv_out,
                        plot_out, capture, first="original" if base is not None else Path(model).name)
        return
    if base is None:    # a classifier's artifact: refused as before (apply recipes to the original)
        base_model, _ = load_model(model, arch, trust_pickle, weights)
    if data is None:
        raise TokenoptError(f"{model} is a classifier: give --data (digits, digits-clutter or an ImageFolder "
                            "directory) to measure it on")
    methods = [m.strip() for m in sweep.split(",")] if sweep else []
    bad = [m for m in methods if m not in ev.SWEEP_METHODS]
    if bad:
        raise TokenoptError(f"--sweep: unknown method {bad[0]!r}; choose from {', '.join(ev.SWEEP_METHODS)}")
    values = None
    if r_values:
        try:
            values = sorted({int(v) for v in r_values.split(",")})
        except ValueError:
            raise TokenoptError(f"--r {r_values!r}: write integers separated by commas, e.g. 0,4,8") from None
    pre = preprocess_options(input_size, mean, std, interpolation, crop_pct)
    rec = load_recipe(recipe, strict) if recipe else None
    ds = open_dataset(data, base_model, split, limit, pre)
    loader = get_loader(ds, batch_size, train=False)
    example = first_images(ds, 16)
    out = console()
    calibration = first_images(ds, 32) if "tofu-auto" in methods or (rec and _needs_calibration(rec)) else None

    rows = []
    if rec is not None:
        from tokenopt.pipeline import optimize
        with status("rewriting"), quiet_plan_warnings():
            gm = optimize(base_model, rec, example[:2], calibration=calibration, capture=capture)
        print_notes(record_of(gm).report.skipped, record_of(gm).report.warnings, console(stderr=True))
        with status(f"evaluating on {len(ds)} images"):
            res = ev.evaluate_many({"original": base_model, "optimized": gm}, loader)
        one = example[:1]
        rows += [ev.EvalRow("original", "", count_flops(base_model, one) / 1e9, res["original"]["top1"],
                            res["original"]["top5"], 1.0, res["original"]["n"]),
                 ev.EvalRow(Path(recipe).stem, "", record_of(gm).report.flops_after / 1e9, res["optimized"]["top1"],
                            res["optimized"]["top5"], res["optimized"]["agreement"], res["optimized"]["n"])]
    sweep_rows = []
    if methods:
        with status("sweeping") as _:
            sweep_rows = ev.sweep(base_model, methods, loader, example, values, calibration, capture=capture)
        rows += [r for r in sweep_rows if not (r.method == "original" and rows)]

    from tokenopt.data.datasets import single_folder
    # a folder without split folders is not a test split: the title must not say it is one
    which = split if single_folder(data) is None else "every image of the folder: it has no train/ or val/ split"
    t = Table(title=f"{model} on {data} ({which}, {rows[0].n} images)")
    for col in ("model", "setting", "GFLOPs", "top-1 %", "top-5 %", "drop (points)", "agreement %"):
        t.add_column(col, justify="left" if col in ("model", "setting") else "right")
    ref = rows[0].top1
    for r in rows:
        t.add_row(r.method, r.setting, f"{r.gflops:.3f}", _pct(r.top1), _pct(r.top5),
                  "" if r.method == "original" else f"{100 * (ref - r.top1):.1f}", _pct(r.agreement))
    out.print(t)
    if sweep_rows:
        if csv_out:
            ev.write_csv(sweep_rows, csv_out)
            out.print(f"wrote {csv_out}")
        if plot_out:
            ev.plot(sweep_rows, plot_out, title=f"{model} on {data}")
            out.print(f"wrote {plot_out}")


def _eval_generator(spec: str, model, recipe: str | None, strict: bool, sweep: str | None, ratios: str,
                    samples: int, steps: int, grids: Path | None, csv_out: Path | None, plot_out: Path | None,
                    capture: str, first: str = "original") -> None:
    """``tokenopt eval`` of a generator: the original and each setting, drawing the same images."""
    from rich.table import Table

    from tokenopt.generation import fid, quality

    gen = quality.generator_of(model, spec)
    recipes = {Path(recipe).stem: load_recipe(recipe, strict)} if recipe else {}
    try:
        values = [float(v) for v in ratios.split(",")]
    except ValueError:
        raise TokenoptError(f"--ratios {ratios!r}: write numbers separated by commas, e.g. 0.3,0.5,0.7") from None
    for method in [m.strip() for m in sweep.split(",")] if sweep else []:
        for r in values:
            recipes[f"{method} op {r:g}"] = {"version": 1, "rules": [{"pass": method, "placement": "op", "ratio": r}]}
    if grids is not None and not grids.is_dir():
        raise TokenoptError(f"--grids {grids}: no such directory; create it first (mkdir -p {grids})")
    classifier = fid.digits_classifier()
    with status(f"rewriting ({len(recipes)} settings)"), quiet_plan_warnings():
        settings = quality.optimized_settings(model, recipes, capture=capture, first=first)
    with status(f"sampling {samples} images per setting"):
        rows = quality.evaluate_generators(settings, gen, classifier, n=samples, steps=steps, grid_dir=grids)
    out = console()
    t = Table(title=f"{spec}: {samples} generated vs {rows[0].n_real} real test digits, {steps} DDIM steps")
    for col in ("setting", "GFLOPs/call", "digits-FID", "class acc %", "s/image"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        if r.fid is None:
            t.add_row(r.setting, r.note, "", "", "")
        else:
            t.add_row(r.setting, f"{r.gflops:.4f}", f"{r.fid:.2f}", _pct(r.class_acc), f"{r.sec_per_image:.4f}")
    out.print(t)
    if csv_out:
        quality.write_csv(rows, csv_out)
        out.print(f"wrote {csv_out}")
    if plot_out:
        quality.plot(rows, plot_out, title=spec)
        out.print(f"wrote {plot_out}")
    if grids:
        out.print(f"wrote {len([r for r in rows if r.fid is not None])} sample grids into {grids}")


def _needs_calibration(rec) -> bool:
    from tokenopt.passes import get_pass
    return any(get_pass(r.pass_name)().needs_calibration(r.options) for r in rec.rules)


@user_errors
def probe(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    data: DataOpt,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="RECIPE", help="Write a ToFu recipe whose per-layer op follows the probe.")] = None,
    r: Annotated[int, typer.Option("--r", min=0, help="r of the written recipe.")] = 8,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", min=0.0, help="Blocks at or above this error prune (default: the median).")] = None,
    images: Annotated[int, typer.Option("--images", min=2, help="Calibration images (pairs are interpolated).")] = 64,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    weights: WeightsOpt = None,
    input_size: DataSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    interpolation: InterpolationOpt = None,
    crop_pct: CropPctOpt = None,
    split: Annotated[str, typer.Option("--split", help="Calibration split (default: train).")] = "train",
    capture: CaptureOpt = "auto",
) -> None:
    """Measure each block's linearity on interpolated inputs (ToFu) and write the prune/merge plan."""
    from rich.table import Table

    from tokenopt.analysis import analyse
    from tokenopt.passes.base import Pass, registered_passes

    if output is not None:
        from tokenopt.files import check_output_path
        check_output_path(output)
    pre = preprocess_options(input_size, mean, std, interpolation, crop_pct)
    base_model, _ = load_model(model, arch, trust_pickle, weights)
    ds = open_dataset(data, base_model, split, None, pre)
    batch = first_images(ds, images)
    with status("tracing"):
        analysis = analyse(base_model, batch[:2], capture=capture)
    # the passes that have a probe of their own (ToFu's linearity) measure and propose their recipe
    probing = [cls for cls in registered_passes() if cls.probe is not Pass.probe]
    out = console()
    rules, comments = [], []
    for cls in probing:
        with status(f"probing {len(analysis.blocks)} blocks on {len(batch)} images"):
            found = cls().probe(base_model, analysis, batch, r, threshold)
        t = Table(title=found.title, caption=found.caption)
        for col in found.columns:
            t.add_column(col, justify="right" if col in ("layer", "error") else "left")
        for row in found.rows:
            t.add_row(*row)
        out.print(t)
        out.print(found.note)
        rules += found.rules
        comments.append(found.comment)
    if output is not None:
        from tokenopt.files import atomic_write
        import yaml
        head = "\n".join(f"# {line}" for c in comments for line in c.splitlines())
        text = (f"# from `tokenopt probe {model} --data {data}`\n{head}\n"
                + yaml.safe_dump({"version": 1, "rules": list(rules)}, sort_keys=False, default_flow_style=None))
        with atomic_write(output, "w") as f:
            f.write(text)
        out.print(f"wrote {output}")


DEMO_RECIPES = ("tome-r8", "tome-r13", "tome-decreasing", "tofu-r8", "tofu-r13", "tofu-auto-r8")


@user_errors
def demo(
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", help="Where retrained demo weights are kept (default: $TOKENOPT_CACHE or ~/.cache/tokenopt).")] = None,
    retrain: Annotated[bool, typer.Option(
        "--retrain", help="Train the demo ViTs and their selectors and gates again (minutes), into the cache, "
                          "instead of using the shipped weights.")] = False,
    recipes: Annotated[Optional[list[str]], typer.Option(
        "--recipe", "-r", metavar="RECIPE",
        help="Recipes to apply (repeatable; default: the shipped ToMe/ToFu ones and the demo's trained ToSA/SPA).")] = None,
    models: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", metavar="NAME", help="Demo models (repeatable): digits, digits-clutter (the default: both, shipped trained), "
                                        "digits-clutter-sizes, swin-clutter-sizes (trained on first use).")] = None,
    batch_size: BatchOpt = 64,
) -> None:
    """Compare token reduction methods on the embedded demo ViTs (shipped trained weights; --retrain trains them).

    Prints, per demo model as soon as it is measured: recipe, GFLOPs, img/s, speedup over the
    original (same run), top-1 on the fixed test split, the drop in points, and for a recipe that
    keeps a different number of tokens per image, the tokens kept per image (min/mean/max).
    """
    from tokenopt.demo import demo_model, demo_names
    from tokenopt.demo_methods import methods_of
    from tokenopt.paths import SHIPPED_RECIPES
    from tokenopt.recipe import load_recipe

    from tokenopt.demo_specs import MAIN_DEMOS

    names = models or list(MAIN_DEMOS)
    bad = [n for n in names if n not in demo_names()]
    if bad:
        raise TokenoptError(f"unknown demo model {bad[0]!r}: choose from {', '.join(demo_names())}")
    shipped = SHIPPED_RECIPES
    default = list(DEMO_RECIPES) + list(dict.fromkeys(m.recipe for n in names for m in methods_of(n)))
    paths = [Path(r) if Path(r).exists() else shipped / f"{r}.yaml" for r in (recipes or default)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise TokenoptError(f"recipe not found: {missing[0]}  (shipped: "
                            f"{', '.join(sorted(p.stem for p in shipped.glob('*.yaml')))})")
    # a shipped recipe that is one of the demo's methods runs with its trained parts; a file of the user's does not
    loaded = [(p.stem, load_recipe(p), p.resolve() == (shipped / f"{p.stem}.yaml").resolve()) for p in paths]
    out = console()
    for name in names:
        with status(f"{name}: {'training' if retrain else 'loading'} the demo model"):
            model, info = demo_model(name, cache_dir=cache_dir, force=retrain)
        out.print(_demo_table(name, model, info, loaded, cache_dir, retrain, batch_size))


def _demo_table(name: str, model, info: dict, loaded: list, cache_dir, retrain: bool, batch_size: int):
    """The table of one demo model: every recipe applied (a demo method: with its trained parts) and measured."""
    import warnings

    from rich.table import Table

    from tokenopt import evaluation as ev
    from tokenopt.data import get_dataset, get_loader
    from tokenopt.demo_methods import demo_method, method_spec
    from tokenopt.flops import count_flops
    from tokenopt.pipeline import optimize
    from tokenopt.report import token_counts_per_image
    from tokenopt.timing import interleaved_throughput

    test = get_dataset(info.get("dataset", name), "test", model=model)
    loader = get_loader(test, 256, train=False)
    example = first_images(test, 2)
    images = first_images(test, len(test))
    variants, trained = {"original": model}, {}
    for stem, rec, is_shipped in loaded:
        if is_shipped and method_spec(name, stem) is not None:
            with status(f"{name}: {'training' if retrain else 'loading'} the {stem} parts"):
                variants[stem], trained[stem] = demo_method(name, model, stem, example, cache_dir=cache_dir,
                                                            force=retrain)
            continue
        with status(f"{name}: applying {stem}"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calib = first_images(get_dataset(info.get("dataset", name), "train", model=model), 64) \
                if _needs_calibration(rec) else None
            variants[stem] = optimize(model, rec, example, calibration=calib, report=False)
    with status(f"{name}: evaluating on {len(test)} test images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")      # a user's recipe with untrained parts: its row shows the cost
        acc = ev.evaluate_many(variants, loader)
        kept = {k: token_counts_per_image(m, images) for k, m in variants.items() if k != "original"}
        flops = {k: count_flops(m, images[:16]) / 16 for k, m in variants.items()}   # a mean: counts vary per image
    with status(f"{name}: timing (batch {batch_size}, eager)"):
        speed = interleaved_throughput(variants, first_images(test, batch_size), rounds=5)
    notes = [info.get("arch", ""), "GFLOPs: multiply-accumulates per image (mean of 16 test images)."]
    if trained:
        where = {stem: "shipped" if i.get("shipped") else ("retrained" if retrain else "cached")
                 for stem, i in trained.items()}
        notes.append("Trained parts: " + ", ".join(f"{stem} ({w})" for stem, w in where.items()) + ".")
    if any(kept.values()):
        notes.append(f"tokens kept/img: of the {_tokens_of(variants)} per image, those that run a gated block "
                     f"(mean over those blocks), min / mean / max over the {len(test)} test images.")
    t = Table(title=f"demo:{name} ({len(test)} test images, eager batch {batch_size})", caption="\n".join(notes))
    for col in ("recipe", "GFLOPs", "img/s", "speedup", "top-1 %", "drop (points)", "tokens kept/img"):
        t.add_column(col, justify="left" if col == "recipe" else "right")
    ref_acc, ref_speed = acc["original"]["top1"], speed["original"]
    for k, m in variants.items():
        t.add_row(k, f"{flops[k] / 1e9:.4f}", f"{speed[k]:.0f}", f"{speed[k] / ref_speed:.2f}x", _pct(acc[k]["top1"]),
                  "" if k == "original" else f"{100 * (ref_acc - acc[k]['top1']):.1f}", _kept(kept.get(k)))
    return t


def _tokens_of(variants: dict) -> str:
    """The tokens per image the first block sees, from the analysis an optimized variant records."""
    analysis = next((getattr(record_of(m), "analysis", None) for k, m in variants.items() if k != "original"), None)
    return str(analysis.blocks[0].tokens) if analysis is not None and analysis.blocks else "?"


def _kept(counts) -> str:
    """min/mean/max over images of the tokens each image keeps, averaged over the layers that keep a varying count."""
    if not counts:
        return ""
    import torch
    per_image = torch.stack([v.float() for v in counts.values()]).mean(0)
    return f"{per_image.min():.0f} / {per_image.mean():.1f} / {per_image.max():.0f}"
