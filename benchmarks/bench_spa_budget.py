"""SPA at a stated budget (target_keep) against ToSA and ToMe at equal GFLOPs, where objects differ in size.

    python benchmarks/bench_spa_budget.py                  # the defaults below (about 15 CPU minutes)
    python benchmarks/bench_spa_budget.py --target-keep 0.35 --layers 1-5

The demo ViT ``digits-clutter-sizes`` (6 blocks, 64 px, 8 px patches, 64 patch tokens; the digit
drawn 20..44 px per image, so it needs 6 to 36 tokens) is cached by ``tokenopt demo`` (trained here
on first use). SPA on ``--layers`` (bypass, ``gate: {hidden: 64, noise: 0}``, ``target_keep``): gates
trained on box masks, thresholds calibrated to the target, then fine-tuned with the task loss plus
the gates' BCE and calibrated again. ToSA on the same layers at the keep whose GFLOPs are closest
to SPA's measured mean (selectors trained, then fine-tuned, the same epochs); ToMe at the r whose
GFLOPs are closest (training-free and fine-tuned); the original fine-tuned the same epochs is the
reference for the fine-tuned rows. GFLOPs are the mean per image over 256 test images (SPA's vary
per image).

"tokens/img" is, per image, the patch tokens a block runs on averaged over all the blocks: min,
mean and max over the test images (fixed for ToSA and ToMe, per image for SPA). "r(area)" is the
correlation of that count with the digit's area: SPA's claim is that each image keeps what it needs.
The budget lines give target_keep against the share kept on the calibration (training) images and
on the test images. "F1": dense per-patch F1 (benchmarks/accuracy_table.py) of a linear probe on
the patch tokens each model returns under ``outputs: tokens``: the final norm of the tokens leaving
the last block (block 5, also the last one SPA and ToSA gate with the default layers), each token
ToMe merged put back on every patch it stands for, on the 8x8 patch grid.

bench_swin_accuracy.py prints these rows in its table too (:func:`vit_rows`).
"""
from __future__ import annotations

import argparse
import copy
import math
import warnings

import torch
from rich.console import Console

import sys
from pathlib import Path

import tokenopt
from tokenopt.feature_maps import patch_map
from tokenopt.flops import count_flops
from tokenopt.passes.spa import capture_gate_outputs
from tokenopt.record import record_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_table import DenseF1, Row, accuracy_table, correlation, digit_area  # noqa: E402

DEMO = "digits-clutter-sizes"
MODEL = "ViT"


def spa_recipe(args):
    return {"version": 1, "rules": [{"pass": "spa", "layers": args.layers, "gate": {"hidden": 64, "noise": 0},
                                     "target_keep": args.target_keep, "min_keep": args.min_keep, "mode": "bypass"}]}


def tosa_recipe(layers, keep):
    return {"version": 1, "rules": [{"pass": "tosa", "layers": layers, "keep": round(keep, 3),
                                     "selector": {"input": "pooled", "hidden": 32, "kernel": 3}}]}


def tome_recipe(r):
    return {"version": 1, "rules": [{"pass": "tome", "r": r}]}


def fixed_tokens(gm) -> float:
    """Patch tokens a block runs on, averaged over the blocks, for a plan whose counts are fixed:
    a ToSA layer runs on its k selected tokens, any other on the tokens that reach it."""
    rec = record_of(gm)
    prefix = rec.analysis.prefix_tokens
    counts = []
    for lp in rec.plan.layers:
        k = getattr(getattr(lp.step, "params", None), "k", None)
        counts.append(k if k else lp.tokens_in.max - prefix)
    return sum(counts) / len(counts)


