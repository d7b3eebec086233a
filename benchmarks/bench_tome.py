"""ToMe (and ToFu) speed and FLOPs on vit_small_patch16_224 against the unmodified model, same run.

    python benchmarks/bench_tome.py                 # full table (compiles 4 models: several minutes)
    python benchmarks/bench_tome.py --no-compile    # eager only
    python benchmarks/bench_tome.py --methods tome tofu --r 13   # ToFu next to ToMe at equal r
    python benchmarks/bench_tome.py --device cuda   # where a GPU exists

Prints GFLOPs, img/s (median over interleaved rounds) and speedup over the original (median of
the per-round ratios) for r in --r at batch 8 (eager and torch.compile), and eager at batch 1
and 32; "ideal" is the FLOPs ratio.

The row "r=0 (cleanup only)" is the rewritten graph without any merge: it shows how much of the
eager speedup is tokenopt's graph cleanup (identity and p=0 dropout calls removed) rather than
ToMe; torch.compile removes those calls itself, so it is not compiled. Eager ToMe on the CPU runs
the native step when it could be built (the footer says); --pytorch-step times the PyTorch
operators instead.
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
from tokenopt.timing import compile_all, measure_speed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--r", type=int, nargs="+", default=[8, 13, 16])
    ap.add_argument("--methods", nargs="+", default=["tome"], choices=["tome", "tofu"],
                    help="tofu: the fixed rule (prune first half, MLERP second half) at the same r")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eager-batches", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--pytorch-step", action="store_true", help="time ToMe's PyTorch operators, not the native step")
    args = ap.parse_args(argv)
    if args.pytorch_step:
        native.set_enabled(False)
    warnings.simplefilter("ignore")
    console = Console()
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval().to(device)
    size = base.pretrained_cfg["input_size"]
    models = {"original": base}
    recipes = {
        "tome": lambda r: [{"pass": "tome", "r": r}],
        "tofu": lambda r: [{"pass": "tofu", "layers": "first-half", "r": r, "op": "prune"},
                           {"pass": "tofu", "layers": "second-half", "r": r, "op": "mlerp"}],
    }
    cleanup_only = "r=0 (cleanup only)"
    models[cleanup_only] = tokenopt.optimize(base, {"version": 1, "rules": [{"pass": "tome", "r": 0}]},
                                             example_input=torch.randn(2, *size, device=device), report=False)
    for r in args.r:
        for method in args.methods:
            models[f"{method} r={r}"] = tokenopt.optimize(
                base, {"version": 1, "rules": recipes[method](r)},
                example_input=torch.randn(2, *size, device=device), report=False)
    one = torch.randn(1, *size, device=device)
    gflops = {k: count_flops(m, one) / 1e9 for k, m in models.items()}

    results: dict[str, dict[str, tuple[float, float]]] = {k: {} for k in models}   # (img/s, speedup)

    def measure(column, timed, x):
        speed, speedup = measure_speed(timed, x, rounds=args.rounds)
        for k in timed:
            results[k][column] = (speed[k], speedup[k])

    cols = []
    for b in [args.batch] + [b for b in args.eager_batches if b != args.batch]:
        with console.status(f"eager, batch {b}"):
            measure(f"eager b{b}", models, torch.randn(b, *size, device=device))
        cols.append(f"eager b{b}")
    if not args.no_compile:
        x = torch.randn(args.batch, *size, device=device)
        compiled = compile_all({k: m for k, m in models.items() if k != cleanup_only}, x, console.status)
        measure(f"compiled b{args.batch}", compiled, x)
        cols.insert(1, f"compiled b{args.batch}")

    t = Table(title=f"{args.model} on {device.type}: img/s (speedup over original, same run)")
    t.add_column("model")
    t.add_column("GFLOPs", justify="right")
    t.add_column("ideal", justify="right")
    for c in cols:
        t.add_column(c, justify="right")
    for k in models:
        row = [k, f"{gflops[k]:.2f}", f"{gflops['original'] / gflops[k]:.2f}x"]
        for c in cols:
            if c not in results[k]:
                row.append("-")
                continue
            v, speedup = results[k][c]
            row.append(f"{v:.1f} ({speedup:.2f}x)")
        t.add_row(*row)
    console.print(t)
    console.print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, timm {timm.__version__}")
    step = "PyTorch operators (--pytorch-step)" if args.pytorch_step else native.status()
    console.print(f"eager CPU ToMe step: {step}")


if __name__ == "__main__":
    main()
