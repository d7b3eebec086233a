"""SPA on Swin (the paper's setting): speed of swin_tiny_patch4_window7_224 with SPA on stages 3-4.

    python benchmarks/bench_swin.py                   # eager batch 1, 8, 32, compiled batch 8, a training step
    python benchmarks/bench_swin.py --quick           # fewer rounds, no compile

``swin_tiny_patch4_window7_224`` (random init), SPA (mode: bypass, each grouping) on every block
of stages 3 and 4, every gate forced to keep a random half of each image's tokens
(tokenopt.passes.spa.force_keep). grouping window: in each window the kept tokens attend among
themselves (padded to the fullest window of the batch); container: each image's kept tokens fill
containers of 49 (padded to the image that needs most); the MLP runs on each image's kept tokens (padded to the fullest
image); the others skip the block. img/s eager at batch 1, 8 and 32 and compiled at batch 8 against
the original in the same interleaved rounds (medians; speedup = median of per-round ratios); "ideal"
is the FLOPs ratio of that very run (FLOPs counted on the rewritten model, so the padding counts);
a training step (forward, cross-entropy, backward, the first grouping) against the original's.
Compiled: the first grouping only.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import warnings

import timm
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import tokenopt
from tokenopt.flops import count_flops
from tokenopt.passes.spa import force_keep
from tokenopt.timing import compile_all, interleaved_times, per_round_speedup

MODEL = "swin_tiny_patch4_window7_224"


def spa_recipe(keep, grouping="window"):
    return {"version": 1, "rules": [{"pass": "spa", "layers": "stage3-4", "mode": "bypass", "min_keep": 0.0,
                                     "max_keep": 1.0, "threshold": 1.0 - keep, "grouping": grouping}]}


def _train_step(model, y):
    def step(x):
        with torch.inference_mode(False), torch.enable_grad():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--quick", action="store_true", help="3 rounds, no compile")
    ap.add_argument("--grouping", nargs="+", default=["window", "container"], choices=["window", "container"])
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.no_compile = 3, True
    warnings.simplefilter("ignore")         # the gates are untrained: forced to keep a known share
    console = Console()
    torch.manual_seed(0)
    base = timm.create_model(MODEL).eval()
    size = base.pretrained_cfg["input_size"]
    example = torch.randn(2, *size)
    models = {"original": base}
    for grouping in args.grouping:
        models[f"spa {grouping}"] = tokenopt.optimize(base, spa_recipe(args.keep, grouping), example, report=False)
    first = f"spa {args.grouping[0]}"
    results: dict = {k: {} for k in models}

    def measure(col, timed, x, rounds):
        times = interleaved_times(timed, x, rounds=rounds)
        speedup = per_round_speedup(times, "original")
        for k, v in times.items():
            results.setdefault(k, {})[col] = (x.shape[0] / statistics.median(v), speedup[k])
        console.print(f"{col}: " + "; ".join(f"{k} {r[col][0]:.1f} img/s ({r[col][1]:.2f}x)"
                                              for k, r in results.items() if col in r), highlight=False)

    cols = []
    with contextlib.ExitStack() as stack:
        for i, k in enumerate(models):
            if k != "original":
                stack.enter_context(force_keep(models[k], args.keep, seed=i))
        x8 = torch.randn(8, *size)
        flops = {k: count_flops(m, x8) for k, m in models.items()}
        f_orig = flops["original"]
        console.print(f"GFLOPs/img: " + "; ".join(f"{k} {f / 8 / 1e9:.2f}" for k, f in flops.items()))
        for b in args.batches:
            with console.status(f"eager, batch {b}"):
                measure(f"eager b{b}", models, torch.randn(b, *size), args.rounds)
            cols.append(f"eager b{b}")
        if not args.no_compile:
            try:
                compiled = compile_all({"original": base, first: models[first]}, x8, console.status)
                measure("compiled b8", compiled, x8, args.rounds)
                cols.append("compiled b8")
            except Exception as e:      # noqa: BLE001  (reported in the table's place)
                console.print(f"compiled b8: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        xt = torch.randn(args.train_batch, *size)
        yt = torch.randint(0, 1000, (args.train_batch,))
        train_base = copy.deepcopy(base).train()
        train_spa = tokenopt.optimize(train_base, spa_recipe(args.keep, args.grouping[0]), example,
                                      report=False).train()
        stack.enter_context(force_keep(train_spa, args.keep, seed=1))
        with console.status(f"training step, batch {args.train_batch}"):
            measure(f"train step b{args.train_batch}",
                    {"original": _train_step(train_base, yt), first: _train_step(train_spa, yt)},
                    xt, max(3, args.rounds // 2))
        cols.append(f"train step b{args.train_batch}")

    t = Table(title=f"{MODEL} (random init) on cpu, {torch.get_num_threads()} threads, SPA bypass on stages 3-4, "
                    f"gates forced to keep {args.keep:.0%} of each image's tokens: img/s (speedup, same rounds)")
    for c in ("model", "GFLOPs/img", "ideal", *cols):
        t.add_column(c, justify="left" if c == "model" else "right")
    for k in models:
        cells = [k, f"{flops[k] / 8 / 1e9:.2f}", f"{f_orig / flops[k]:.2f}x"]
        for c in cols:
            v = results[k].get(c)
            cells.append("-" if v is None else f"{v[0]:.1f} ({v[1]:.2f}x)")
        t.add_row(*cells)
    console.print(t)
    for k in models:
        if k != "original":
            ideal = f_orig / flops[k]
            e8 = results[k].get("eager b8", (0, 0))[1]
            console.print(f"{k}: FLOPs-ideal speedup {ideal:.2f}x; eager b8 {e8:.2f}x = {e8 / ideal:.2f} of ideal "
                          "(target >= 0.85)")
    tr = results[first].get(f"train step b{args.train_batch}")
    if tr:
        console.print(f"training step: {tr[1]:.2f}x the original's (target >= 1.2x)")


if __name__ == "__main__":
    main()