@torch.no_grad()
def spa_tokens(gm, images, n_blocks: int, patch_tokens: int, prefix: int) -> torch.Tensor:
    """(n,) per image: patch tokens a block runs on, averaged over the blocks (ungated blocks: all)."""
    gm.eval()
    out = []
    with capture_gate_outputs(gm) as seen:
        for start in range(0, len(images), 128):
            gm(images[start:start + 128])
            kept = sum(o.keep[:, prefix:].sum(1).double() for o in seen.values())
            out.append((kept + (n_blocks - len(seen)) * patch_tokens) / n_blocks)
    return torch.cat(out)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-keep", type=float, default=0.5, help="SPA's mean share of patch tokens per gated layer")
    ap.add_argument("--layers", default="2-5", help="the blocks SPA and ToSA rewrite")
    ap.add_argument("--min-keep", type=float, default=0.05)
    ap.add_argument("--gate-epochs", type=int, default=2, help="SPA gates / ToSA selectors")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--gate-weight", type=float, default=1.0)
    ap.add_argument("--variants", type=int, default=1, help="training images: 1437 per variant")
    ap.add_argument("--test-variants", type=int, default=3, help="test images: 360 per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded machine)")
    ap.add_argument("--untrained", action="store_true", help="smoke run: an untrained model of the demo's architecture")
    ap.add_argument("--limit", type=int, default=None, help="smoke run: train and test on the first N images")
    ap.add_argument("--probe-images", type=int, default=1024, help="training images the F1 probe is fitted on")
    return ap


