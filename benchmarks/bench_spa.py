"""SPA: speed on vit_small_patch16_224 with gates forced to keep half, accuracy on the digits-clutter demo.

    python benchmarks/bench_spa.py                 # both parts (speed compiles two models: minutes)
    python benchmarks/bench_spa.py --quick         # a few minutes: fewer rounds and epochs, no compile
    python benchmarks/bench_spa.py --part speed    # or: --part accuracy

Speed: ``vit_small_patch16_224`` (random init), SPA on layers 4-11, every gate forced to keep a
random half of each image's patch tokens (tokenopt.passes.spa.force_keep; the class token always
stays). img/s eager at batch 1, 8 and 32 for every attention strategy (ops.packing.STRATEGIES;
varlen only on CUDA), compiled at batch 8 (``layout: auto`` is padded under torch.compile, with
capacity ``max_keep`` = the forced keep), against the original in the same interleaved rounds
(medians; speedup = median of per-round ratios). "ideal" is the FLOPs ratio of that very run.
A training step (forward, cross-entropy, backward) against the original's, same rounds.

Accuracy: the digits-clutter demo ViT (6 blocks, 64 px, 8 px patches). By default SPA on layers
1-5 with 64-hidden gates, threshold 0.3 and no sampling noise in training (``gate: {noise: 0}``:
training keeps what inference keeps), gates trained with mask labels (each digit's box, pooled
to the token grid), then fine-tuned with the task loss + the gates' BCE; 1080 test images (one
standard error about 1.1 points). ``--layers 3-5 --gate-hidden 0 --gate-noise 1 --threshold 0.5``
is the paper's gate on the second half. ToSA at the keep whose GFLOPs are closest to SPA's measured mean
(selectors trained, then fine-tuned, the same epochs) and ToMe at the r whose GFLOPs are closest
(training-free and fine-tuned). SPA's GFLOPs vary per image: the table gives the mean over the
test images. The dense check is bench_tosa.py's: a linear per-patch head on each model's patch
tokens (``outputs="tokens"``) tells which patches hold the digit; F1 on the test split.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import tokenopt
from tokenopt.flops import count_flops
from tokenopt.ops.packing import STRATEGIES
from tokenopt.passes.spa import force_keep, gates_of
from tokenopt.timing import compile_all, interleaved_times, per_round_speedup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tosa import dense_f1, patch_labels, tokens_of  # noqa: E402  (the same dense check)


def spa_rule(layers, **kw):
    return {"pass": "spa", "layers": layers, **kw}


# ------------------------------------------------------------------------------------------------
# speed


def _train_step(model, y):
    def step(x):
        with torch.inference_mode(False), torch.enable_grad():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
    return step


def speed(args, console):
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch16_224").eval().to(device)
    size = base.pretrained_cfg["input_size"]
    example = torch.randn(2, *size, device=device)
    layers = list(range(4, 12))
    strategies = [s for s in STRATEGIES if s != "varlen" or device.type == "cuda"]
    models = {"original": base}
    for s in strategies:
        rule = spa_rule(layers, attention=s, layout="packed", max_keep=args.keep, min_keep=0.0)
        models[f"spa {s}"] = tokenopt.optimize(base, {"version": 1, "rules": [rule]}, example, report=False)
    auto = tokenopt.optimize(base, {"version": 1, "rules": [spa_rule(layers, max_keep=args.keep, min_keep=0.0)]},
                             example, report=False)
    spa_models = [m for k, m in models.items() if k != "original"] + [auto]

    with contextlib.ExitStack() as stack:
        for i, m in enumerate(spa_models):
            stack.enter_context(force_keep(m, args.keep, seed=i))
        x8 = torch.randn(8, *size, device=device)
        f_orig = count_flops(base, x8)
        f_spa = count_flops(models[f"spa {strategies[0]}"], x8)
        ideal = f_orig / f_spa
        results = {k: {} for k in models}

        def measure(col, timed, x, rounds):
            times = interleaved_times(timed, x, rounds=rounds)
            speedup = per_round_speedup(times, "original")
            for k, v in times.items():
                results.setdefault(k, {})[col] = (x.shape[0] / statistics.median(v), speedup[k])

        cols = []
        for b in args.batches:
            with console.status(f"eager, batch {b}"):
                measure(f"eager b{b}", models, torch.randn(b, *size, device=device), args.rounds)
            cols.append(f"eager b{b}")
        if not args.no_compile:
            compiled = compile_all({"original": base, "spa auto": auto}, x8, console.status)
            measure("compiled b8", compiled, x8, args.rounds)
            cols.append("compiled b8")
        # training step: forward + backward, the strategy auto picks on this device, and the original
        xt = torch.randn(args.train_batch, *size, device=device)
        yt = torch.randint(0, 1000, (args.train_batch,), device=device)
        train_model = copy.deepcopy(base).train()
        spa_train = tokenopt.optimize(train_model, {"version": 1, "rules": [spa_rule(layers, min_keep=0.0)]},
                                      example, report=False).train()
        stack.enter_context(force_keep(spa_train, args.keep, seed=99))
        with console.status(f"training step, batch {args.train_batch}"):
            measure(f"train step b{args.train_batch}",
                    {"original": _train_step(train_model, yt), "spa auto": _train_step(spa_train, yt)},
                    xt, max(3, args.rounds // 2))
        cols.append(f"train step b{args.train_batch}")

    t = Table(title=f"vit_small_patch16_224 on {device.type}, SPA on layers 4-11, gates forced to keep "
                    f"{args.keep:.0%} of each image's patch tokens: img/s (speedup over the original, same rounds)")
    for c in ("model", "GFLOPs/img", "ideal", *cols):
        t.add_column(c, justify="left" if c == "model" else "right")
    rows = list(models) + (["spa auto"] if "spa auto" in results else [])
    for k in rows:
        flops = f_orig if k == "original" else f_spa
        cells = [k, f"{flops / 8 / 1e9:.2f}", f"{f_orig / flops:.2f}x"]
        for c in cols:
            v = results.get(k, {}).get(c)
            cells.append("-" if v is None else f"{v[0]:.1f} ({v[1]:.2f}x)")
        t.add_row(*cells)
    console.print(t)
    from tokenopt.ops.packing import DEFAULT_STRATEGY
    e8 = {k: results[k].get("eager b8", (0, 0))[1] for k in models if k != "original"}
    best = max(e8, key=e8.get) if e8 else None
    console.print(f"FLOPs-ideal speedup {ideal:.2f}x; best eager b8: {best} {e8.get(best, 0):.2f}x = "
                  f"{e8.get(best, 0) / ideal:.2f} of ideal (target >= 0.85); auto on {device.type} = "
                  f"{DEFAULT_STRATEGY.get(device.type)}; 'spa auto' rows: eager packed / compiled padded "
                  f"(capacity {args.keep:.0%})")
    tr = results["spa auto"].get(f"train step b{args.train_batch}")
    if tr:
        console.print(f"training step: {tr[1]:.2f}x the original's (target >= 1.3x)")


# ------------------------------------------------------------------------------------------------
# accuracy


def accuracy(args, console):
    from tokenopt.data import get_dataset, get_loader
    from tokenopt.demo import demo_model
    from tokenopt.train import evaluate
    from tokenopt.train.gate import measure_kept, train_gates
    from tokenopt.train.selector import finetune, train_selectors

    model, info = demo_model("digits-clutter")
    size, mean, std = info["image_size"], info["mean"], info["std"]
    train_set = get_dataset("digits-clutter", "train", size, mean, std, variants=args.variants, masks=args.mask_kind)
    test_set = get_dataset("digits-clutter", "test", size, mean, std, variants=args.test_variants)
    loader = get_loader(test_set, 128, train=False)
    one = test_set[0][0][None]
    n_flops = min(len(test_set), 256)
    flops_batch = torch.stack([test_set[i][0] for i in range(n_flops)])
    gflops = lambda m: count_flops(m, flops_batch) / n_flops / 1e9  # noqa: E731  (mean per image)
    rows, snapshots = [], []
    example = one.repeat(2, 1, 1, 1)

    def add(name, m, setting, recipe, kept=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.eval()
            top1 = evaluate(m, loader)["top1"]
            f = gflops(m)
        rows.append((name, setting, f, top1, kept))
        snapshots.append((name, setting, recipe, copy.deepcopy(m.state_dict())))
        return f

    plain = {"version": 1, "rules": [{"pass": "tome", "r": 0}]}
    add("original", model, "", plain)
    if args.finetune_epochs:
        tuned = copy.deepcopy(model)
        with console.status("original: fine-tuning"):
            finetune(tuned, copy.deepcopy(model), train_set, epochs=args.finetune_epochs, quiet=True)
        add("original", tuned, f"+ fine-tuned {args.finetune_epochs} ep", plain)

    # SPA, mask labels
    base = copy.deepcopy(model)
    spa = {"version": 1, "rules": [spa_rule(args.layers, gate={"hidden": args.gate_hidden, "noise": args.gate_noise}, threshold=args.threshold,
                                            min_keep=args.min_keep,
                                            mode="bypass")]}
    gm = tokenopt.optimize(base, spa, example, report=False)
    held = torch.stack([test_set[i][0] for i in range(n_flops)])
    with console.status("SPA: training gates (mask labels)"):
        res = train_gates(gm, base, train_set, "masks", epochs=args.gate_epochs, quiet=True)
    console.print(f"SPA gate training, kept per epoch: "
                  + "; ".join(" ".join(f"L{i} {100 * v:.0f}%" for i, v in k.items()) for k in res.kept))
    kept = measure_kept(gm, held)
    add("spa", gm, f"gates {args.gate_epochs} ep (mask labels)", spa, kept)
    if args.finetune_epochs:
        with console.status("SPA: fine-tuning (task + gate BCE)"):
            train_gates(gm, base, train_set, "masks", epochs=args.finetune_epochs, finetune=True,
                        gate_weight=args.gate_weight, quiet=True)
        kept = measure_kept(gm, held)
        add("spa", gm, f"+ fine-tuned {args.finetune_epochs} ep", spa, kept)
    spa_flops = rows[-1][2]
    mean_keep = sum(kept.values()) / len(kept)

    # ToSA at the keep whose GFLOPs are closest to SPA's (same layers, same epochs): SPA's gates and
    # ToSA's selectors cost differently, so the same keep is not the same budget
    def tosa_recipe(keep):
        return {"version": 1, "rules": [{"pass": "tosa", "layers": args.layers, "keep": round(keep, 3),
                                         "selector": {"input": "pooled", "hidden": 32, "kernel": 3}}]}
    candidates = [mean_keep + d for d in (-0.06, -0.04, -0.02, 0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12)
                  if 0.0 < mean_keep + d <= 1.0]
    tosa_flops = {k: gflops(tokenopt.optimize(copy.deepcopy(model), tosa_recipe(k), example, report=False))
                  for k in candidates}
    tosa_keep = min(tosa_flops, key=lambda k: abs(tosa_flops[k] - spa_flops))
    mean_keep = tosa_keep
    tbase = copy.deepcopy(model)
    tosa = tosa_recipe(tosa_keep)
    tgm = tokenopt.optimize(tbase, tosa, example, report=False)
    with console.status("ToSA: training selectors"):
        train_selectors(tgm, tbase, train_set, epochs=args.gate_epochs, quiet=True)
    add(f"tosa keep {mean_keep:.2f}", tgm, f"selectors {args.gate_epochs} ep", tosa)
    if args.finetune_epochs:
        with console.status("ToSA: fine-tuning"):
            finetune(tgm, tbase, train_set, epochs=args.finetune_epochs, quiet=True)
        add(f"tosa keep {mean_keep:.2f}", tgm, f"+ fine-tuned {args.finetune_epochs} ep", tosa)

    # ToMe at the r closest in GFLOPs
    tome_flops = {r: gflops(tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tome", "r": r}]},
                                              report=False)) for r in range(0, 33, 2)}
    r = min(tome_flops, key=lambda r: abs(tome_flops[r] - spa_flops))
    tome = {"version": 1, "rules": [{"pass": "tome", "r": r}]}
    add(f"tome r={r}", tokenopt.optimize(model, tome, report=False), "training-free", tome)
    if args.finetune_epochs:
        mb = copy.deepcopy(model)
        mgm = tokenopt.optimize(mb, tome, report=False)
        with console.status("ToMe: fine-tuning"):
            finetune(mgm, mb, train_set, epochs=args.finetune_epochs, quiet=True)
        add(f"tome r={r}", mgm, f"+ fine-tuned {args.finetune_epochs} ep", tome)

    t = Table(title=f"digits-clutter demo ViT (6 blocks, {size} px, 65 tokens), {len(test_set)} test images; "
                    f"SPA/ToSA on layers {args.layers}")
    for c in ("model", "setting", "GFLOPs/img", "top-1 %", "Δ vs original, same training", "patch tokens kept %"):
        t.add_column(c, justify="left" if c in ("model", "setting") else "right")
    for name, setting, f, top1, k in rows:
        ref = rows[1][3] if "fine-tuned" in setting and args.finetune_epochs else rows[0][3]
        t.add_row(name, setting, f"{f:.4f}", f"{100 * top1:.1f}",
                  "" if name == "original" else f"{100 * (top1 - ref):+.1f}",
                  "" if k is None else " ".join(f"L{i} {100 * v:.0f}" for i, v in k.items()))
    console.print(t)

    if args.no_dense:
        return
    n_train, patch = 512, size // 8
    plain_train = get_dataset("digits-clutter", "train", size, mean, std)
    plain_test = get_dataset("digits-clutter", "test", size, mean, std)
    tr_x = torch.stack([plain_train[i][0] for i in range(n_train)])
    te_x = torch.stack([plain_test[i][0] for i in range(len(plain_test))])
    tr_y = patch_labels(plain_train, range(n_train), patch)
    te_y = patch_labels(plain_test, range(len(plain_test)), patch)
    d = Table(title=f"dense check: a linear per-patch head on each model's patch tokens (outputs='tokens'): does "
                    f"this {patch}x{patch} patch hold the digit? ({n_train} train / {len(te_x)} test images)")
    for c in ("model", "setting", "patch tokens out", "F1 %"):
        d.add_column(c, justify="left" if c in ("model", "setting") else "right")
    for name, setting, recipe, state in snapshots:
        dense = tokenopt.optimize(copy.deepcopy(model), recipe, example, outputs="tokens", report=False)
        dense.load_state_dict(state)
        dense.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ftr, fte = tokens_of(dense, tr_x), tokens_of(dense, te_x)
        d.add_row(name, setting, str(fte.shape[1]), f"{100 * dense_f1(ftr, tr_y, fte, te_y):.1f}")
    console.print(d)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["speed", "accuracy", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="a few minutes: fewer rounds, batches, epochs; no compile")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", type=float, default=0.5, help="speed: the fraction of patch tokens forced kept")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--mask-kind", default="box", choices=["box", "ink"])
    ap.add_argument("--layers", default="1-5", help="accuracy: the blocks SPA and ToSA rewrite")
    ap.add_argument("--gate-hidden", type=int, default=64, help="accuracy: 0 = the paper's linear gate; >0 an MLP")
    ap.add_argument("--gate-noise", type=float, default=0.0, help="accuracy: 0 = training selects as inference")
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--min-keep", type=float, default=0.1)
    ap.add_argument("--gate-weight", type=float, default=1.0)
    ap.add_argument("--gate-epochs", type=int, default=4)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--variants", type=int, default=1)
    ap.add_argument("--test-variants", type=int, default=3)
    ap.add_argument("--no-dense", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.batches, args.no_compile = 3, [1, 8], True
        args.gate_epochs, args.finetune_epochs, args.variants, args.test_variants = 2, 1, 1, 1
    warnings.simplefilter("ignore")
    console = Console(width=160)
    t0 = time.time()
    if args.part in ("speed", "both"):
        speed(args, console)
    if args.part in ("accuracy", "both"):
        accuracy(args, console)
    console.print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {time.time() - t0:.0f} s"
                  + (" (--quick)" if args.quick else ""))


if __name__ == "__main__":
    main()
