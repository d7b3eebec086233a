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
(at most 16 + 16 + 4 + 4 = 40), min / mean / max over the test images.
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch
from rich.console import Console
from rich.table import Table

import tokenopt
from tokenopt.errors import TokenoptError
from tokenopt.flops import count_flops
from tokenopt.passes.spa import capture_gate_outputs
from tokenopt.record import record_of

DEMO = "swin-clutter-sizes"
DATA = "digits-clutter-sizes"
GATED = "stage3-4"


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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=140)
    warnings.simplefilter("ignore")

    from tokenopt.data import get_dataset, get_loader
    from tokenopt.demo import demo_model
    from tokenopt.demo_specs import MEAN, STD
    from tokenopt.train import evaluate
    from tokenopt.train.gate import budget_report, train_gates

    model, _ = demo_model(DEMO)
    train_set = get_dataset(DATA, "train", 64, MEAN, STD, variants=args.variants, masks=True)
    test_set = get_dataset(DATA, "test", 64, MEAN, STD, variants=args.test_variants)
    if args.limit:
        train_set = torch.utils.data.Subset(train_set, range(min(args.limit, len(train_set))))
        test_set = torch.utils.data.Subset(test_set, range(min(args.limit, len(test_set))))
    test_x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    train_x = torch.stack([train_set[i][0] for i in range(min(1024, len(train_set)))])
    loader = get_loader(test_set, 128, train=False)
    flops_x, example = test_x[:args.flops_images], test_x[:2]
    rows = []

    def add(method, m, tokens, per_image=False):
        m.eval()
        top1 = evaluate(m, loader)["top1"]
        if per_image:   # one image at a time: a batch pads every window and image to its fullest
            g = sum(count_flops(m, x[None]) for x in flops_x) / len(flops_x) / 1e9
        else:
            g = count_flops(m, flops_x) / len(flops_x) / 1e9
        span = ((tokens.min().item(), tokens.mean().item(), tokens.max().item()) if isinstance(tokens, torch.Tensor)
                else (tokens,) * 3)
        rows.append((method, g, top1, span))
        console.print(f"  {method}: top-1 {100 * top1:.1f}, GFLOPs {g:.5f}, tokens {span[1]:.1f}", highlight=False)

    probe = tokenopt.optimize(copy.deepcopy(model), tome_recipe(GATED, 0), example, report=False)
    blocks = stage34_blocks(probe)
    add("original", model, float(sum(b.tokens for b in blocks)))

    spa_flops = None
    for grouping in ("window", "container"):
        base = copy.deepcopy(model)
        gm = tokenopt.optimize(base, spa_recipe(grouping, args.target_keep), example, report=False)
        with console.status(f"SPA ({grouping}): training gates on masks, calibrating"):
            train_gates(gm, base, train_set, "masks", epochs=args.gate_epochs, quiet=True)
        for line in budget_report(gm, {"train": train_x, "test": test_x}):
            console.print(f"    {grouping}: {line}", highlight=False)
        add(f"SPA {GATED}, {grouping}, target_keep {args.target_keep}, gates {args.gate_epochs} ep", gm,
            spa_tokens(gm, test_x, blocks), per_image=True)
        if args.finetune_epochs:
            with console.status(f"SPA ({grouping}): fine-tuning (task + gate BCE), calibrating"):
                train_gates(gm, base, train_set, "masks", epochs=args.finetune_epochs, finetune=True, quiet=True)
            add(f"SPA {GATED}, {grouping}, + fine-tuned {args.finetune_epochs} ep", gm,
                spa_tokens(gm, test_x, blocks), per_image=True)
        spa_flops = rows[1][1]          # the window grouping's first row

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
    add(f"ToMe in windows, {layers}, r={r}, training-free", gm, tome_tokens(gm, blocks, r))

    t = Table(title=f"{DEMO} on {DATA}: {len(test_set)} test images; tokens: patch tokens the stage 3-4 blocks "
                    f"run on per image (of {sum(b.tokens for b in blocks)})")
    for c in ("method", "GFLOPs", "top-1 %", "tokens min", "mean", "max"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for method, g, top1, (lo, mean, hi) in rows:
        t.add_row(method, f"{g:.5f}", f"{100 * top1:.1f}", f"{lo:.0f}", f"{mean:.1f}", f"{hi:.0f}")
    console.print(t)


if __name__ == "__main__":
    main()
