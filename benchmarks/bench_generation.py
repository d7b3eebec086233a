"""The quality table of the demo generators: what op-level (and on the DiT, stream-level) merging costs
in image quality, one table per model.

    python benchmarks/bench_generation.py                           # both generators, 1,000 samples, 25 steps
    python benchmarks/bench_generation.py --model digits-dit --samples 200 --grids docs/generation

Settings: the original; ToMe at placement: op, ratio 0.3 / 0.5 / 0.7 (tomesd's defaults otherwise:
2 x 2 cells, self-attention only); ToFu at the same ratios where the ToFu pass takes placement: op
("not available" with its reason otherwise); on the DiT also stream-level ToMe (r tokens merged per
block from the first, unmerged before the output). Columns: GFLOPs of one denoising call of one image
(multiply-accumulates), digits-FID (features of demo:digits, generated vs the 360 real test digits),
class accuracy (demo:digits' top-1 on the samples against the class asked for), seconds per image
(all steps, batches of 50, this machine, eager). Every setting draws the same classes from the
same seeded noise. The targets from the issue are checked at ratio 0.5: digits-FID within 10% of
the original's, class accuracy within 2 points.

Uses the trained demo models: the cached ones, else the shipped ones (``demo:digits`` and both
generators ship in the package).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

RATIOS = (0.3, 0.5, 0.7)
STREAM_R = (8,)


def settings_for(name: str) -> dict[str, dict]:
    recipes = {}
    for method in ("tome", "tofu"):
        for r in RATIOS:
            recipes[f"{method} op {r:g}"] = {"version": 1, "rules": [{"pass": method, "placement": "op", "ratio": r}]}
    if name == "digits-dit":
        for r in STREAM_R:
            recipes[f"tome stream r={r}"] = {"version": 1, "rules": [{"pass": "tome", "r": r}]}
    return recipes


def table(name: str, rows, samples: int, steps: int) -> str:
    ref = rows[0]
    lines = [f"demo:{name} ({samples} generated vs {ref.n_real} real test digits, {steps} DDIM steps)", "",
             "| setting | GFLOPs/call | digits-FID | FID vs original | class acc % | s/image |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.fid is None:
            lines.append(f"| {r.setting} | {r.note} | | | | |")
            continue
        rel = "" if r is ref else f"{100 * (r.fid / ref.fid - 1):+.1f}%"
        lines.append(f"| {r.setting} | {r.gflops:.4f} | {r.fid:.2f} | {rel} | {100 * r.class_acc:.1f} | "
                     f"{r.sec_per_image:.4f} |")
    half = next((r for r in rows if r.setting == "tome op 0.5" and r.fid is not None), None)
    if half is not None:
        fid_ok = half.fid <= 1.1 * ref.fid
        acc_ok = half.class_acc >= ref.class_acc - 0.02
        lines += ["", f"targets at ratio 0.5: digits-FID within 10% ({half.fid:.2f} vs {ref.fid:.2f}: "
                      f"{'met' if fid_ok else 'NOT met'}); class accuracy within 2 points "
                      f"({100 * half.class_acc:.1f} vs {100 * ref.class_acc:.1f}: {'met' if acc_ok else 'NOT met'})"]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=["digits-dit", "digits-unet"],
                        help="default: both demo generators")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grids", metavar="DIR", help="write a sample grid PNG per setting into DIR/NAME/")
    args = parser.parse_args(argv)

    from pathlib import Path

    from tokenopt.generation import fid, quality
    from tokenopt.sources import load_model

    classifier = fid.digits_classifier()
    # the floor: real digits against real digits (1,000 training scans vs the 360 test scans)
    from tokenopt.generation.data import digits_images
    train_images, train_labels = digits_images("train")
    feats, preds = fid.features_and_classes(classifier, train_images[:1000])
    print(f"reference: 1000 real training digits vs the 360 test digits: digits-FID "
          f"{fid.frechet_distance(feats, fid.real_features(classifier)):.3f}, class accuracy "
          f"{100 * (preds == train_labels[:1000].numpy()).mean():.1f}%\n")
    for name in args.model or ["digits-dit", "digits-unet"]:
        start = time.perf_counter()
        model, _ = load_model(f"demo:{name}")
        gen = quality.generator_of(model, f"demo:{name}")
        settings = quality.optimized_settings(model, settings_for(name))
        grid_dir = Path(args.grids) / name if args.grids else None
        rows = quality.evaluate_generators(settings, gen, classifier, n=args.samples, steps=args.steps,
                                           seed=args.seed, grid_dir=grid_dir,
                                           progress=lambda m: print(m, file=sys.stderr, flush=True))
        print(table(name, rows, args.samples, args.steps))
        print(f"\n({time.perf_counter() - start:.0f} s, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads)\n", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
