"""``tokenopt train``: fit the learned parts of a recipe (ToSA selectors, SPA gates), then fine-tune, then save.

    tokenopt train recipes/tosa-keep50.yaml demo:digits-clutter --data digits-clutter -o tosa.pt \\
        --selector-epochs 3 --finetune-epochs 2
    tokenopt train recipes/spa.yaml demo:digits-clutter --data digits-clutter --labels masks -o spa.pt \\
        --gate-epochs 3 --finetune-epochs 2
    tokenopt train recipes/spa.yaml model.pt --arch timm:vit_small_patch16_224 --data imgs/ --masks masks/ ...

Two phases share one checkpoint file (default ``OUT.ckpt``), written after every epoch: the
selectors (KL to the original model's attention, no labels) or the gates (BCE against selection
labels: object masks or the original's attention), then the backbone with the recipe in the loop
(SPA: the task loss plus ``--gate-weight`` × the gates' BCE). ``--resume CKPT`` continues whichever
phase the checkpoint was in.
"""
from __future__ import annotations

import copy
import hashlib
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from tokenopt.cli.common import (MODEL_HELP, ArchOpt, CaptureOpt, CropPctOpt, DataSizeOpt, InterpolationOpt, LeafOpt,
                                 MeanOpt, StdOpt, TrustOpt, WeightsOpt, console, first_images, load_model,
                                 load_recipe, open_dataset, preprocess_options, print_notes, quiet_plan_warnings,
                                 status, user_errors, warn)
from tokenopt.errors import DataError, TokenoptError


