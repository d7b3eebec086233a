"""Does an exported ToMe model keep its speedup? ViT-S/16 eager, as a torch.export program, and as ONNX.

    python benchmarks/bench_export.py                    # r=13, batch 8, eager + pt2 + ONNX (onnxruntime)
    python benchmarks/bench_export.py --r 8 --batch 1 --no-onnx

Each runtime runs the unmodified model and the ToMe model in the same interleaved rounds; the
table gives img/s (median over rounds), the speedup over the unmodified model in the *same*
runtime (median of per-round ratios) and over the unmodified model in eager PyTorch. Exported
programs run the ToMe step with PyTorch operators (the native C step cannot be exported); the
eager ToMe row uses the native step when it is built, the "PyTorch step" row does not.
Random weights: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table

import tokenopt
from tokenopt import deploy
from tokenopt.ops import native
from tokenopt.timing import interleaved_times, per_round_speedup


def _pytorch_step(m):
    def run(x):
        with native.disabled():
            return m(x)
    return run


def _ort(path: Path):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x.numpy()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--r", type=int, default=13)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    out = Console(width=120)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    example = torch.randn(2, 3, 224, 224)
    fast = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tome", "r": args.r}]}, example, report=False)
    x = torch.randn(args.batch, 3, 224, 224)
    runtimes: dict[str, dict[str, object]] = {"eager": {"original": model, f"tome r={args.r}": fast,
                                                        f"tome r={args.r} (PyTorch step)": _pytorch_step(fast)}}
    with tempfile.TemporaryDirectory() as tmp, out.status("exporting"):
        pt2 = {}
        for name, m in (("original", model), (f"tome r={args.r}", fast)):
            ep, _ = deploy.export_program(m, example)
            pt2[name] = ep.module()
        runtimes["torch.export (.pt2)"] = pt2
        if not args.no_onnx:
            onnx = {}
            for name, m in (("original", model), (f"tome r={args.r}", fast)):
                prog, _ = deploy.export_onnx(m, example)
                path = Path(tmp) / f"{name.replace(' ', '_')}.onnx"
                prog.save(str(path))
                onnx[name] = _ort(path)
            runtimes["ONNX (onnxruntime)"] = onnx
        flat = {f"{rt}|{k}": f for rt, models in runtimes.items() for k, f in models.items()}
        with out.status(f"timing {len(flat)} models, batch {args.batch}"):
            times = interleaved_times(flat, x, rounds=args.rounds)
    ref_eager = per_round_speedup(times, "eager|original")
    t = Table(title=f"{args.model}, ToMe r={args.r}, batch {args.batch}, CPU ({torch.get_num_threads()} threads)",
              caption=f"eager ToMe step: {native.status()}")
    for col in ("runtime", "model", "img/s", "speedup (same runtime)", "speedup vs eager original"):
        t.add_column(col, justify="left" if col in ("runtime", "model") else "right")
    for rt, models in runtimes.items():
        same = per_round_speedup({k: times[f"{rt}|{k}"] for k in models}, "original")
        for k in models:
            ips = args.batch / sorted(times[f"{rt}|{k}"])[len(times[f"{rt}|{k}"]) // 2]
            t.add_row(rt, k, f"{ips:.1f}", f"{same[k]:.2f}x", f"{ref_eager[f'{rt}|{k}']:.2f}x")
    out.print(t)


if __name__ == "__main__":
    main()
