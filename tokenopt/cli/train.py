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
from tokenopt.record import record_of, update_record

CALIBRATION_IMAGES = 1024   # the training images train_gates calibrates target_keep on (its default)


@user_errors
def train_(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="The recipe YAML file (ToSA selectors are trained; any recipe can be fine-tuned in).")],
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    data: Annotated[str, typer.Option("--data", "-d", metavar="DATA",
                                      help="Training images: digits | digits-clutter (built in) or an ImageFolder directory (with train/ "
                                           "and val/, or one folder of which 10% is held out for the test table).")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT",
                                         help="Where to write the trained model (a tokenopt artifact).")],
    selector_epochs: Annotated[Optional[int], typer.Option(
        "--selector-epochs", min=0, show_default=False,
        help="ToSA: epochs of selector training (KL to the original's attention). Default: 3.")] = None,
    gate_epochs: Annotated[Optional[int], typer.Option(
        "--gate-epochs", min=0, show_default=False,
        help="SPA: epochs of gate training (BCE against the labels). Default: 3.")] = None,
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
        "--masks", metavar="DIR", help="Object masks of an ImageFolder --data: one PNG per training image, at "
                                       "its path relative to the training folder (for --data D with train/: "
                                       "image D/train/cat/1.jpg, mask DIR/cat/1.png); non-zero pixels are "
                                       "the object.")] = None,
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
    from tokenopt.pipeline import optimize
    from tokenopt.rewrite.learned import kinds_in, learned_modules
    from tokenopt.train import evaluate
    from tokenopt.train.checkpoint import ResumeError, load_checkpoint
    from tokenopt.train.trainers import learned_passes, trainers_for

    pre = preprocess_options(input_size, mean, std, interpolation, crop_pct)
    rec = load_recipe(recipe)
    found = trainers_for(r.pass_name for r in rec.rules)    # pass -> (kind of learned part, trainer)
    if not found and not finetune_epochs:
        rules = ", ".join(f"no `pass: {p}` rule" for p in sorted(learned_passes(), reverse=True))
        raise TokenoptError(f"{recipe}: nothing to train: the recipe adds no parameters ({rules}). Pass "
                            "--finetune-epochs N to fine-tune MODEL with the recipe in the loop.")
    if len(found) > 1:
        nouns = " and ".join(k.noun for k, _ in found.values())
        raise TokenoptError(f"{recipe}: has {nouns}; `tokenopt train` trains one kind: split the recipe, or train "
                            "them from Python (train_selectors, train_gates)")
    kind, trainer = next(iter(found.values()), (None, None))
    uses_labels = trainer is not None and trainer.uses_labels
    selector_epochs = _first_phase_epochs(selector_epochs, gate_epochs, trainer)
    if labels is None:
        labels = "masks" if masks is not None else "attention"
    if labels not in ("masks", "attention"):
        raise typer.BadParameter(f"{labels!r}: use masks or attention", param_hint="--labels")
    if not uses_labels and (masks is not None or labels == "masks"):
        with_labels = [(p, k.noun) for p, (k, t) in trainers_for(learned_passes()).items() if t.uses_labels]
        raise TokenoptError(f"{recipe}: --labels/--masks train " + " or ".join(n for _, n in with_labels)
                            + ", and the recipe has no " + " or ".join(f"`pass: {p}`" for p, _ in with_labels) + " rule")
    if masks is not None and labels != "masks":
        raise TokenoptError("--masks goes with --labels masks (it gives the masks the labels are made from)")
    if trainer is not None and distill and trainer.distill:
        raise TokenoptError(f"--distill is not available for {kind.noun}: {trainer.distill}")

    label = "+".join(dict.fromkeys(r.pass_name for r in rec.rules))
    files.check_output_path(output)
    ckpt_path = checkpoint or resume or Path(f"{output}.ckpt")
    files.check_output_path(ckpt_path)
    parts = [rec.to_yaml(), model, str(arch), data, str(limit)]
    if uses_labels:                  # fingerprints of trainers without labels stay as they were
        parts += [labels, str(masks)]
    if weights is not None or pre:   # only when given: checkpoints of earlier runs still resume
        parts += [str(weights), repr(sorted(pre.items()))]
    fingerprint = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]
    phase = "selectors"
    if resume is not None:
        found_fp = load_checkpoint(resume)["fingerprint"]
        phase = found_fp.rpartition(":")[2]
        if found_fp not in (f"{fingerprint}:selectors", f"{fingerprint}:finetune"):
            raise ResumeError(f"cannot resume from '{resume}': it was written by a run with another recipe, model or "
                              "data. Use the same RECIPE, MODEL, --data and --limit, or start fresh.")
        if phase == "finetune" and not finetune_epochs:
            raise TokenoptError(f"'{resume}' is a fine-tuning checkpoint: pass the --finetune-epochs it was "
                                "started with to continue it.")

    base_model, base = load_model(model, arch, trust_pickle, weights)
    want_masks = (masks if masks is not None else True) if uses_labels and labels == "masks" else None
    if want_masks is True and not _builtin_with_masks(data):
        # the user's data cannot draw masks itself: the same message as for any data without masks
        from tokenopt.train.gate_labels import check_source
        check_source("masks", open_dataset(data, base_model, "train", 2, pre), data)
    train_set, test_set, test_name = _train_and_test_sets(data, base_model, limit, eval_images, pre, want_masks)
    leaves = list(leaf or [])
    with status("tracing and rewriting"), quiet_plan_warnings():
        gm = optimize(base_model, rec, first_images(train_set, 2), leaf_modules=leaves, capture=capture)
    update_record(gm, base=base, leaf_modules=leaves)
    out = console()
    print_notes(record_of(gm).report.skipped, record_of(gm).report.warnings, console(stderr=True))
    original = copy.deepcopy(base_model).eval()   # gm shares base_model's weights; fine-tuning changes them
    images = first_images(test_set, eval_images) if test_set is not None else None
    loader = get_loader(test_set, 128, train=False) if test_set is not None else None
    rows = []

    def row(name: str, m, measure: bool = True) -> None:
        if loader is None:
            return
        with status(f"evaluating {name}"), warnings.catch_warnings():
            for k in kinds_in(gm):          # the table says so already
                warnings.simplefilter("ignore", k.warning)
            top1 = evaluate(m, loader)["top1"]
            value = trainer.measure(gm, original, images) if measure and trainer is not None else None
        rows.append((name, top1, value))

    budgets: list[tuple[str, list[str]]] = []

    def budget(phase: str) -> None:
        """The parts' budget (SPA: target_keep) against what they keep, on calibration and test images."""
        if trainer is None or trainer.budget is None:
            return
        with status(f"measuring the budget ({phase})"):
            lines = trainer.budget(gm, {"train": first_images(train_set, CALIBRATION_IMAGES), "test": images})
        if lines:
            budgets.append((phase, lines))

    row("original", original, measure=False)
    common = dict(batch_size=batch_size, checkpoint=ckpt_path, fingerprint=fingerprint)
    if trainer is None:
        row(f"{label}, training-free", gm, measure=False)
    elif phase == "selectors":
        row(f"{label}, untrained {trainer.noun}", gm)
        if selector_epochs:
            trainer.fit(gm, original, train_set, labels=labels, epochs=selector_epochs, lr=lr, resume=resume,
                        **{**common, "fingerprint": f"{fingerprint}:selectors"})
            row(f"{label}, {trainer.describe_fit(selector_epochs, labels)}", gm)
            budget(trainer.describe_fit(selector_epochs, labels))
        else:
            option = "--gate-epochs" if trainer.uses_labels else "--selector-epochs"
            warn(f"{option} 0: the {trainer.noun} stay untrained; the saved model will warn when used")
        resume = None   # the fine-tuning phase starts fresh
    if finetune_epochs:
        # without learned parts this is the ToMe paper's "train with ToMe": the backbone learns to
        # work with the reduced tokens
        tune = trainer.finetune if trainer is not None else finetune_backbone
        tune(gm, original, train_set, labels=labels, epochs=finetune_epochs, lr=finetune_lr, resume=resume,
             distill=distill, selector_weight=selector_weight, gate_weight=gate_weight,
             **{**common, "fingerprint": f"{fingerprint}:finetune"})
        row(f"{label}, fine-tuned ({finetune_epochs} ep)", gm, measure=trainer is not None)
        budget(f"fine-tuned ({finetune_epochs} ep)")

    from tokenopt.distributed import is_main
    if not is_main():   # under torchrun every rank has the same weights: rank 0 reports and saves
        return
    if rows:
        t = Table(title=f"{model} on {data} ({test_name}, {len(test_set)} images)")
        column = trainer.column if trainer is not None else "selector KL"
        for col in ("model", "top-1 %", column):
            t.add_column(col, justify="left" if col == "model" else "right")
        for name, top1, value in rows:
            t.add_row(name, f"{100 * top1:.1f}", "" if value is None else format(value, trainer.number_format))
        out.print(t)
    for phase, lines in budgets:
        out.print(f"budget after {phase} (share of patch tokens kept; train: the calibration images):",
                  highlight=False)
        for line in lines:
            out.print(f"  {line}", highlight=False)
    r = record_of(gm).report
    parts_line = f"{len(learned_modules(gm, kind))} {trainer.noun}" if kind is not None else "0 selectors"
    out.print(f"GFLOPs {r.flops_before / 1e9:.4f} -> {r.flops_after / 1e9:.4f} ({r.flops_ratio:.2f}x), {parts_line}")
    with status(f"saving {output}"):
        gm.eval()
        artifact.save(gm, output, base=base)
    out.print(f"saved {output} ({output.stat().st_size / 1e6:.1f} MB); checkpoint {ckpt_path}")


