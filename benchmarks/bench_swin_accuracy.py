"""SPA on Swin stages 3-4 (both groupings) against the original and ToMe-in-windows, on size-varying digits.

    python benchmarks/bench_swin_accuracy.py                       # defaults below (a few CPU minutes)
    python benchmarks/bench_swin_accuracy.py --gate-epochs 2 --test-variants 3

The demo Swin ``swin-clutter-sizes`` (img 64, window 4, 4 stages on 16x16 .. 2x2 grids; blocks 2-3
are stage 3 (16 tokens, one window), 4-5 stage 4 (4 tokens)) is cached by ``tokenopt demo`` (trained
on first use). SPA on ``stage3-4``, bypass, ``gate: {hidden: 64, noise: 0}``, ``target_keep``: gates
trained on the data's masks (BCE, the labels rasterised at each stage's grid), thresholds calibrated
to the target on the training images; with ``--finetune-epochs`` the whole model then trains on the
task loss plus the gates' BCE (the gates' gradient from the task loss comes through the windowed
path's straight-through term) and the thresholds are calibrated again. ToMe merges inside each
window (the same r in every window) on the layers and r whose GFLOPs are closest to SPA's (window
grouping), training-free.

Columns: mean GFLOPs per image over 256 test images (SPA's vary per image, so SPA's are counted one
image at a time: in a batch every window and image is padded to the batch's fullest, which a batch
of 256 makes nearly the whole grid, and the count would be the padded one); top-1 on the test set;
"tokens" per image: the patch tokens the stage 3-4 blocks run on, summed over those 4 blocks
(at most 16 + 16 + 4 + 4 = 40), min / mean / max over the test images; r(area): its correlation
with the digit's area.

"F1": dense per-patch F1 from the stage-3 map. The map is the tokens leaving stage 3 (the output
of its last block, block 3, on its 4x4 grid: each token covers 16x16 px), read from each model as
it runs (``tokenopt.feature_maps.stream_map``, stream 2). Every method leaves it whole: SPA in
bypass mode puts the tokens its gates skipped back in place (they skipped the blocks), ToMe in
windows restores its merged tokens before the window reverse. A patch is a digit patch when the
digit's box (the data's ``box`` mask) covers at least half of it; a logistic-regression probe
(tokenopt.probe: standardised tokens, positives weighted by negatives / positives, 300 full-batch
Adam steps, seed 0) is fitted per method on the maps of the first ``--probe-images`` training
images, and F1 of "digit patch" is counted over every patch of the test images
(benchmarks/accuracy_table.py).

One table: the rows above, then (unless ``--no-vit``) the plain-ViT rows of
``bench_spa_budget.py`` (imported: :func:`bench_spa_budget.vit_rows`) on the same data with the same
training epochs and target: the ``digits-clutter-sizes`` demo ViT, original, SPA (``target_keep``)
on ``--vit-layers``, ToSA and ToMe at the keep / r whose GFLOPs are closest to SPA's. Their tokens
are the patch tokens a block runs on averaged over the 6 blocks (of 64), and their F1 is read from
the patch tokens ``outputs: tokens`` returns: the final norm of the tokens leaving block 5 (the last
block, and the last gated one with the default layers), each token ToMe merged put back on every
patch it stands for, on the 8x8 patch grid (8x8 px each). The two models' F1s are on different
grids and are compared within a model, not across.

The full table (the integrator's run):

    python benchmarks/bench_swin_accuracy.py --gate-epochs 2 --finetune-epochs 1
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from rich.console import Console

import tokenopt
from tokenopt.errors import TokenoptError
from tokenopt.feature_maps import stream_map
from tokenopt.flops import count_flops
from tokenopt.passes.spa import capture_gate_outputs
from tokenopt.record import record_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_table import DenseF1, Row, accuracy_table, correlation, digit_area  # noqa: E402
from bench_spa_budget import parser as vit_parser, print_budgets, vit_rows, vit_title  # noqa: E402

DEMO = "swin-clutter-sizes"
DATA = "digits-clutter-sizes"
GATED = "stage3-4"
STAGE3 = 2          # stream index of Swin's stage 3 (streams count from 0)
MODEL = "Swin"


def spa_recipe(grouping: str, target_keep: float) -> dict:
    return {"version": 1, "rules": [{"pass": "spa", "layers": GATED, "gate": {"hidden": 64, "noise": 0},
                                     "target_keep": target_keep, "min_keep": 0.1, "mode": "bypass",
                                     "grouping": grouping}]}


def tome_recipe(layers: str, r: int) -> dict:
    return {"version": 1, "rules": [{"pass": "tome", "layers": layers, "r": r}]}


def stage34_blocks(model) -> list:
    return [b for b in record_of(model).analysis.blocks if b.window is not None and b.stream + 1 in (3, 4)]   # stage = stream + 1


@torch.no_grad()
def spa_tokens(gm, images: torch.Tensor, blocks: list) -> torch.Tensor:
    """(n,) per image: the patch tokens the stage 3-4 blocks run on, summed (an ungated block: all)."""
    gm.eval()
    out = []
    with capture_gate_outputs(gm) as seen:
        for start in range(0, len(images), 128):
            gm(images[start:start + 128])
            out.append(sum(seen[b.index].keep.sum(1).double() if b.index in seen
                           else torch.full((len(seen[next(iter(seen))].keep),), float(b.tokens)) for b in blocks))
    return torch.cat(out)


def tome_tokens(gm, blocks: list, r: int) -> float:
    """ToMe in windows: a merged block's attention runs on r fewer tokens in each of its windows."""
    merged = {lp.block for lp in record_of(gm).plan.layers if lp.step is not None}
    return float(sum(b.tokens - (r * b.window.windows if b.index in merged else 0) for b in blocks))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-keep", type=float, default=0.5)
    ap.add_argument("--gate-epochs", type=int, default=1)
    ap.add_argument("--finetune-epochs", type=int, default=0,
                    help="then fine-tune SPA's model (task loss + the gates' BCE) and calibrate again; 0: gates only")
    ap.add_argument("--variants", type=int, default=1, help="training images: 1437 per variant")
    ap.add_argument("--test-variants", type=int, default=3, help="test images: 360 per variant")
    ap.add_argument("--flops-images", type=int, default=256, help="test images the mean GFLOPs is taken over")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="smoke run: train and test on the first N images")
    ap.add_argument("--probe-images", type=int, default=1024, help="training images the F1 probe is fitted on")
    ap.add_argument("--vit-layers", default="2-5", help="the plain ViT's blocks SPA and ToSA rewrite")
    ap.add_argument("--no-vit", action="store_true", help="Swin rows only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=180)
    warnings.simplefilter("ignore")

    from tokenopt.data import get_dataset, get_loader
    from tokenopt.demo import demo_model
    from tokenopt.demo_specs import MEAN, STD
    from tokenopt.train import evaluate
    from tokenopt.train.gate import budget_report, train_gates
    from tokenopt.train.selector import finetune

    model, _ = demo_model(DEMO)
    train_set = get_dataset(DATA, "train", 64, MEAN, STD, variants=args.variants, masks=True)
    test_set = get_dataset(DATA, "test", 64, MEAN, STD, variants=args.test_variants)
    if args.limit:
        train_set = torch.utils.data.Subset(train_set, range(min(args.limit, len(train_set))))
        test_set = torch.utils.data.Subset(test_set, range(min(args.limit, len(test_set))))
    test_x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    train_x = torch.stack([train_set[i][0] for i in range(min(1024, len(train_set)))])
    area = digit_area(test_set)
    dense = DenseF1(train_set, test_set, train_images=args.probe_images)
    loader = get_loader(test_set, 128, train=False)
    flops_x, example = test_x[:args.flops_images], test_x[:2]
    rows, budgets = [], []

    def add(method, setting, m, tokens, per_image=False):
        m.eval()
        top1 = evaluate(m, loader)["top1"]
        if per_image:   # one image at a time: a batch pads every window and image to its fullest
            g = sum(count_flops(m, x[None]) for x in flops_x) / len(flops_x) / 1e9
        else:
            g = count_flops(m, flops_x) / len(flops_x) / 1e9
        if isinstance(tokens, torch.Tensor):
            span, r = (tokens.min().item(), tokens.mean().item(), tokens.max().item()), correlation(tokens, area)
        else:
            span, r = (tokens,) * 3, None
        f1 = dense.score(lambda images: stream_map(m, images, STAGE3))
        rows.append(Row(MODEL, method, setting, g, top1, span, f1, r))
        console.print(f"  {MODEL} {method}{', ' + setting if setting else ''}: top-1 {100 * top1:.1f}, GFLOPs {g:.5f}, "
                      f"tokens {span[1]:.1f}, F1 {f1:.3f}", highlight=False)

    probe = tokenopt.optimize(copy.deepcopy(model), tome_recipe(GATED, 0), example, report=False)
    blocks = stage34_blocks(probe)
    add("original", "", model, float(sum(b.tokens for b in blocks)))
    if args.finetune_epochs:   # the same extra training without reduction: what fine-tuning alone gives
        tuned = copy.deepcopy(model)
        with console.status("original: fine-tuning"):
            finetune(tuned, copy.deepcopy(model), train_set, epochs=args.finetune_epochs, quiet=True)
        add("original", f"+ fine-tuned {args.finetune_epochs} ep", tuned, float(sum(b.tokens for b in blocks)))

    spa_flops = None
    for grouping in ("window", "container"):
        base = copy.deepcopy(model)
        gm = tokenopt.optimize(base, spa_recipe(grouping, args.target_keep), example, report=False)
        with console.status(f"SPA ({grouping}): training gates on masks, calibrating"):
            train_gates(gm, base, train_set, "masks", epochs=args.gate_epochs, quiet=True)
        budgets.append((f"{grouping}, gates {args.gate_epochs} ep",
                        budget_report(gm, {"train": train_x, "test": test_x})))
        method = f"SPA {GATED}, {grouping}, target_keep {args.target_keep}"
        add(method, f"gates {args.gate_epochs} ep", gm, spa_tokens(gm, test_x, blocks), per_image=True)
        if args.finetune_epochs:
            with console.status(f"SPA ({grouping}): fine-tuning (task + gate BCE), calibrating"):
                train_gates(gm, base, train_set, "masks", epochs=args.finetune_epochs, finetune=True, quiet=True)
            budgets.append((f"{grouping}, + fine-tuned {args.finetune_epochs} ep",
                            budget_report(gm, {"train": train_x, "test": test_x})))
            add(method, f"+ fine-tuned {args.finetune_epochs} ep", gm, spa_tokens(gm, test_x, blocks), per_image=True)
        spa_flops = next(r.gflops for r in rows if r.method.startswith("SPA"))   # the window grouping's first

    # ToMe in windows: the layers and r whose GFLOPs are closest to SPA's (window grouping)
    found = {}
    for layers in (GATED, "stage2-4", "all", "stage1-3", "stage1-2"):    # stage 4 windows (2x2) allow r <= 2
        for r in range(1, 9):
            try:
                gm = tokenopt.optimize(model, tome_recipe(layers, r), example, report=False)
            except TokenoptError:       # r above what a window of some selected block can give
                continue
            found[(layers, r)] = (count_flops(gm.eval(), example) / len(example) / 1e9, gm)
    (layers, r), (_, gm) = min(found.items(), key=lambda kv: abs(kv[1][0] - spa_flops))
    add(f"ToMe in windows, {layers}, r={r}", "training-free", gm, tome_tokens(gm, blocks, r))
    title = (f"{DEMO} on {DATA}: {len(test_set)} test images; tokens/img: patch tokens the stage 3-4 blocks run on "
             f"per image (of {sum(b.tokens for b in blocks)}); F1: probe on the stage-3 map (4x4)")
    print_budgets(console, budgets, f"{MODEL} ({DEMO})")
    if args.no_vit:
        console.print(accuracy_table(title, rows))
        return

    vit_args = vit_parser().parse_args(["--layers", args.vit_layers, "--target-keep", str(args.target_keep),
                                        "--gate-epochs", str(args.gate_epochs),
                                        "--finetune-epochs", str(args.finetune_epochs),
                                        "--variants", str(args.variants), "--test-variants", str(args.test_variants),
                                        "--threads", str(args.threads), "--probe-images", str(args.probe_images)]
                                       + (["--limit", str(args.limit)] if args.limit else []))
    vit, vit_budgets, n = vit_rows(vit_args, console)
    print_budgets(console, vit_budgets)
    console.print(accuracy_table(f"Swin: {title}. ViT: {vit_title(vit_args, n)}", rows + vit))


if __name__ == "__main__":
    main()
