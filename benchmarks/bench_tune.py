"""tokenopt tune against the shipped recipes and constant-r ToMe, on both demo ViTs.

    python benchmarks/bench_tune.py                         # both demo models, speed=1.5 and 2.0, eager batch 64
    python benchmarks/bench_tune.py --model digits --speeds 1.5 --threads 2
    python benchmarks/bench_tune.py --model digits --speeds 1.5 --compile   # every model timed compiled
    python benchmarks/bench_tune.py --model hf-digits --speeds 1.5          # a Hugging Face ViT through hf:DIR

Per model: tune at each speed (calibration: a seeded sample of the train split; the tune time printed),
then one interleaved timing session of the original, the tuned recipes, every shipped ToMe/ToFu recipe,
constant-r ToMe over its range and 10 random schedules (the cost model's prediction error), and top-1 on
the fixed test split. The comparison picks, for each tuned recipe, the constant r and the shipped recipes
whose measured speed is within 3% of it (else the slowest one at least 3% faster, marked '>').
``hf-digits`` is a transformers ``ViTForImageClassification`` of the digits demo's shape (32 px, 4 px
patches, width 64, 6 layers, 4 heads), saved with ``save_pretrained``, loaded through ``hf:DIR`` as a
user's would be, and trained here on the digits train split (a few minutes; printed) so that its
top-1 means something.
Threads default to 1: on a shared 2-core machine two threads make every timing wait on the other
processes (the load average is printed).
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import warnings

import torch


HF_DIGITS = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=6,
                 num_attention_heads=4, intermediate_size=256, num_labels=10)


def hf_digits(folder: str, epochs: int = 30):
    """A transformers ViT of the digits demo's shape, saved to ``folder``, loaded through hf:, trained on digits."""
    import transformers

    from tokenopt.data import get_dataset
    from tokenopt.sources import load_model
    from tokenopt.train import train

    torch.manual_seed(0)
    transformers.ViTForImageClassification(transformers.ViTConfig(**HF_DIGITS)).save_pretrained(folder)
    model, _ = load_model(f"hf:{folder}")
    t = time.perf_counter()
    train(model, get_dataset("digits", "train", model=model), epochs=epochs, batch_size=32, lr=1e-3,
          warmup_epochs=2.0, train_all=True, quiet=True)
    print(f"hf-digits: ViTForImageClassification trained {epochs} epochs in {time.perf_counter() - t:.0f} s")
    return model.eval(), {"dataset": "digits"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="digits | digits-clutter (default: both)")
    ap.add_argument("--speeds", default="1.5,2.0")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--search-seconds", type=float, default=120)
    ap.add_argument("--compile", action="store_true", help="tune and time every model under torch.compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    from tokenopt import evaluation as ev
    from tokenopt.errors import TokenoptError
    from tokenopt.data import get_dataset, get_loader
    from tokenopt.demo import demo_model
    from tokenopt.paths import SHIPPED_RECIPES
    from tokenopt.pipeline import optimize
    from tokenopt.timing import compile_all, interleaved_times, per_round_speedup
    from tokenopt.tuning import tune
    from tokenopt.tuning.methods import choose, describe, rules_of

    mode = "compiled" if args.compile else "eager"
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch threads {args.threads}; "
          f"{mode} batch {args.batch_size}")
    speeds = [float(s) for s in args.speeds.split(",")]
    hf_dir = tempfile.TemporaryDirectory(prefix="bench-tune-hf-")
    for name in args.model or ["digits-clutter", "digits"]:
        model, info = hf_digits(hf_dir.name) if name == "hf-digits" else demo_model(name)
        data = info.get("dataset", name)
        test = get_dataset(data, "test", model=model)
        calib = torch.stack([get_dataset(data, "train", model=model)[i][0] for i in range(64)])
        x = torch.stack([test[i][0] for i in range(args.batch_size)])
        tuned, results = {}, {}
        for speed in speeds:
            t = time.perf_counter()
            try:
                res = tune(model, data, f"speed={speed}", batch_size=args.batch_size, compare=False,
                           search_seconds=args.search_seconds, compile=args.compile)
            except TokenoptError as e:
                print(f"demo:{name} speed={speed}: failed after {time.perf_counter() - t:.0f} s: {e}")
                continue
            results[speed] = res
            tuned[f"tuned speed={speed}"] = optimize(model, res.recipe, x[:2], report=False)
            print(f"demo:{name} speed={speed}: tuned in {time.perf_counter() - t:.0f} s "
                  f"({len(res.points)} schedules judged), {describe(res.schedule)}; at tune time "
                  f"{res.chosen.speedup:.2f}x measured, {res.chosen.predicted:.2f}x predicted"
                  + ("; " + "; ".join(res.notes) if res.notes else ""))
        if not results:
            continue
        table = next(iter(results.values())).table
        methods = choose(None)
        shipped = {}
        for path in sorted(SHIPPED_RECIPES.glob("*.yaml")):
            if path.stem.startswith(("tome", "tofu")):
                shipped[path.stem] = optimize(model, path, x[:2], calibration=calib, report=False)
        layers, n0, prefix = len(table.attn), table.tokens[0], table.prefix
        step = 4 if args.compile else 2      # each compiled model is a build of tens of seconds
        constant = {f"tome r={r}": optimize(model, {"version": 1, "rules": [{"pass": "tome", "r": r}]}, x[:2],
                                            report=False)
                    for r in range(2, (n0 - prefix) // 3 + 1, step)}
        rng = random.Random(0)
        randoms = {}
        from tokenopt.tuning.search import Space
        space = Space(layers, n0, prefix, tuple(methods))
        while len(randoms) < 10:
            s = space.normalize((rng.choice(list(methods)), rng.randint(0, (n0 - prefix) // 4)) for _ in range(layers))
            randoms[describe(s)] = s
        random_models = {k: optimize(model, {"version": 1, "rules": rules_of(s, methods)}, x[:2], report=False)
                         for k, s in randoms.items()}
        every = {"original": model, **tuned, **shipped, **constant, **random_models}
        timed = every
        if args.compile:
            print(f"compiling {len(every)} models (load average {os.getloadavg()[0]:.1f})")
            t = time.perf_counter()
            timed = compile_all(every, x)
            print(f"compiled in {time.perf_counter() - t:.0f} s")
        print(f"timing {len(every)} models {mode}, interleaved (load average {os.getloadavg()[0]:.1f})")
        # 11 rounds of at least 0.2 s per sample: one 60 ms call per sample moved speedups 10-15% between sessions
        speed_of = per_round_speedup(interleaved_times(timed, x, rounds=11, min_seconds=0.2), "original")
        acc = ev.evaluate_many({k: v for k, v in every.items() if k not in random_models},
                               get_loader(test, 120, train=False))
        top1 = {k: 100 * v["top1"] for k, v in acc.items()}
        print(f"\ndemo:{name}: top-1 on the test split ({len(test)} images), speedup measured in one session")
        print(f"{'model':<22} {'speedup':>8} {'top-1 %':>8}")
        for k in ["original", *tuned, *shipped, *constant]:
            print(f"{k:<22} {speed_of[k]:>7.2f}x {top1[k]:>8.1f}")
        print(f"\ndemo:{name}: tuned against the same measured speed (within 3%; '>': none was, the slowest faster one)")
        for k in tuned:
            s = speed_of[k]
            for group, label in ((constant, "best constant r"), (shipped, "shipped")):
                near = [c for c in group if abs(speed_of[c] / s - 1) <= 0.03]
                mark = ""
                if not near:
                    faster = sorted((c for c in group if speed_of[c] > s * 1.03), key=lambda c: speed_of[c])
                    near, mark = faster[:1], ">"
                if label == "best constant r":
                    near = sorted(near, key=lambda c: -top1[c])[:1]
                for c in near:
                    print(f"  {k} ({s:.2f}x, {top1[k]:.1f}%) vs {label} {mark}{c} ({speed_of[c]:.2f}x, "
                          f"{top1[c]:.1f}%): margin {top1[k] - top1[c]:+.1f} points")
        print(f"\ndemo:{name}: cost model, predicted vs measured speedup (10 random schedules)")
        errs = []
        for k, s in randoms.items():
            p = table.predict(s).speedup
            errs.append((p - speed_of[k]) / speed_of[k])
            print(f"  {k:<60} predicted {p:.2f}x measured {speed_of[k]:.2f}x error {100 * errs[-1]:+.1f}%")
        for sp, res in results.items():
            p = res.chosen.predicted
            errs_t = (p - speed_of[f'tuned speed={sp}']) / speed_of[f'tuned speed={sp}']
            print(f"  tuned speed={sp:<47} predicted {p:.2f}x measured {speed_of[f'tuned speed={sp}']:.2f}x "
                  f"error {100 * errs_t:+.1f}%")
        print(f"  mean |error| over the 10 random schedules: {100 * sum(map(abs, errs)) / len(errs):.1f}%, "
              f"max {100 * max(map(abs, errs)):.1f}%")
        print(f"load average at the end of demo:{name}: {os.getloadavg()[0]:.1f}\n")


if __name__ == "__main__":
    main()