def finetune_backbone(model, original, data, *, labels=None, gate_weight=0.0, **options):
    """Fine-tuning with a training-free recipe: the backbone alone (ToMe's "train with ToMe")."""
    from tokenopt.train.selector import finetune

    return finetune(model, original, data, **options)


def _first_phase_epochs(selector_epochs: int | None, gate_epochs: int | None, trainer) -> int:
    """The epochs of the first phase, from the option the recipe's trainer names (--selector-epochs,
    --gate-epochs; 3 when not given); an option of another kind of learned part is refused."""
    from tokenopt.train.trainers import learned_passes, trainers_for

    given = {"--selector-epochs": selector_epochs, "--gate-epochs": gate_epochs}
    mine = trainer.epochs_option if trainer is not None else None
    for flag, value in given.items():
        if value is not None and flag != mine:
            what = next((f"{k.noun}" for k, t in trainers_for(learned_passes()).values() if t.epochs_option == flag),
                        "learned parts")
            raise TokenoptError(f"{flag} trains {what}, and the recipe has none: use {mine or '--finetune-epochs'}")
    return 3 if given.get(mine) is None else given[mine]


def _train_and_test_sets(data: str, model, limit, eval_images: int, pre: dict, masks):
    """(training set, test set or None, the test set's name in the table).

    A folder without train/ and val/ would give its training images back as the test split: a
    seeded share of it is held out instead (tokenopt.data.holdout), and the run says so."""
    import torch

    from tokenopt.data.datasets import single_folder
    from tokenopt.data.holdout import HOLDOUT_FRACTION, HOLDOUT_SEED, holdout_indices

    root = single_folder(data)
    if root is None:
        train_set, test_set = open_dataset(data, model, "train", limit, pre, masks=masks), None
        if eval_images:
            try:
                test_set = open_dataset(data, model, "test", eval_images, pre)
            except DataError as e:   # a folder with train/ only: train anyway, without the table
                warn(f"no evaluation: {e}")
        return train_set, test_set, "test"
    full = open_dataset(data, model, "train", None, pre, masks=masks)
    train_idx, held_idx = holdout_indices(len(full), where=f"'{root}'")
    train_set = torch.utils.data.Subset(full, train_idx[:limit])
    test_set = None
    if eval_images:
        test_set = torch.utils.data.Subset(open_dataset(data, model, "test", None, pre), held_idx[:eval_images])
    console(stderr=True).print(
        f"note: '{root}' has no train/ and val/ folders, so {len(held_idx)} of its {len(full)} images "
        f"({HOLDOUT_FRACTION:.0%}, chosen with seed {HOLDOUT_SEED}) are held out: training uses the other "
        f"{len(train_idx)}" + (f" (the first {len(train_set)}, --limit)" if len(train_set) < len(train_idx) else "")
        + (f"; the table reports {len(test_set)} held-out images" if test_set is not None else "") + ".",
        soft_wrap=True, highlight=False)
    return train_set, test_set, "held out"


def _builtin_with_masks(data: str) -> bool:
    from tokenopt.data import BUILTIN

    return getattr(BUILTIN.get(data), "has_masks", False)
