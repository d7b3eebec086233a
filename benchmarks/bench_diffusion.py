"""Op-level token merging on diffusion denoisers: one denoising call, against the original, same run.

    python benchmarks/bench_diffusion.py                  # UNet and DiT, eager + torch.compile
    python benchmarks/bench_diffusion.py --no-compile     # eager only (graph breaks still counted)
    python benchmarks/bench_diffusion.py --skip-unet      # the DiT table only
    python benchmarks/bench_diffusion.py --rounds 3 --threads 1   # fewer rounds, one thread (a shared machine)

UNet: a random-init UNet2DConditionModel shaped like Stable Diffusion 1.5 (three cross-attention
down blocks and a plain one, the mirror up path, text states of 77 tokens) scaled down to run on a
CPU: latent 64x64 (the first spatial transformer sees 4,096 tokens), channels (64, 128, 256, 256),
one layer per block, batch 2. Rows: the original; tomesd (``tomesd.apply_patch(copy, ratio=0.5,
use_rand=False)``: the same merge as the recipe, so the two compute the same thing); tokenopt
with recipes/tomesd-50.yaml. Eager and torch.compile; the graph breaks ``torch._dynamo.explain``
counts for tomesd and tokenopt (dynamo's tracing only, no build). GFLOPs count the attention by
its math decomposition (the CPU's fused kernel has no FlopCounter formula).

DiT: DiTTransformer2DModel at 256 tokens (latent 32x32, patch 2; 12 blocks of width 384, 6
heads), batch 2: op-level ToMe (recipes/tome-dit.yaml: ratio 0.5 around attention and MLP) and
stream-level ToMe (r=32 in each of the first 6 blocks, unmerged before the output), eager and
torch.compile, with the graphs dynamo makes of each.

Speedups are the median over interleaved rounds of the per-round time ratio to the original.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

import tokenopt
from tokenopt.analysis import example_input_for
from tokenopt.paths import SHIPPED_RECIPES
from tokenopt.sources import load_model
from tokenopt.timing import measure_speed

UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 256, 256),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=256, attention_head_dim=8)
DIT = dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, num_layers=12, sample_size=32, patch_size=2,
           num_embeds_ada_norm=1000)
STREAM_DIT = {"version": 1, "rules": [{"pass": "tome", "layers": "first-half", "r": 32}]}


def saved(cls_name: str, config: dict, folder: Path):
    """The model as tokenopt loads it (diffusers:DIR), with its example call from the config."""
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, cls_name)(**config)
    with torch.no_grad():     # adaLN-zero and zero-init output layers make a random DiT output nothing
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    model.save_pretrained(folder)
    model, _ = load_model(f"diffusers:{folder}")
    return model


def gflops(model, ex) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        ex.call(model)
    return fc.get_total_flops() / 1e9


def graph_breaks(model, ex) -> str:
    torch._dynamo.reset()
    exp = torch._dynamo.explain(model)(*ex.args, **ex.kwargs)
    return f"{exp.graph_count} graph(s), {exp.graph_break_count} break(s)"


def timed(models: dict, ex, rounds: int) -> dict[str, tuple[float, float]]:
    """name -> (seconds per call, speedup over "original"), interleaved rounds."""
    calls = {k: (lambda _x, m=m: ex.call(m)) for k, m in models.items()}
    speed, speedup = measure_speed(calls, ex.image, rounds=rounds, min_seconds=0.0)
    return {k: (ex.batch / speed[k], speedup[k]) for k in models}


def compare(models: dict, ex, rounds: int, compile: bool, console: Console, title: str,
            count_breaks: tuple[str, ...]) -> None:
    """One table: GFLOPs, max |output - original|, eager (and compiled) s/call and speedup, and the graphs
    dynamo makes of the models in ``count_breaks``."""
    with torch.no_grad():
        ref = ex.call(models["original"]).sample
        diff = {k: float((ex.call(m).sample - ref).abs().max()) for k, m in models.items()}
    flops = {k: gflops(m, ex) for k, m in models.items()}
    eager = timed(models, ex, rounds)
    breaks = {k: graph_breaks(models[k], ex) for k in count_breaks}
    compiled = {}
    if compile:
        torch._dynamo.reset()
        comp = {}
        for k, m in models.items():
            with console.status(f"torch.compile {k}"):
                comp[k] = torch.compile(m)
                with torch.no_grad():
                    ex.call(comp[k])
        compiled = timed(comp, ex, rounds)
    t = Table(title=title)
    for col in ("model", "GFLOPs", "max |out - original|", "eager s/call", "eager speedup"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for col in (("compiled s/call", "compiled speedup") if compiled else ()) + ("dynamo graphs",):
        t.add_column(col, justify="right")
    for k in models:
        row = [k, f"{flops[k]:.2f}", f"{diff[k]:.4f}", f"{eager[k][0]:.3f}", f"{eager[k][1]:.2f}x"]
        if compiled:
            row += [f"{compiled[k][0]:.3f}", f"{compiled[k][1]:.2f}x"]
        t.add_row(*row, breaks.get(k, "-"))
    console.print(t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip-dit", action="store_true")
    ap.add_argument("--skip-unet", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    console = Console()

    with tempfile.TemporaryDirectory(prefix="bench-diffusion-") as tmp:
        if not args.skip_unet:
            import tomesd

            unet = saved("UNet2DConditionModel", UNET, Path(tmp) / "unet")
            ex = example_input_for(unet)
            patched = copy.deepcopy(unet)
            tomesd.apply_patch(patched, ratio=0.5, use_rand=False)
            ours = tokenopt.optimize(unet, SHIPPED_RECIPES / "tomesd-50.yaml", report=False)
            models = {"original": unet, "tomesd ratio 0.5": patched, "tokenopt tomesd-50": ours}
            with torch.no_grad():
                agree = float((ex.call(ours).sample - ex.call(patched).sample).abs().max())
            compare(models, ex, args.rounds, not args.no_compile, console,
                    f"UNet (SD-1.5 shape, scaled down), latent 64x64 (4,096 tokens in the first transformer), "
                    f"batch {ex.batch}, one denoising call", ("tomesd ratio 0.5", "tokenopt tomesd-50"))
            console.print(f"tokenopt vs tomesd: max |difference| = {agree:.2e}; torch threads: {torch.get_num_threads()}")
        if args.skip_dit:
            return
        dit = saved("DiTTransformer2DModel", DIT, Path(tmp) / "dit")
        ex = example_input_for(dit)
        models = {"original": dit,
                  "op-level ToMe (tome-dit.yaml)": tokenopt.optimize(dit, SHIPPED_RECIPES / "tome-dit.yaml", report=False),
                  "stream-level ToMe r=32, first half": tokenopt.optimize(dit, STREAM_DIT, report=False)}
        compare(models, ex, args.rounds, not args.no_compile, console,
                f"DiT, 256 tokens (latent 32x32, patch 2), 12 blocks of width 384, batch {ex.batch}, one call",
                tuple(k for k in models if k != "original"))
        console.print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
