"""Dense feature maps read out of a model, rewritten by tokenopt or not: what a segmentation or
detection neck (or a linear probe) reads from a backbone.

    stream_map(module, images, stream=2)   # (n, H, W, C): the tokens leaving stream 2's last block
    block_map(module, images, block=3)     # (n, H, W, C): the tokens leaving block 3
    patch_map(module, images, base)        # (n, H, W, C): the patch tokens outputs: tokens returns

The tokens leaving a block are the value of its output node (``BlockRecord.output``). A module
tokenopt rewrote carries the analysis of the graph it was made from, and its rewrites keep that
name on the value that leaves the block (SPA in bypass mode scatters the skipped tokens back
before it, ToMe-in-windows restores its merged tokens before the window reverse), so one run of
the rewritten graph reads it, whatever the front end (fx or export). A module tokenopt did not
make is captured and analysed first, and the same node is read from the captured graph, which
holds the module's own parameters. Streams count from 0: Swin's stage 3 is stream 2.

A stream whose tokens were merged along it (ToMe on a plain ViT) no longer has one token per
patch at a block's output: that is refused, and :func:`patch_map` is the way to read such a
model's map: what the model returns under ``outputs: tokens`` (the features after the last block
and the final norm, each merged token put back on every patch it stands for). A module rewritten
for logits is rebuilt for it from its recipe on ``base`` (the model it was made from), with its own
state (trained gates and selectors, calibrated thresholds) loaded into the rebuilt graph.
"""
from __future__ import annotations

import torch
from torch import nn

from tokenopt.analysis import ModelAnalysis, analyse
from tokenopt.errors import PlanError
from tokenopt.pipeline import apply_plan, optimize
from tokenopt.plan import LayerPlan, Plan
from tokenopt.record import record_of
from tokenopt.trace import values_at


def _graph_and_analysis(module: nn.Module, example: torch.Tensor):
    rec = record_of(module)
    if rec is not None and rec.analysis is not None:
        holder = module
        while not hasattr(holder, "graph"):    # DDP's .module, torch.compile's _orig_mod
            holder = getattr(holder, "_orig_mod", None) or holder.module
        return holder, rec.analysis
    analysis = analyse(module, example)
    return analysis.graph, analysis


@torch.no_grad()
def block_map(module: nn.Module, images: torch.Tensor, block: int, batch: int = 128) -> torch.Tensor:
    """(n, H, W, C) float: the tokens leaving block ``block`` (index over the whole model) for each
    of ``images``, on the block's stream grid, prefix tokens dropped. Runs in eval mode."""
    graph, analysis = _graph_and_analysis(module, images[:2])
    return _read(graph, analysis, images, block, batch)


@torch.no_grad()
def stream_map(module: nn.Module, images: torch.Tensor, stream: int, batch: int = 128) -> torch.Tensor:
    """(n, H, W, C): the tokens leaving the last block of stream ``stream`` (Swin's stage s: s - 1)."""
    graph, analysis = _graph_and_analysis(module, images[:2])
    if not 0 <= stream < len(analysis.streams):
        raise PlanError(f"the model has {len(analysis.streams)} token streams (0..{len(analysis.streams) - 1}), "
                        f"not a stream {stream}")
    return _read(graph, analysis, images, analysis.streams[stream].blocks[-1], batch)


def _read(graph, analysis: ModelAnalysis, images: torch.Tensor, block: int, batch: int) -> torch.Tensor:
    b = analysis.blocks[block]
    s = analysis.streams[b.stream]
    if s.grid is None:
        raise PlanError(f"block {block} ({b.path}): its stream's token grid is unknown, so its tokens "
                        f"have no map")
    rows, cols = s.grid
    was_training = graph.training
    graph.eval()
    try:
        maps = [_as_map(values_at(graph, {b.output}, images[i:i + batch])[b.output], s.prefix_tokens, rows, cols, b)
                for i in range(0, len(images), batch)]
    finally:
        graph.train(was_training)
    return torch.cat(maps)


def _as_map(v: torch.Tensor, prefix: int, rows: int, cols: int, b) -> torch.Tensor:
    if v.dim() == 4:                    # (n, H, W, C): a windowed stream
        if tuple(v.shape[1:3]) != (rows, cols):
            raise PlanError(f"block {b.index} ({b.path}) gives a {tuple(v.shape[1:3])} grid, not its stream's "
                            f"{rows}x{cols}")
        return v
    tokens = v[:, prefix:]
    if tokens.shape[1] != rows * cols:
        raise PlanError(f"block {b.index} ({b.path}) gives {tokens.shape[1]} patch tokens, not one per patch of "
                        f"its {rows}x{cols} grid (its tokens were merged): read the patch map with outputs: tokens")
    return tokens.reshape(len(v), rows, cols, -1)


@torch.no_grad()
def patch_map(module: nn.Module, images: torch.Tensor, base: nn.Module | None = None,
              batch: int = 128) -> torch.Tensor:
    """(n, H, W, C): the patch tokens ``module`` returns under ``outputs: tokens`` for each of ``images``,
    on the grid of the last block's stream. ``base``: the model ``module`` was rewritten from, needed
    when ``module`` was rewritten for logits (it is rebuilt on ``base`` from its recipe). Eval mode."""
    twin = tokens_twin(module, images[:2], base)
    analysis = record_of(twin).analysis
    rows, cols = analysis.streams[analysis.blocks[-1].stream].grid
    was_training = twin.training
    twin.eval()
    try:
        out = torch.cat([twin(images[i:i + batch]) for i in range(0, len(images), batch)])
    finally:
        twin.train(was_training)
    return out if out.dim() == 4 else out.reshape(len(out), rows, cols, -1)


def tokens_twin(module: nn.Module, example: torch.Tensor, base: nn.Module | None = None) -> nn.Module:
    """``module`` returning its patch tokens (``outputs: tokens``): itself when it already does; for a
    module tokenopt did not make, its graph with no step; else its recipe rebuilt on ``base`` with
    ``module``'s state loaded (so trained gates, selectors and thresholds carry over)."""
    rec = record_of(module)
    if rec is None:
        analysis = analyse(module, example)
        layers = [LayerPlan(b.index, b.path, b.tokens, b.tokens) for b in analysis.blocks]
        return apply_plan(analysis, Plan(None, layers), "tokens")
    if rec.outputs == "tokens":
        return module
    if base is None:
        raise PlanError("this module was rewritten to return logits: give base= (the model it was rewritten "
                        "from) to rebuild it returning its patch tokens")
    twin = optimize(base, rec.recipe, example, outputs="tokens", context=dict(rec.context) or None,
                    report=False, capture=rec.capture, leaf_modules=rec.leaf_modules)
    twin.load_state_dict(module.state_dict())
    return twin
