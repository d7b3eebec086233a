"""ToSA on the trained digits-clutter demo ViT: top-1, GFLOPs and speed next to the original and ToMe.

    python benchmarks/bench_tosa.py                          # keep 0.5 and 0.7, pooled selectors
    python benchmarks/bench_tosa.py --input map --hidden 8   # the paper's selector on full maps
    python benchmarks/bench_tosa.py --compile                # also torch.compile'd speed (slow to build)

For every keep: the recipe's selectors are trained alone (KL to the original's attention, no
labels), then the backbone is fine-tuned with ToSA in the loop (labels). ToMe runs at the r whose
GFLOPs are closest to that ToSA model's, training-free and fine-tuned with the same budget.
Speed: img/s, interleaved rounds, medians (tokenopt.timing). The dense check trains a linear
per-patch head on each model's patch tokens (``outputs="tokens"``) to tell which 8x8 patches
hold the digit (ClutteredDigitsDataset.box), and reports its F1 on the test split.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import tokenopt
from tokenopt.data import get_dataset, get_loader
from tokenopt.demo import demo_model
from tokenopt.flops import count_flops
from tokenopt.timing import compile_all, interleaved_throughput
from tokenopt.train import evaluate
from tokenopt.train.selector import finetune, held_out_kl, train_selectors
from tokenopt.record import record_of


def tosa_recipe(keep, args):
    return {"version": 1, "rules": [{"pass": "tosa", "layers": args.layers, "keep": keep, "bypass": args.bypass,
                                     "selector": {"input": args.input, "hidden": args.hidden, "kernel": 3}}]}


def tome_recipe(r):
    return {"version": 1, "rules": [{"pass": "tome", "r": r}]}


def patch_labels(ds, indices, patch: int) -> torch.Tensor:
    """(n, grid*grid) 1 where at least half of the patch lies inside the digit's box."""
    grid = ds.image_size // patch
    lo = torch.arange(grid) * patch
    out = []
    for i in indices:
        top, left, bottom, right = ds.box(i)
        rows = (torch.clamp(torch.minimum(lo + patch, torch.tensor(bottom)) - torch.maximum(lo, torch.tensor(top)), 0))
        cols = (torch.clamp(torch.minimum(lo + patch, torch.tensor(right)) - torch.maximum(lo, torch.tensor(left)), 0))
        out.append(((rows[:, None] * cols[None, :]) * 2 >= patch * patch).flatten())
    return torch.stack(out).float()