def vit_rows(args, console) -> tuple[list[Row], list, int]:
    """The demo ViT's rows (original, SPA, ToSA, ToMe at SPA's GFLOPs), SPA's budget lines
    ``[(phase, lines)]`` and the number of test images; ``args`` as :func:`parser` makes them."""
    from tokenopt.data import get_dataset, get_loader
    from tokenopt.demo import build_arch, demo_model, format_arch
    from tokenopt.demo_specs import DEMOS, MEAN, STD
    from tokenopt.train import evaluate
    from tokenopt.train.gate import budget_report, train_gates
    from tokenopt.train.selector import finetune, train_selectors

    if args.untrained:
        torch.manual_seed(0)
        spec = DEMOS[DEMO]
        model = build_arch(format_arch(spec.timm_name, spec.timm_kwargs)).eval()
    else:
        model, _ = demo_model(DEMO)
    size = 64
    train_set = get_dataset(DEMO, "train", size, MEAN, STD, variants=args.variants, masks="box")
    test_set = get_dataset(DEMO, "test", size, MEAN, STD, variants=args.test_variants)
    if args.limit:
        train_set = torch.utils.data.Subset(train_set, range(min(args.limit, len(train_set))))
        test_set = torch.utils.data.Subset(test_set, range(min(args.limit, len(test_set))))
    test_x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    area = digit_area(test_set)
    dense = DenseF1(train_set, test_set, train_images=args.probe_images)
    train_x = torch.stack([train_set[i][0] for i in range(min(1024, len(train_set)))])
    loader = get_loader(test_set, 128, train=False)
    flops_x = test_x[:256]
    example = test_x[:2]
    n_blocks, patch_tokens, prefix = 6, 64, 1
    rows = []

    def gflops(m, x=flops_x):
        return count_flops(m.eval(), x) / len(x) / 1e9

    def add(method, setting, m, tokens, base=None):
        """``base``: the model ``m`` was rewritten from (its patch map is read through outputs: tokens)."""
        m.eval()
        top1 = evaluate(m, loader)["top1"]
        if isinstance(tokens, torch.Tensor):
            span = (tokens.min().item(), tokens.mean().item(), tokens.max().item())
            r = correlation(tokens, area)
        else:
            span, r = (tokens, tokens, tokens), None
        f1 = dense.score(lambda images: patch_map(m, images, base))
        rows.append(Row(MODEL, method, setting, gflops(m), top1, span, f1, r))
        console.print(f"  {MODEL} {method}{', ' + setting if setting else ''}: top-1 {100 * top1:.1f}, GFLOPs {rows[-1].gflops:.4f}, "
                      f"F1 {f1:.3f}", highlight=False)

    add("original", "", model, float(patch_tokens))
    if args.finetune_epochs:   # the same extra training without reduction: what fine-tuning alone gives
        tuned = copy.deepcopy(model)
        with console.status("original: fine-tuning"):
            finetune(tuned, copy.deepcopy(model), train_set, epochs=args.finetune_epochs, quiet=True)
        add("original", f"+ fine-tuned {args.finetune_epochs} ep", tuned, float(patch_tokens))

    # SPA at the stated budget
    base = copy.deepcopy(model)
    gm = tokenopt.optimize(base, spa_recipe(args), example, report=False)
    budgets = []
    with console.status("SPA: training gates (box masks), calibrating"):
        train_gates(gm, base, train_set, "masks", epochs=args.gate_epochs, quiet=True)
    budgets.append((f"gates {args.gate_epochs} ep", budget_report(gm, {"train": train_x, "test": test_x})))
    add(f"SPA target_keep {args.target_keep}", f"gates {args.gate_epochs} ep",
        gm, spa_tokens(gm, test_x, n_blocks, patch_tokens, prefix), base)
    if args.finetune_epochs:
        with console.status("SPA: fine-tuning (task + gate BCE), calibrating"):
            train_gates(gm, base, train_set, "masks", epochs=args.finetune_epochs, finetune=True,
                        gate_weight=args.gate_weight, quiet=True)
        budgets.append((f"+ fine-tuned {args.finetune_epochs} ep",
                        budget_report(gm, {"train": train_x, "test": test_x})))
        add(f"SPA target_keep {args.target_keep}", f"+ fine-tuned {args.finetune_epochs} ep",
            gm, spa_tokens(gm, test_x, n_blocks, patch_tokens, prefix), base)
    spa_flops = rows[-1].gflops

    # ToSA at the keep closest in GFLOPs (its selectors cost otherwise than SPA's gates)
    candidates = [args.target_keep + d for d in (-0.1, -0.05, 0.0, 0.05, 0.1) if 0 < args.target_keep + d <= 1]
    tosa_flops = {k: gflops(tokenopt.optimize(copy.deepcopy(model), tosa_recipe(args.layers, k), example,
                                              report=False), example) for k in candidates}   # fixed counts
    keep = min(tosa_flops, key=lambda k: abs(tosa_flops[k] - spa_flops))
    tbase = copy.deepcopy(model)
    tgm = tokenopt.optimize(tbase, tosa_recipe(args.layers, keep), example, report=False)
    with console.status("ToSA: training selectors"):
        train_selectors(tgm, tbase, train_set, epochs=args.gate_epochs, quiet=True)
    add(f"ToSA keep {keep:.2f}", f"selectors {args.gate_epochs} ep", tgm, fixed_tokens(tgm), tbase)
    if args.finetune_epochs:
        with console.status("ToSA: fine-tuning"):
            finetune(tgm, tbase, train_set, epochs=args.finetune_epochs, quiet=True)
        add(f"ToSA keep {keep:.2f}", f"+ fine-tuned {args.finetune_epochs} ep", tgm, fixed_tokens(tgm), tbase)

    # ToMe at the r closest in GFLOPs
    tome_flops = {r: gflops(tokenopt.optimize(model, tome_recipe(r), example, report=False), example)
                  for r in range(0, 17)}
    r = min(tome_flops, key=lambda r: abs(tome_flops[r] - spa_flops))
    mgm = tokenopt.optimize(model, tome_recipe(r), example, report=False)
    add(f"ToMe r={r}", "training-free", mgm, fixed_tokens(mgm), model)
    if args.finetune_epochs:
        mb = copy.deepcopy(model)
        mgm = tokenopt.optimize(mb, tome_recipe(r), example, report=False)
        with console.status("ToMe: fine-tuning"):
            finetune(mgm, mb, train_set, epochs=args.finetune_epochs, quiet=True)
        add(f"ToMe r={r}", f"+ fine-tuned {args.finetune_epochs} ep", mgm, fixed_tokens(mgm), mb)

    return rows, budgets, len(test_set)


def vit_title(args, n: int) -> str:
    return (f"{DEMO} demo ViT (6 blocks, 64 patch tokens), {n} test images (one standard error about "
            f"{100 * math.sqrt(0.25 / n):.1f} points at most); SPA/ToSA on layers {args.layers}; tokens/img: "
            f"patch tokens a block runs on, averaged over the 6 blocks; F1: probe on the patch tokens "
            f"outputs: tokens returns (8x8)")


def print_budgets(console, budgets, model: str = MODEL) -> None:
    for phase, lines in budgets:
        console.print(f"{model} SPA budget after {phase} (share of patch tokens kept; train: the 1024 "
                      f"calibration images):", highlight=False)
        for line in lines:
            console.print(f"  {line}", highlight=False)


def main(argv=None):
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=180)
    warnings.simplefilter("ignore")
    rows, budgets, n = vit_rows(args, console)
    console.print(accuracy_table(vit_title(args, n), rows))
    print_budgets(console, budgets)


if __name__ == "__main__":
    main()
