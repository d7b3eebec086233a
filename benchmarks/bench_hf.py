"""ToMe on a Hugging Face ViT (captured by torch.export) next to the timm ViT-S (traced by fx), same run.

    python benchmarks/bench_hf.py                  # eager and torch.compile (compiles 5 models: minutes)
    python benchmarks/bench_hf.py --no-compile     # eager only
    python benchmarks/bench_hf.py --r 13 --batch 8 --rounds 9

Both models have ViT-S/16 dimensions (12 blocks, 384 wide, 6 heads, 224 px, random init): the
Hugging Face ``ViTForImageClassification`` and timm's ``vit_small_patch16_224``. Each is timed
against its own unmodified original, all in one interleaved run (tokenopt.timing): img/s is the
median over rounds, the speedup the median of the per-round ratios. "ideal" is the FLOPs ratio.
The row "HF r=0 (capture only)" is the exported graph without merging: what the capture alone
changes (Hugging Face's Python around the ops is gone; no-op dropout calls are dropped).

The last line compares the two speedups: the target is the Hugging Face speedup within 5% of
the timm one (ratio >= 0.95).
"""
from __future__ import annotations

import argparse
import warnings

import timm
import torch
import transformers
from rich.console import Console
from rich.table import Table

import tokenopt
from tokenopt.flops import count_flops
from tokenopt.ops import native
from tokenopt.timing import compile_all, interleaved_times, per_round_speedup
from tokenopt.record import record_of


def hf_vit_small() -> torch.nn.Module:
    cfg = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                 intermediate_size=1536, image_size=224, patch_size=16, num_labels=1000)
    return transformers.ViTForImageClassification(cfg).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r", type=int, default=13)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    console = Console(width=150)
    torch.manual_seed(0)
    example = torch.randn(2, 3, 224, 224)
    recipe = {"version": 1, "rules": [{"pass": "tome", "r": args.r}]}
    hf, tm = hf_vit_small(), timm.create_model("vit_small_patch16_224").eval()
    with console.status("capturing and rewriting"):
        models = {
            "HF original": hf,
            "HF r=0 (capture only)": tokenopt.optimize(hf, {"version": 1, "rules": [{"pass": "tome", "r": 0}]},
                                                       example, report=False),
            f"HF ToMe r={args.r}": tokenopt.optimize(hf, recipe, example, report=False),
            "timm original": tm,
            f"timm ToMe r={args.r}": tokenopt.optimize(tm, recipe, example, report=False),
        }
    captures = {k: getattr(record_of(m), "capture", "-") for k, m in models.items()}
    reference = {k: ("HF original" if k.startswith("HF") else "timm original") for k in models}
    one = torch.randn(1, 3, 224, 224)
    gflops = {k: count_flops(m, one) / 1e9 for k, m in models.items()}

    def speedups(times):
        out = {}
        for ref in set(reference.values()):
            out.update({k: v for k, v in per_round_speedup(times, ref).items() if reference[k] == ref})
        return out

    x = torch.randn(args.batch, 3, 224, 224)
    columns = {}
    with console.status(f"eager, batch {args.batch}"):
        times = interleaved_times(models, x, args.rounds)
    columns[f"eager b{args.batch}"] = (times, speedups(times))
    if not args.no_compile:
        timed = {k: m for k, m in models.items() if "capture only" not in k}
        compiled = compile_all(timed, x, console.status)
        with console.status(f"compiled, batch {args.batch}"):
            times = interleaved_times(compiled, x, args.rounds)
        columns[f"compiled b{args.batch}"] = (times, speedups(times))

    t = Table(title=f"ToMe r={args.r} on ViT-S/16 dimensions, CPU: img/s (speedup over its own original, same run)")
    for col in ("model", "capture", "GFLOPs", "ideal", *columns):
        t.add_column(col, justify="left" if col in ("model", "capture") else "right")
    for k in models:
        row = [k, captures[k], f"{gflops[k]:.2f}", f"{gflops[reference[k]] / gflops[k]:.2f}x"]
        for times, speedup in columns.values():
            if k not in times:
                row.append("-")
                continue
            ips = args.batch / sorted(times[k])[len(times[k]) // 2]
            row.append(f"{ips:.1f} ({speedup[k]:.2f}x)")
        t.add_row(*row)
    console.print(t)
    for name, (_, speedup) in columns.items():
        ratio = speedup[f"HF ToMe r={args.r}"] / speedup[f"timm ToMe r={args.r}"]
        verdict = "within 5%" if ratio >= 0.95 else "NOT within 5%"
        console.print(f"{name}: HF speedup / timm speedup = {ratio:.3f} ({verdict} of the timm speedup)")
    console.print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, timm {timm.__version__}, "
                  f"transformers {transformers.__version__}; eager CPU ToMe step: {native.status()}")


if __name__ == "__main__":
    main()