@torch.no_grad()
def tokens_of(model, images, batch=128):
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def dense_f1(train_x, train_y, test_x, test_y, steps=300) -> float:
    """F1 of a linear per-patch classifier fitted on (train_x, train_y) tokens."""
    mu, sd = train_x.mean((0, 1)), train_x.std((0, 1)) + 1e-6
    head = torch.nn.Linear(train_x.shape[-1], 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    pos = train_y.mean()
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head((train_x - mu) / sd).squeeze(-1), train_y,
                                                  pos_weight=(1 - pos) / pos)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = head((test_x - mu) / sd).squeeze(-1) > 0
    tp = (pred & (test_y > 0)).sum().item()
    return 2 * tp / max(pred.sum().item() + (test_y > 0).sum().item(), 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--layers", default="second-half")
    ap.add_argument("--input", default="pooled", choices=["pooled", "map"])
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--bypass", default="block", choices=["block", "attention"])
    ap.add_argument("--selector-epochs", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--variants", type=int, default=2, help="training images: 1437 x variants")
    ap.add_argument("--test-variants", type=int, default=4,
                    help="test images: 360 x this (fresh placements of the test digits; 1 = the plain test split)")
    ap.add_argument("--no-tome-finetune", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    console = Console(width=150)
    t0 = time.time()
    model, info = demo_model("digits-clutter")
    size = info["image_size"]
    train_set = get_dataset("digits-clutter", "train", size, info["mean"], info["std"], variants=args.variants)
    test_set = get_dataset("digits-clutter", "test", size, info["mean"], info["std"], variants=args.test_variants)
    loader = get_loader(test_set, 128, train=False)
    one = test_set[0][0][None]
    gflops = lambda m: count_flops(m, one) / 1e9  # noqa: E731
    held_out = torch.stack([test_set[i][0] for i in range(256)])
    plain = tome_recipe(0)                       # r = 0 leaves the graph as it is: the original
    rows, models, snapshots, reports = [], {"original": model}, [], []

    def add(name, m, setting, recipe, flops=None, kl=None):
        """A table row; its weights are kept for the dense check."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            top1 = evaluate(m, loader)["top1"]
        rows.append((name, setting, flops if flops is not None else gflops(m), top1, kl))
        snapshots.append((name, setting, recipe, copy.deepcopy(m.state_dict())))

    def mean_kl(gm, original):
        return sum(kls := held_out_kl(gm, original, held_out).values()) / len(kls)

    add("original", model, "", plain)
    if args.finetune_epochs:
        # the demo model is small and briefly trained: more epochs alone move its accuracy, so the
        # fine-tuned rows have this one to compare with
        tuned = copy.deepcopy(model)
        with console.status("original: fine-tuning"):
            finetune(tuned, copy.deepcopy(model), train_set, epochs=args.finetune_epochs, quiet=True)
        add("original", tuned, f"+ fine-tuned {args.finetune_epochs} ep", plain)
    # ToMe's GFLOPs for every r, once: each ToSA budget below picks the closest
    tome_gflops = {r: gflops(tokenopt.optimize(model, tome_recipe(r), report=False)) for r in range(0, 33)}
    for keep in args.keeps:
        base = copy.deepcopy(model)          # fine-tuning changes the weights the rewritten model shares
        recipe = tosa_recipe(keep, args)
        gm = tokenopt.optimize(base, recipe, one.repeat(2, 1, 1, 1))
        reports.append((keep, record_of(gm).report))   # per layer: GFLOPs and what the selector costs
        f = gflops(gm)
        add(f"tosa keep {keep}", gm, "untrained selectors", recipe, f, mean_kl(gm, base))
        with console.status(f"ToSA keep {keep}: training selectors"):
            train_selectors(gm, base, train_set, epochs=args.selector_epochs, quiet=True)
        add(f"tosa keep {keep}", gm, f"selectors {args.selector_epochs} ep", recipe, f, mean_kl(gm, base))
        if args.finetune_epochs:
            with console.status(f"ToSA keep {keep}: fine-tuning"):
                finetune(gm, base, train_set, epochs=args.finetune_epochs, quiet=True)
            add(f"tosa keep {keep}", gm, f"+ fine-tuned {args.finetune_epochs} ep", recipe, f)
        models[f"tosa keep {keep}"] = gm
        # ToMe at the r whose GFLOPs are closest
        r = min(tome_gflops, key=lambda r: abs(tome_gflops[r] - f))
        tome = tokenopt.optimize(model, tome_recipe(r), report=False)
        add(f"tome r={r}", tome, "training-free", tome_recipe(r))
        models[f"tome r={r}"] = tome
        if args.finetune_epochs and not args.no_tome_finetune:
            tbase = copy.deepcopy(model)
            tgm = tokenopt.optimize(tbase, tome_recipe(r), report=False)
            with console.status(f"ToMe r={r}: fine-tuning"):
                finetune(tgm, tbase, train_set, epochs=args.finetune_epochs, quiet=True)
            add(f"tome r={r}", tgm, f"+ fine-tuned {args.finetune_epochs} ep", tome_recipe(r))

    x = torch.stack([test_set[i][0] for i in range(args.batch)])
    with console.status("timing (eager)"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        speed = interleaved_throughput(models, x, rounds=args.rounds)
    cspeed = {}
    if args.compile:
        compiled = compile_all(models, x, console.status)
        cspeed = interleaved_throughput(compiled, x, rounds=args.rounds)

    t = Table(title=f"digits-clutter demo ViT ({info['timm_kwargs']['depth']} blocks, {size} px, 65 tokens); "
                    f"{len(test_set)} test images; ToSA layers {args.layers}, selector {args.input} hidden {args.hidden}, "
                    f"bypass {args.bypass}")
    for col in ("model", "setting", "GFLOPs", "top-1 %", "Δ vs original, same training", "selector KL",
                f"eager img/s b{args.batch}") + ((f"compiled img/s b{args.batch}",) if cspeed else ()):
        t.add_column(col, justify="left" if col in ("model", "setting") else "right")
    for name, setting, f, top1, kl in rows:
        ref = rows[1][3] if "fine-tuned" in setting else rows[0][3]
        sp = f"{speed[name]:.0f} ({speed[name] / speed['original']:.2f}x)"
        cells = [name, setting, f"{f:.4f}", f"{100 * top1:.1f}", "" if name == "original" else
                 f"{100 * (top1 - ref):+.1f}", "" if kl is None else f"{kl:.3f}", sp]
        if cspeed:
            cells.append(f"{cspeed[name]:.0f} ({cspeed[name] / cspeed['original']:.2f}x)")
        t.add_row(*cells)
    console.print(t)
    for keep, report in reports:
        table = report.rich_table()
        table.title = f"ToSA keep {keep}, per layer (selector {args.input}, hidden {args.hidden})"
        console.print(table)
    console.print("selector KL: mean over selective layers of KL(real attention of the original || predicted), "
                  f"{len(held_out)} test images")

    if not args.no_dense:
        n_train, patch = 512, size // 8
        plain_train = get_dataset("digits-clutter", "train", size, info["mean"], info["std"])
        plain_test = get_dataset("digits-clutter", "test", size, info["mean"], info["std"])
        tr_x = torch.stack([plain_train[i][0] for i in range(n_train)])
        te_x = torch.stack([plain_test[i][0] for i in range(len(plain_test))])
        tr_y = patch_labels(plain_train, range(n_train), patch)
        te_y = patch_labels(plain_test, range(len(plain_test)), patch)
        d = Table(title=f"dense check: a linear per-patch head on each model's patch tokens (outputs='tokens'): does "
                        f"this {patch}x{patch} patch hold the digit? ({n_train} train / {len(te_x)} test images, "
                        f"{int(te_y.sum())} of {te_y.numel()} test patches positive)")
        for col in ("model", "setting", "patch tokens out", "F1 %"):
            d.add_column(col, justify="left" if col in ("model", "setting") else "right")
        for name, setting, recipe, state in snapshots:
            dense = tokenopt.optimize(copy.deepcopy(model), recipe, one.repeat(2, 1, 1, 1), outputs="tokens",
                                      report=False)
            dense.load_state_dict(state)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ftr, fte = tokens_of(dense, tr_x), tokens_of(dense, te_x)
            d.add_row(name, setting, str(fte.shape[1]), f"{100 * dense_f1(ftr, tr_y, fte, te_y):.1f}")
        console.print(d)
    console.print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
