"""Attention over a packed batch with image isolation: every strategy against dense attention.

    python benchmarks/bench_spa_attention.py                      # B=8, N=197, 6 heads, keep 0.5, CPU
    python benchmarks/bench_spa_attention.py --keep 0.25 --batch 32
    python benchmarks/bench_spa_attention.py --device cuda --dtype float16   # adds varlen

One attention call (ViT-S/16 shape: 6 heads of 64) on the tokens each image keeps (a random
fraction ``--keep`` of its 196 patch tokens plus the class token, so images keep different
numbers), timed interleaved with dense attention on all N tokens of every image (the unmodified
model's attention). The FLOPs-ideal row is sum(n_i^2) / (B N^2): what a perfect isolated kernel
would save. The strategy ``auto`` picks per device is ops.packing.DEFAULT_STRATEGY.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from tokenopt.ops import packing as P
from tokenopt.timing import interleaved_times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.5, help="mean fraction of patch tokens each image keeps")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    b, n, h, d = args.batch, args.tokens, args.heads, args.head_dim
    # per image a keep rate drawn around the mean (0.5x .. 1.5x of it), so counts really differ
    rates = (args.keep * (0.5 + torch.rand(b, generator=g))).clamp(0, 1)
    keep = torch.rand(b, n, generator=g) < rates[:, None]
    keep[:, 0] = True
    lengths = keep.sum(1).to(dev)
    t = int(lengths.sum())
    q, k, v = (torch.randn(1, h, t, d, generator=g).to(dev, dtype) for _ in range(3))
    dense = [torch.randn(b, h, n, d, generator=g).to(dev, dtype) for _ in range(3)]

    fns = {"dense (original, all tokens)": lambda _: F.scaled_dot_product_attention(*dense)}
    strategies = [s for s in P.STRATEGIES if s != "varlen" or P.varlen_available(q)]
    for s in strategies:
        fns[s] = (lambda s: lambda _: P.isolated_attention(q, k, v, lengths=lengths, strategy=s))(s)
    cap = int(lengths.max())
    padded = [torch.randn(b, h, cap, d, generator=g).to(dev, dtype) for _ in range(3)]
    fns[f"padded layout (static capacity {cap})"] = lambda _: P.isolated_attention(
        *padded, lengths=lengths, capacity=cap, layout="padded")
    times = interleaved_times(fns, q, rounds=args.rounds)
    base = statistics.median(times["dense (original, all tokens)"])
    ideal = (b * n * n) / float((lengths.double() ** 2).sum())

    table = Table(title=f"isolated attention, B={b}, N={n}, {h} heads x {d}, mean keep {args.keep} "
                        f"(kept per image {lengths.min().item()}..{lengths.max().item()}, T={t}), "
                        f"{args.device} {args.dtype}, {torch.get_num_threads()} threads")
    for col in ("strategy", "ms", "speedup vs dense", "of FLOPs-ideal"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    auto = P.DEFAULT_STRATEGY.get(dev.type)
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        speed = base / statistics.median(ts)
        label = f"{name} (auto)" if name == auto else name
        table.add_row(label, f"{ms:.2f}", f"{speed:.2f}x", f"{speed / ideal:.0%}")
    table.add_row("FLOPs-ideal", "", f"{ideal:.2f}x", "100%")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
