"""How much of ToMe's ideal speedup the hardware allows: ToMe against a free token drop.

    python benchmarks/bench_ceiling.py              # ViT-S/16, r=13, eager batch 1 and 8
    python benchmarks/bench_ceiling.py --r 16 --batches 1 8 32
    python benchmarks/bench_ceiling.py --compile    # also torch.compile'd at batch 8 (minutes)

"slice" keeps the first N - r tokens of every layer instead of matching and merging: the same
token counts as ToMe, at no cost. Its speedup is the ceiling of any reduction with that
schedule on this machine (smaller matrix multiplies run at lower GFLOP/s, so it is below the
FLOPs ratio); ToMe's distance to it is what the matching, merging and proportional attention cost.
Accuracy is not the point here: slicing throws tokens away blindly.
"""
from __future__ import annotations

import argparse
import warnings

import timm
import torch
from rich.console import Console
from rich.table import Table

import tokenopt
from tokenopt.flops import count_flops
from tokenopt.ops import native
from tokenopt.ops import tome as tome_ops
from tokenopt.timing import compile_all, measure_speed


def free_drop(x, metric, size, index, r, prefix):
    """Stand-in for ops.tome.tome_merge with the same output shapes and no work."""
    n = x.shape[1] - r
    return x[:, :n], None if size is None else size[:, :n], None if index is None else index.clamp(max=n - 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--r", type=int, default=13)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models at batch 8")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    size = base.pretrained_cfg["input_size"]

    def recipe(prop_attn):
        return {"version": 1, "rules": [{"pass": "tome", "r": args.r, "prop_attn": prop_attn}]}

    models = {"original": base,
              f"tome r={args.r}": tokenopt.optimize(base, recipe(True), report=False),
              f"tome r={args.r}, no prop_attn": tokenopt.optimize(base, recipe(False), report=False)}
    real = tome_ops.tome_merge
    tome_ops.tome_merge = free_drop   # the pass inserts whatever ops.tome.tome_merge is at rewrite time
    try:
        models[f"slice r={args.r} (free drop)"] = tokenopt.optimize(base, recipe(False), report=False)
    finally:
        tome_ops.tome_merge = real
    one = torch.randn(1, *size)
    gflops = {k: count_flops(m, one) / 1e9 for k, m in models.items()}
    t = Table(title=f"{args.model}: img/s eager (speedup over the original, same run)")
    t.add_column("model")
    t.add_column("GFLOPs", justify="right")
    results = {}
    for b in args.batches:
        t.add_column(f"b{b}", justify="right")
        results[b] = measure_speed(models, torch.randn(b, *size), rounds=args.rounds)
    if args.compile:
        x = torch.randn(8, *size)
        t.add_column("compiled b8", justify="right")
        results["c"] = measure_speed(compile_all(models, x, Console().status), x, rounds=args.rounds)
    for k in models:
        t.add_row(k, f"{gflops[k]:.2f}", *(f"{results[b][0][k]:.1f} ({results[b][1][k]:.2f}x)"
                                           for b in [*args.batches, *(["c"] if args.compile else [])]))
    Console().print(t)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; eager CPU ToMe step: {native.status()}")


if __name__ == "__main__":
    main()
