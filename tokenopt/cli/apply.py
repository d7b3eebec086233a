"""``tokenopt apply`` and ``tokenopt validate``: a recipe against a model, rewritten and saved, or planned only.

    tokenopt apply recipe.yaml model.pt --arch timm:vit_small_patch16_224 -o model.tokenopt.pt --check
    tokenopt validate recipe.yaml [MODEL]
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tokenopt.cli.common import (MODEL_HELP, ArchOpt, CaptureOpt, InputSizeOpt, LeafOpt, StrictOpt, TrustOpt,
                                 WeightsOpt, console,
                                 example_input, first_images, load_model, load_recipe, open_dataset,
                                 parse_input_size, print_notes, quiet_plan_warnings, status, user_errors, warn)
from tokenopt.record import record_of, update_record


@user_errors
def apply(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="The recipe YAML file.")],
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT",
                                         help="Where to write the optimized model (a tokenopt artifact).")],
    strict: StrictOpt = False,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    weights: WeightsOpt = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Compare the original and optimized model on a fixed random batch of 8 (top-1 agreement "
                        "for class logits, cosine for embeddings; says when the outputs cannot differ).")] = False,
    input_size: InputSizeOpt = None,
    leaf: LeafOpt = None,
    calibration: Annotated[Optional[str], typer.Option(
        "--calibration", metavar="DATA",
        help="Calibration images for rules that measure the model (ToFu op: auto): digits, digits-clutter "
             "or an ImageFolder directory (its first 64 training images).")] = None,
    capture: CaptureOpt = "auto",
) -> None:
    """Rewrite MODEL as RECIPE asks and save the result to OUT."""
    from tokenopt import artifact, files
    from tokenopt.ops import native
    from tokenopt.pipeline import optimize

    size = parse_input_size(input_size)
    rec = load_recipe(recipe, strict)
    files.check_output_path(output)  # fail before the slow part, not after it
    base_model, base = load_model(model, arch, trust_pickle, weights)
    x = example_input(base_model, size)
    leaves = list(leaf or [])
    calib = None
    if calibration is not None:
        calib = first_images(open_dataset(calibration, base_model, "train", None), 64)
    with status("tracing, rewriting and counting FLOPs"), quiet_plan_warnings():
        gm = optimize(base_model, rec, x, leaf_modules=leaves, calibration=calib, capture=capture)
    update_record(gm, base=base)
    update_record(gm, leaf_modules=leaves)
    if rec.strict:   # refuse untrained learned parts now, not when the saved model is first used
        from tokenopt.rewrite.learned import check_trained
        check_trained(gm)
    out = console()
    report = record_of(gm).report
    out.print(report.rich_table())
    print_notes(report.skipped, report.warnings, console(stderr=True))
    if native.needed_by(gm):
        state = native.status()
        out.print("merge step for eager CPU inference: " + ("native" if state.startswith("on") else
                  f"PyTorch operators ({state.removeprefix('off: ')})"))
    if check:
        with status("comparing the original and optimized model"):
            line = _check(base_model, gm, x, leaves, capture=record_of(gm).capture)
        out.print(line)
    if base.get("kind") == "class":
        warn(f"the artifact records the base model only as its class {base['class']}; if that class cannot be "
             "built with no arguments, loading needs the architecture: tokenopt.load(path, arch=...) or "
             "`tokenopt inspect --arch ...`. Save a state dict and pass --arch to record it.")
    with status(f"saving {output}"):
        artifact.save(gm, output, base=base)
    out.print(f"saved {output} ({output.stat().st_size / 1e6:.1f} MB)")


def _check(model, gm, x, leaves, n: int = 8, capture: str = "auto") -> str:
    """The comparison line on a seeded random batch of ``n`` (what it compares: tokenopt.check)."""
    import torch

    from tokenopt.analysis import Example
    from tokenopt.check import compare, compare_call

    if isinstance(x, Example):     # several inputs (a denoiser): one call on the example, as the capture made it
        return compare_call(model, gm, x)
    batch = torch.randn(n, *x.shape[1:], generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)
    reference = None
    if getattr(record_of(gm), "outputs", "logits") == "tokens":
        reference = _token_reference(model, x, leaves, capture)
    return compare(model, gm, batch, reference)


def _token_reference(model, x, leaves, capture: str = "auto"):
    """The unmodified model, returning patch tokens the way an ``outputs: tokens`` recipe does."""
    from tokenopt.analysis import analyse
    from tokenopt.pipeline import apply_plan
    from tokenopt.plan import LayerPlan, Plan

    analysis = analyse(model, x, leaves, capture=capture)
    layers = [LayerPlan(b.index, b.path, b.tokens, b.tokens) for b in analysis.blocks]
    return apply_plan(analysis, Plan(None, layers), "tokens")


@user_errors
def validate(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="The recipe YAML file.")],
    model: Annotated[Optional[str], typer.Argument(
        metavar="MODEL", help="Also plan the recipe against this model (token counts per layer).")] = None,
    strict: StrictOpt = False,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    weights: WeightsOpt = None,
    input_size: InputSizeOpt = None,
    leaf: LeafOpt = None,
    capture: CaptureOpt = "auto",
) -> None:
    """Check RECIPE against the schema; with MODEL, plan it layer by layer without rewriting."""
    from tokenopt.analysis import analyse
    from tokenopt.plan import make_plan

    size = parse_input_size(input_size)
    rec = load_recipe(recipe, strict)
    out = console()
    out.print(_rules_table(rec))
    if model is None:
        out.print(f"[green]ok[/green]: {recipe} is a valid recipe ({len(rec.rules)} rule(s)).")
        return
    base_model, _ = load_model(model, arch, trust_pickle, weights)
    x = example_input(base_model, size)
    with status("tracing and analysing"):
        analysis = analyse(base_model, x, list(leaf or []), prefix_tokens=rec.prefix_tokens, capture=capture)
    with quiet_plan_warnings():
        plan = make_plan(rec, analysis)
    out.print(_plan_table(plan, analysis))
    print_notes(plan.skipped, plan.warnings, console(stderr=True))
    first, last = plan.layers[0].tokens_in, plan.layers[-1].tokens_out
    out.print(f"[green]ok[/green]: {recipe} plans on {model}: {first} → {last} tokens through "
              f"{len(plan.layers)} blocks ({analysis.prefix_tokens} prefix).")


def _rules_table(rec):
    from rich.table import Table

    t = Table(title=f"recipe {rec.source}: version {rec.version}, strict {str(rec.strict).lower()}, "
                    f"outputs {rec.outputs}")
    for col in ("rule", "line", "pass", "layers", "options"):
        t.add_column(col)
    for r in rec.rules:
        opts = r.options.model_dump(mode="json") if r.options is not None else {}
        t.add_row(str(r.index + 1), "" if r.line is None else str(r.line), r.pass_name, str(r.layers),
                  ", ".join(f"{k}={v}" for k, v in opts.items()))
    return t


def _plan_table(plan, analysis):
    from rich.table import Table

    t = Table(title=f"plan: {len(plan.layers)} blocks, {analysis.prefix_tokens} prefix token(s)")
    for col, just in (("layer", "right"), ("block", "left"), ("attention", "left"),
                      ("tokens in → out", "right"), ("rule", "left")):
        t.add_column(col, justify=just)
    for lp, b in zip(plan.layers, analysis.blocks):
        t.add_row(str(lp.block), lp.path, b.attention.kind, f"{lp.tokens_in} → {lp.tokens_out}", lp.acted)
    return t