@user_errors
def train_(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="The recipe YAML file (ToSA selectors are trained; any recipe can be fine-tuned in).")],
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    data: Annotated[str, typer.Option("--data", "-d", metavar="DATA",
                                      help="Training images: digits | digits-clutter (built in) or an ImageFolder directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT",
                                         help="Where to write the trained model (a tokenopt artifact).")],
    selector_epochs: Annotated[int, typer.Option("--selector-epochs", "--gate-epochs", min=0,
                                                 help="Epochs of selector training (ToSA: KL to the original's "
                                                      "attention) or gate training (SPA: BCE against the labels).")] = 3,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0,
                                                 help="Epochs of backbone fine-tuning with the recipe in the loop.")] = 0,
    resume: Annotated[Optional[Path], typer.Option("--resume", metavar="CKPT",
                                                   help="Continue from a checkpoint of an earlier `tokenopt train`.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", metavar="CKPT",
                                                       help="Checkpoint written after every epoch (default: OUT.ckpt, "
                                                            "or the --resume file).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")] = 64,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Learning rate of the selectors or gates.")] = 1e-3,
    finetune_lr: Annotated[float, typer.Option("--finetune-lr", min=0.0, help="Learning rate of fine-tuning.")] = 1e-4,
    distill: Annotated[bool, typer.Option("--distill", help="Fine-tune on the original model's logits instead "
                                                            "of the labels.")] = False,
    selector_weight: Annotated[float, typer.Option(
        "--selector-weight", min=0.0, help="Keep training the selectors while fine-tuning, with this weight on their "
                                           "KL (0: frozen).")] = 0.0,
    labels: Annotated[Optional[str], typer.Option(
        "--labels", metavar="masks|attention",
        help="SPA gate labels: masks (object masks from the data: digits-clutter draws them, an ImageFolder needs "
             "--masks) or attention (the original model's most-attended tokens). Default: masks with --masks, "
             "else attention.")] = None,
    masks: Annotated[Optional[Path], typer.Option(
        "--masks", metavar="DIR", help="Object masks of an ImageFolder --data: one PNG per image at the same "
                                       "relative path (non-zero pixels are the object).")] = None,
    gate_weight: Annotated[float, typer.Option(
        "--gate-weight", min=0.0, help="SPA: weight of the gates' BCE next to the task loss when fine-tuning.")] = 1.0,
    eval_images: Annotated[int, typer.Option("--eval-images", min=0,
                                             help="Test images for the KL and top-1 table (0: skip).")] = 256,
    limit: Annotated[Optional[int], typer.Option("--limit", min=2, help="Train on the first N images only.")] = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    weights: WeightsOpt = None,
    input_size: DataSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    interpolation: InterpolationOpt = None,
    crop_pct: CropPctOpt = None,
    leaf: LeafOpt = None,
    capture: CaptureOpt = "auto",
) -> None:
    """Train RECIPE's ToSA selectors on MODEL and/or fine-tune MODEL with RECIPE in the loop; save the result to OUT.

    Recipes without learned parameters (ToMe, ToFu) need --finetune-epochs: the backbone then
    learns to work with fewer tokens (the ToMe paper's "train with ToMe").
    """
    from rich.table import Table

    from tokenopt import artifact, files
    from tokenopt.data import get_loader
    from tokenopt.passes.tosa import UntrainedSelectorWarning, selectors
    from tokenopt.pipeline import optimize
    from tokenopt.train import evaluate
    from tokenopt.train.checkpoint import ResumeError, load_checkpoint
    from tokenopt.train.selector import finetune, held_out_kl, train_selectors

    pre = preprocess_options(input_size, mean, std, interpolation, crop_pct)
    rec = load_recipe(recipe)
    passes = {r.pass_name for r in rec.rules}
    spa = "spa" in passes
    learned = bool(passes & {"tosa", "spa"})   # the passes with parameters of their own
    if not learned and not finetune_epochs:
        raise TokenoptError(f"{recipe}: nothing to train: the recipe adds no parameters (no `pass: tosa` rule, no "
                            "`pass: spa` rule). Pass --finetune-epochs N to fine-tune MODEL with the recipe in the loop.")
    if spa and "tosa" in passes:
        raise TokenoptError(f"{recipe}: has both ToSA selectors and SPA gates; `tokenopt train` trains one kind: "
                            "split the recipe, or train them from Python (train_selectors, train_gates)")
    if labels is None:
        labels = "masks" if masks is not None else "attention"
    if labels not in ("masks", "attention"):
        raise typer.BadParameter(f"{labels!r}: use masks or attention", param_hint="--labels")
    if not spa and (masks is not None or labels == "masks"):
        raise TokenoptError(f"{recipe}: --labels/--masks train SPA gates, and the recipe has no `pass: spa` rule")
    if masks is not None and labels != "masks":
        raise TokenoptError("--masks goes with --labels masks (it gives the masks the labels are made from)")
    if spa and distill:
        raise TokenoptError("--distill is not available for SPA: fine-tuning uses the labels and the gates' BCE")

    if spa:
        from tokenopt.passes.spa import UntrainedGateWarning, gates_of
        from tokenopt.train.gate import measure_kept, train_gates
    label = "+".join(dict.fromkeys(r.pass_name for r in rec.rules))
    files.check_output_path(output)
    ckpt_path = checkpoint or resume or Path(f"{output}.ckpt")
    files.check_output_path(ckpt_path)
    parts = [rec.to_yaml(), model, str(arch), data, str(limit)]
    if spa:                          # ToSA fingerprints stay as they were
        parts += [labels, str(masks)]
    if weights is not None or pre:   # only when given: checkpoints of earlier runs still resume
        parts += [str(weights), repr(sorted(pre.items()))]
    fingerprint = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]
    phase = "selectors"
    if resume is not None:
        found = load_checkpoint(resume)["fingerprint"]
        phase = found.rpartition(":")[2]
        if found not in (f"{fingerprint}:selectors", f"{fingerprint}:finetune"):
            raise ResumeError(f"cannot resume from '{resume}': it was written by a run with another recipe, model or "
                              "data. Use the same RECIPE, MODEL, --data and --limit, or start fresh.")
        if phase == "finetune" and not finetune_epochs:
            raise TokenoptError(f"'{resume}' is a fine-tuning checkpoint: pass the --finetune-epochs it was "
                                "started with to continue it.")

    base_model, base = load_model(model, arch, trust_pickle, weights)
    want_masks = (masks if masks is not None else True) if spa and labels == "masks" else None
    if want_masks is True and not _builtin_with_masks(data):
        # the user's data cannot draw masks itself: the same message as for any data without masks
        from tokenopt.train.gate_labels import check_source
        check_source("masks", open_dataset(data, base_model, "train", 2, pre), data)
    train_set = open_dataset(data, base_model, "train", limit, pre, masks=want_masks)
    test_set = None
    if eval_images:
        try:
            test_set = open_dataset(data, base_model, "test", eval_images, pre)
        except DataError as e:   # a folder with train/ only: train anyway, without the table
            warn(f"no evaluation: {e}")
    leaves = list(leaf or [])
    with status("tracing and rewriting"), quiet_plan_warnings():
        gm = optimize(base_model, rec, first_images(train_set, 2), leaf_modules=leaves, capture=capture)
    gm.tokenopt_base, gm.tokenopt_leaf_modules = base, leaves
    out = console()
    print_notes(gm.tokenopt_report.skipped, gm.tokenopt_report.warnings, console(stderr=True))
    original = copy.deepcopy(base_model).eval()   # gm shares base_model's weights; fine-tuning changes them
    images = first_images(test_set, eval_images) if test_set is not None else None
    loader = get_loader(test_set, 128, train=False) if test_set is not None else None
    rows = []

    def row(name: str, m, kl: bool = True) -> None:
        if loader is None:
            return
        with status(f"evaluating {name}"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UntrainedSelectorWarning)   # the table says so already
            if spa:
                warnings.simplefilter("ignore", UntrainedGateWarning)
            top1 = evaluate(m, loader)["top1"]
            if kl and spa:   # the extra column: the share of patch tokens the gates keep
                kept = measure_kept(gm, images)
                rows.append((name, top1, 100 * sum(kept.values()) / len(kept)))
                return
            kls = held_out_kl(gm, original, images) if kl else None
        rows.append((name, top1, None if kls is None else sum(kls.values()) / len(kls)))

    row("original", original, kl=False)
    common = dict(batch_size=batch_size, checkpoint=ckpt_path, fingerprint=fingerprint)
    if not learned:
        row(f"{label}, training-free", gm, kl=False)
    elif phase == "selectors" and spa:
        row(f"{label}, untrained gates", gm)
        if selector_epochs:
            train_gates(gm, original, train_set, labels, epochs=selector_epochs, lr=lr, resume=resume,
                        **{**common, "fingerprint": f"{fingerprint}:selectors"})
            row(f"{label}, gates trained ({selector_epochs} ep, {labels} labels)", gm)
        else:
            warn("--gate-epochs 0: the gates stay untrained; the saved model will warn when used")
        resume = None
    elif phase == "selectors":
        row(f"{label}, untrained selectors", gm)
        if selector_epochs:
            train_selectors(gm, original, train_set, epochs=selector_epochs, lr=lr, resume=resume,
                            **{**common, "fingerprint": f"{fingerprint}:selectors"})
            row(f"{label}, selectors trained ({selector_epochs} ep)", gm)
        else:
            warn("--selector-epochs 0: the selectors stay untrained; the saved model will warn when used")
        resume = None   # the fine-tuning phase starts fresh
    if finetune_epochs and spa:
        train_gates(gm, original, train_set, labels, epochs=finetune_epochs, finetune=True, gate_weight=gate_weight,
                    lr=finetune_lr, resume=resume, **{**common, "fingerprint": f"{fingerprint}:finetune"})
        row(f"{label}, fine-tuned ({finetune_epochs} ep)", gm)
    elif finetune_epochs:
        # without selectors this is the ToMe paper's "train with ToMe": the backbone learns to
        # work with the reduced tokens
        finetune(gm, original, train_set, epochs=finetune_epochs, lr=finetune_lr, distill=distill, resume=resume,
                 selector_weight=selector_weight,
                 **{**common, "fingerprint": f"{fingerprint}:finetune"})
        row(f"{label}, fine-tuned ({finetune_epochs} ep)", gm, kl=learned)

    from tokenopt.distributed import is_main
    if not is_main():   # under torchrun every rank has the same weights: rank 0 reports and saves
        return
    if rows:
        t = Table(title=f"{model} on {data} (test, {len(test_set)} images)")
        for col in ("model", "top-1 %", "patch tokens kept %" if spa else "selector KL"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for name, top1, kl in rows:
            t.add_row(name, f"{100 * top1:.1f}", "" if kl is None else (f"{kl:.1f}" if spa else f"{kl:.4g}"))
        out.print(t)
    r = gm.tokenopt_report
    out.print(f"GFLOPs {r.flops_before / 1e9:.4f} -> {r.flops_after / 1e9:.4f} ({r.flops_ratio:.2f}x), "
              + (f"{len(gates_of(gm))} gates" if spa else f"{len(selectors(gm))} selectors"))
    with status(f"saving {output}"):
        gm.eval()
        artifact.save(gm, output, base=base)
    out.print(f"saved {output} ({output.stat().st_size / 1e6:.1f} MB); checkpoint {ckpt_path}")


def _builtin_with_masks(data: str) -> bool:
    from tokenopt.data import BUILTIN

    return getattr(BUILTIN.get(data), "has_masks", False)
