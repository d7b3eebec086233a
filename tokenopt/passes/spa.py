"""SPA: context-aware token selection and packing (Zhang et al., 2024, arXiv 2410.23608).

A cheap gate scores every token; each image keeps the tokens its gate selects, so images keep
different numbers of tokens. The kept tokens of the whole batch are packed into one sequence, the
block's token-wise layers run on it, attention is isolated per image, and (bypass) unpack puts
the results back in place. Before (layer i)::

    y = block_i(x)                                    # x (B, N, C)

After, ``mode: bypass``::

    keep_rows, keep, ste = spa_gates.i(x)             # gate + per-image selection (prefix always kept)
    xs, lengths, ... = spa_pack(x, keep_rows, keep, ...)   # (1, T, C); padded: (B, max_keep, C)
    h = block_i(xs)                                   # attention: isolated_attention(q, k, v, lengths=)
    y = spa_unpack(xs, ..., into=x, h)                # (B, N, C): unselected tokens skipped the block

``mode: prune``: no unpack; the stream stays packed to the end (every later block attends per
image, the next SPA layer selects among the tokens left) and pooling reads the kept tokens only.

The gates are submodules of the rewritten model (``spa_gates.<layer>``), in its state_dict and
artifacts; until trained (a ``trained`` buffer) using the model warns (``strict: true``:
refuses). In training the selection is sampled (Gumbel-sigmoid) with a straight-through weight on
the kept tokens' update, so the task loss reaches the gate through the packed path.
`capture_gate_outputs` exposes the gates' probabilities for their supervision.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenopt.errors import PlanError, RecipeError
from tokenopt.ops import gates as ops
from tokenopt.ops.gates import GateOutput, TokenGate
from tokenopt.ops.packing import STRATEGIES
from tokenopt.analysis.records import MLP, Site
from tokenopt.ops import windows as window_ops
from tokenopt.passes.base import LayerStep, Pass, PassOptions, register_pass
from tokenopt.passes.in_windows import is_windowed, refuse_in_windows
from tokenopt.rewrite.learned import LearnedKind, hook_for, learned_modules, register_learned
from tokenopt.rewrite.state import AttendWithinImages
from tokenopt.tokens import Packed, TokenCount

GATE_PREFIX = "spa_gates"
PRUNED = "tokens were pruned per image (SPA mode: prune)"
PRUNE_FIX = "Use mode: bypass, or prune only in layers after it."
DEFAULT_THRESHOLD = 0.5         # the paper's; with target_keep, the gates' threshold until calibration

__all__ = ["SPA", "GateOutput", "capture_gate_outputs", "gates_of", "force_keep", "UntrainedGateWarning"]


class UntrainedGateWarning(UserWarning):
    """An SPA model runs with gates that were never trained."""


GATES = register_learned(LearnedKind(
    GATE_PREFIX, TokenGate, "SPA gates", UntrainedGateWarning,
    untrained="an untrained linear layer picks the tokens"))


#: ``gate: paper``: the paper's gate, one linear layer trained with Gumbel-sigmoid sampling. The
#: shipped recipes use ``{hidden: 64, noise: 0}`` instead: measured on the clutter demo, the linear
#: gate at 0.5 kept ~15% and lost 6.5 points where the MLP without noise matched ToSA (docs/passes/spa.md).
PAPER_GATE = {"hidden": 0, "noise": 1.0}


class GateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    hidden: int = Field(0, ge=0, le=4096, description="0: one linear layer on the tokens (the paper); >0: an MLP "
                                                      "with this many hidden units")
    noise: float = Field(1.0, ge=0.0, le=10.0, description="scale of the logistic (Gumbel-sigmoid) noise on the "
                                                           "gate's logits in training; 0: training selects as "
                                                           "inference does")
    context: Literal["none", "previous"] = Field(
        "none", description="previous: the paper's s = max(f(r), s_up), the score of the previous spa layer max-"
                            "pooled to this layer's grid (across patch merging); not on the first spa layer")


def _fraction_or_count(name: str, v, allow_zero: bool):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a fraction in [0, 1] of the patch tokens or a whole number of them, "
                         f"got {v!r}")
    if isinstance(v, float) and not (0.0 <= v <= 1.0) or (isinstance(v, float) and v == 0.0 and not allow_zero):
        raise ValueError(f"{name} must be a fraction in {'[0' if allow_zero else '(0'}, 1] (e.g. 0.5) or a whole "
                         f"number of tokens, got {v}")
    if isinstance(v, int) and v < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be at least {0 if allow_zero else 1} token(s) (or a fraction), got {v}")
    return v


class SPAOptions(PassOptions):
    gate: GateOptions = Field(default_factory=GateOptions,
                              description="the gate: {hidden, noise}, or `paper` for the paper's (one linear "
                                          "layer, sampling noise 1)")
    threshold: Optional[float] = Field(
        None, description="keep a token when its gate probability is at least this, in [0, 1] (default 0.5; not "
                          "with target_keep, which calibrates it)")
    target_keep: Optional[float] = Field(
        None, description="mean share of the patch tokens each layer keeps, in (0, 1]: after gate training each "
                          "layer's threshold is calibrated on the training images to meet it (instead of threshold)")
    min_keep: Union[int, float] = Field(
        0.1, description="per image, never fewer than this fraction of the patch tokens (or this many)")
    max_keep: Union[int, float] = Field(
        1.0, description="per image, never more than this fraction (or count): the capacity of the padded layout")
    mode: Literal["bypass", "prune"] = Field(
        "bypass", description="bypass: unselected tokens skip the block and come back in place | prune: they "
                              "leave for good")
    layout: Literal["auto", "packed", "padded"] = Field(
        "auto", description="packed: (1, T, C) | padded: (B, max_keep, C), static shapes | auto: packed in eager "
                            "runs, padded under torch.compile/export")
    grouping: Literal["window", "container"] = Field(
        "window", description="windowed blocks (Swin): window: the kept tokens of each window attend among "
                              "themselves (keeping all is the original) | container: each image's kept tokens, in "
                              "window order, fill containers of a window's size (the paper's)")
    attention: Literal["auto", "loop", "padded", "blockdiag", "containers", "varlen"] = Field(
        "auto", description="attention over the packed batch; auto: the fastest measured on the device")

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, v):
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1] (a token is kept when its gate "
                             f"probability is at least this), got {v!r}; e.g. threshold: 0.5")
        return float(v)

    @field_validator("gate", mode="before")
    @classmethod
    def _gate(cls, v):
        if isinstance(v, str):
            if v != "paper":
                raise ValueError(f"gate must be `paper` or a mapping such as {{hidden: 64, noise: 0}}, got {v!r}")
            return dict(PAPER_GATE)
        return v

    @field_validator("target_keep", mode="before")
    @classmethod
    def _target_keep(cls, v):
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
            raise ValueError(f"target_keep must be a share in (0, 1] of the patch tokens each layer keeps on "
                             f"average, got {v!r}; e.g. target_keep: 0.5")
        return float(v)

    @field_validator("min_keep", mode="before")
    @classmethod
    def _min_keep(cls, v):
        return _fraction_or_count("min_keep", v, allow_zero=True)

    @field_validator("max_keep", mode="before")
    @classmethod
    def _max_keep(cls, v):
        return _fraction_or_count("max_keep", v, allow_zero=False)

    @model_validator(mode="after")
    def _bounds(self):
        lo, hi = self.min_keep, self.max_keep
        if type(lo) is type(hi) and lo > hi:
            raise ValueError(f"min_keep ({lo}) is above max_keep ({hi}): no count satisfies both. Lower min_keep "
                             f"or raise max_keep")
        if self.target_keep is not None and self.threshold is not None:
            raise ValueError(f"target_keep ({self.target_keep}) and threshold ({self.threshold}) are both given: "
                             "target_keep calibrates each layer's threshold after training. Keep one of them")
        for name, bound in (("min_keep", lo), ("max_keep", hi)):
            t = self.target_keep
            if t is not None and isinstance(bound, float) and (t < bound if name == "min_keep" else t > bound):
                raise ValueError(f"target_keep ({t}) is {'below min_keep' if name == 'min_keep' else 'above max_keep'}"
                                 f" ({bound}): no image may keep that share. Move target_keep within "
                                 f"[min_keep, max_keep]")
        if self.attention == "varlen" and self.layout == "padded":
            raise ValueError("attention: varlen runs on the packed layout; use layout: packed or auto")
        return self


@dataclass(frozen=True)
class SPAParams:
    """One layer: the recipe's options; ``lo``/``hi`` tokens (besides the prefix) per image, by the plan."""

    hidden: int
    threshold: float
    min_keep: Union[int, float]
    max_keep: Union[int, float]
    mode: str
    layout: str
    attention: str
    lo: int = 0
    hi: int = 0
    follows_prune: bool = False     # an earlier layer of the same rule pruned: fewer tokens come in
    noise: float = 1.0              # scale of the training-time sampling noise
    grouping: str = "window"        # windowed blocks: "window" | "container"
    target_keep: float | None = None   # mean share of patch tokens kept; threshold calibrated after training
    context: str = "none"           # "previous": max-combine the previous spa layer's score (the paper's s_up)


@dataclass(frozen=True)
class GateScore:
    """A gate's score on its layer's grid, for a later gate's ``context: previous``: the gate's call
    node (its output's element 3, read only when a later gate takes it) and the (rows, cols) of a
    windowed block's grid (None: a plain block's token sequence)."""

    node: str
    grid: tuple[int, int] | None


@dataclass
class SPAGraphState:
    layers: list[int] = field(default_factory=list)
    scores: dict[Site, GateScore] = field(default_factory=dict)     # every gate's score, by its block's site


def _context(g, block, p: SPAParams, grid):
    """``context: previous``: (the score of the last spa layer before ``block``, pooled to its grid
    (across patch merging)), the gate's extra argument; () otherwise. The planner refused a first layer."""
    if p.context != "previous":
        return ()
    earlier = [(site, s) for site, s in g.pass_state(SPAGraphState).scores.items() if site.block < block.index]
    if not earlier:
        raise PlanError(f"{block.path} ({block.index}): gate context: previous, but no spa layer runs before it")
    site, prev = max(earlier, key=lambda e: e[0].block)
    call = g.node(prev.node)
    node = g.insert_after(call, operator.getitem, call, 3, label="previous gate's score")
    if prev.grid == grid:
        return (node,)
    if prev.grid is None or grid is None:
        raise PlanError(f"{block.path} ({block.index}): gate context: previous takes the score of "
                        f"{g.analysis.blocks[site.block].path}, whose tokens lie on another grid (one of them is "
                        "not a windowed block).\n  Use context: none here.")
    return (g.insert_after(node, ops.pool_scores, node, prev.grid, tuple(grid),
                           label=f"previous gate's score max-pooled {prev.grid} -> {tuple(grid)}"),)


@register_pass("spa")
class SPA(Pass):
    """Keep the tokens a gate selects, per image; pack them; attend per image; unpack (or prune)."""

    Options = SPAOptions
    learned = GATES
    changes_token_count = True      # mode: prune does; later grid-bound blocks are refused either way

    def layer_options(self, options: SPAOptions, n_layers: int, where: str) -> list[SPAParams]:
        threshold = DEFAULT_THRESHOLD if options.threshold is None else options.threshold
        p = SPAParams(options.gate.hidden, threshold, options.min_keep, options.max_keep, options.mode,
                      options.layout, options.attention, noise=options.gate.noise, target_keep=options.target_keep,
                      grouping=options.grouping, context=options.gate.context)
        return [p] * n_layers

    def resolve(self, options: SPAOptions, per_layer: list[SPAParams], blocks: list, context: dict,
                where: str) -> list[SPAParams]:
        if options.mode != "prune":
            return per_layer
        return [replace(p, follows_prune=i > 0) for i, p in enumerate(per_layer)]

    def check_layers(self, layers: list) -> None:
        if layers and layers[0][1].context == "previous":
            block, _, where = layers[0]
            raise RecipeError(f"{where}: {block.path} ({block.index}) is the first spa layer, so its gate has no "
                              "previous spa layer's score to take (gate context: previous).\n  Give the first spa "
                              "layer its own rule with context: none, or drop context: previous.")

    def plan_layer(self, block, params: SPAParams, tokens_in: TokenCount, prefix: int) -> LayerStep:
        if is_windowed(block) and params.mode != "bypass":
            raise RecipeError(f"{block.path} ({block.index}) attends within windows, which need every token of the "
                              "grid: SPA runs there in mode: bypass only (unselected tokens skip the block and come "
                              "back in place).\n  Use mode: bypass for this rule.")
        if not tokens_in.varies and tokens_in.max != block.tokens and not params.follows_prune:
            raise RecipeError(f"{block.path} ({block.index}) gets {tokens_in} of its {block.tokens} tokens after an "
                              "earlier merge; SPA's gate selects among whole tokens of the original grid (a merged "
                              "token stands for several).\n  Apply spa to layers before the merging ones, or merge "
                              "only after the last spa layer.")
        free = tokens_in.max - prefix
        lo = ops.count_from_fraction(params.min_keep, free)
        hi = ops.count_from_fraction(params.max_keep, free)
        if lo > hi:
            raise RecipeError(f"min_keep={params.min_keep} is {lo} tokens at {block.path} ({block.index}) but "
                              f"max_keep={params.max_keep} is {hi}: min_keep is above max_keep.\n  Lower min_keep "
                              "or raise max_keep (both count the patch tokens of the layer).")
        if prefix == 0:
            lo = max(lo, 1)         # an image with no token left would have nothing to attend to
            hi = max(hi, lo)
        # expected: a calibrated gate keeps the tokens it is at least `threshold` sure of; with no
        # measurement, a uniform prior keeps 1 - threshold of them (the report measures the real mean).
        # target_keep is a share of the original grid's patch tokens, which calibration meets on average
        exp_free = max(0.0, tokens_in.expected - prefix)
        share = ((1.0 - params.threshold) * exp_free if params.target_keep is None
                 else params.target_keep * (block.tokens - prefix))
        expected = prefix + min(float(hi), max(float(lo), share))
        if lo < hi:   # images may keep different numbers: never plan it as a fixed count
            expected = min(expected, prefix + hi - 0.5)
        runs = TokenCount(prefix + hi, min(expected, prefix + hi))
        out = runs if params.mode == "prune" else tokens_in
        step = replace(params, lo=lo, hi=hi)
        dynamic = ("packs the kept tokens of the batch into one sequence whose length depends on the images "
                   "(SPA's packed layout; `layout: padded` or `auto` exports)") if params.layout == "packed" else ""
        return LayerStep(out, step, f"gate: block runs on {runs} ({lo}..{hi} of {free} patch tokens"
                                    f"{f' + {prefix} prefix' if prefix else ''}), {params.mode}",
                         dynamic=dynamic, padded=params.layout in ("padded", "auto"),
                         fixed_grid=f"its gate keeps {lo}..{hi} of the {free} patch tokens it was planned for")

    def refuse(self, block) -> str | None:
        if is_windowed(block):          # Swin: the kept tokens of each window attend among themselves
            return refuse_in_windows(block)
        return super().refuse(block)

    def rewrite(self, g, block, step: LayerStep) -> None:
        p: SPAParams = step.params
        prefix = g.analysis.prefix_tokens
        state = g.pass_state(SPAGraphState)
        if is_windowed(block):
            _rewrite_in_windows(g, block, p)
            state.layers.append(block.index)
            return
        if p.mode == "prune":
            _check_prune(g, block)
        x = g.node(block.input)
        end = g.node(block.output)
        layout = g.state.layout if isinstance(g.state.layout, Packed) else None
        pos = g.node(layout.positions) if layout else None
        valid = g.node(layout.valid) if layout else None
        capacity = prefix + p.hi
        packed: dict = {}

        def pack(x):
            """Gate, then pack the kept tokens; inside the block, attention stays within each image."""
            gate = TokenGate(block.dim, p.hidden, p.threshold, prefix, p.lo, p.hi, block.index, noise=p.noise,
                             target_keep=p.target_keep)
            sel = g.add_learned(block, GATES, gate, x, pos, valid, *_context(g, block, p, None),
                                label=f"SPA gate ({p.lo}..{p.hi} tokens per image)")
            keep_rows, keep, ste = _unpack_tuple(g, sel, ("kept rows", "kept tokens (B, N0)",
                                                          "straight-through weight"))
            g.mark_overhead(block, keep_rows, keep, ste)
            state.scores[block.site()] = GateScore(sel.name, None)
            node = g.insert_after(ste, ops.spa_pack, x, keep_rows, keep, pos, ste, capacity, p.layout,
                                  label="pack the kept tokens")
            xs, lengths, pos_s, ste_s, rows, filled = _unpack_tuple(g, node, tuple(
                f"packed {w}" for w in ("tokens", "lengths", "positions", "straight-through", "rows", "filled")))
            offs = g.insert_after(filled, _offsets, lengths, label="packed offsets")
            new_layout = Packed(lengths.name, offs.name, capacity, p.layout, pos_s.name, keep.name, p.attention)
            g.state.layout = new_layout
            g.state.oblige(AttendWithinImages(new_layout, why=PRUNED, fix=PRUNE_FIX))
            g.record_token_count(block, lengths)
            packed.update(xs=xs, ste_s=ste_s, keep_rows=keep_rows, rows=rows, filled=filled, layout=new_layout)
            return xs

        def unpack(x, end):
            k = packed
            if p.mode == "bypass":
                return (ops.spa_unpack, (k["xs"], k["ste_s"], k["keep_rows"], k["rows"], k["filled"], x),
                        "unpack: unselected tokens skip the block")
            return ops.straight_through, (k["xs"], k["ste_s"]), "stream stays packed (prune)"

        g.bracket(x, end, enter=pack, exit=unpack, blocks=(block,))
        if p.mode == "prune":   # the stream stays packed: every later block attends within each image
            g.state.layout = packed["layout"]
            g.state.reduced = True
            g.state.oblige(AttendWithinImages(packed["layout"], why=PRUNED, fix=PRUNE_FIX))
        state.layers.append(block.index)


def _rewrite_in_windows(g, block, p: SPAParams) -> None:
    """SPA on a windowed block (Swin), bypass: the gate picks each image's tokens on the block's grid;
    in every window the picked tokens attend among themselves with the relative bias of their true
    positions, and the MLP runs on the picked tokens of each image; the others skip both::

        keep = gate(x)                                   # (B, H*W) per image, lo..hi tokens
        w = partition(shift(norm1(x)))                   # (B*nW, N, C)
        ws, pos, valid = gather_kept(w, keep_in_windows(keep))      # (B*nW, n, C), n: the fullest window
        x = x + unshift(reverse(scatter_kept(proj(attention(ws, bias[pos, pos], valid)))))
        h, pos, valid = gather_kept(x, keep)             # (B, k, C)
        x = x + scatter_kept(mlp(norm2(h)))
        y = x + ste * (x - x_in)                         # training: the task loss reaches the gate
    """
    w = block.window
    x = g.node(block.input)
    tokens = g.insert_after(x, window_ops.as_tokens, x, label="tokens (B, H*W, C)")
    gate = TokenGate(block.dim, p.hidden, p.threshold, 0, p.lo, p.hi, block.index, noise=p.noise,
                     target_keep=p.target_keep)
    context = _context(g, block, p, tuple(w.grid))
    sel = g.add_learned(block, GATES, gate, tokens, None, None, *context,
                        label=f"SPA gate ({p.lo}..{p.hi} tokens per image)")
    keep_rows, keep, ste = _unpack_tuple(g, sel, ("kept tokens (B, H*W)", "kept tokens (grid)", "straight-through"))
    g.mark_overhead(block, tokens, keep_rows, keep, ste)
    g.pass_state(SPAGraphState).scores[block.site()] = GateScore(sel.name, tuple(w.grid))
    g.record_token_count(block, g.insert_after(ste, _count, keep, label="kept tokens per image"))

    in_windows = g.insert_after(ste, window_ops.keep_in_windows, keep, w.grid, w.padded, w.size, w.shift,
                                label="kept tokens per window (B*nW, N)")

    def pack(rows_keep):
        made: dict = {}

        def enter(s):
            node = g.insert_after(s, window_ops.gather_kept, s, rows_keep, label="gather the kept tokens of each row")
            made["xs"], made["pos"], made["valid"] = _unpack_tuple(g, node, ("kept tokens", "their positions",
                                                                               "valid slots"))
            return made["xs"]
        return made, enter

    if p.grouping == "container":
        made: dict = {}

        def enter_containers(s):
            node = g.insert_after(s, window_ops.fill_containers, s, in_windows, w.windows,
                                  label="each image's kept tokens in containers of a window's size")
            made["xs"], made["slot"], made["valid"] = _unpack_tuple(g, node, ("containers", "container slots",
                                                                               "valid slots"))
            table = g.get_attr(g.node(w.table).target)
            made["bias"] = g.insert_after(made["valid"], window_ops.container_bias, table, made["slot"], w.grid,
                                          w.padded, w.size, w.shift, label="relative bias at true offsets (clamped)")
            return made["xs"]

        g.window_bracket(block, enter_containers, lambda s, end: (
            window_ops.empty_containers, (made["slot"], made["valid"], s, w.windows),
            "containers back in their windows; unselected tokens skip the attention"))
        g.attend_in_windows(block, None, valid=made["valid"], bias=made["bias"])
    else:
        win, enter_win = pack(in_windows)
        g.window_bracket(block, enter_win, lambda s, end: (
            window_ops.scatter_kept, (win["pos"], win["valid"], w.area), "unselected tokens skip the attention"))
        g.attend_in_windows(block, win["pos"], valid=win["valid"])
    mlp = next((br for br in block.branches if br.kind == MLP), None)
    if mlp is not None:
        per_image, enter_mlp = pack(keep_rows)
        g.bracket(g.node(mlp.entry), g.node(mlp.exit), enter=enter_mlp,
                  exit=lambda s, end: (window_ops.scatter_kept, (per_image["pos"], per_image["valid"], block.tokens),
                                       "unselected tokens skip the MLP"))
    # the selection itself has no gradient: the straight-through weight (zero in value, None in eval)
    # scales each kept token's update so the task loss trains the gate, as spa_unpack does when packed
    g.wrap(g.node(block.output), window_ops.straight_through_map, x, ste,
           label="straight-through: the task loss reaches the gate")


def _count(keep):
    return keep.sum(1)


def _unpack_tuple(g, node, labels: tuple[str, ...]) -> list:
    """getitem nodes for each element of the tuple ``node`` computes, in order after it."""
    out, prev = [], node
    for i, label in enumerate(labels):
        prev = g.insert_after(prev, operator.getitem, node, i, label=label)
        out.append(prev)
    return out


def _offsets(lengths):
    """(B,) start of each image in the packed sequence."""
    return torch.cumsum(lengths, 0) - lengths


def _check_prune(g, block) -> None:
    """Prune keeps the stream packed to the end: every later block must attend per image, and what
    reads the tokens after the blocks must pool them (class token or average)."""
    if g.track_index:
        raise PlanError(f"{block.path}: mode: prune drops tokens for good, but the model's output needs every "
                        "token in place (outputs: tokens, or a head that reads all tokens).\n  Use mode: bypass.")
    kinds = {p.kind for p in g.analysis.pooling}
    if not kinds or not kinds <= {"cls", "avg"}:
        raise PlanError(f"{block.path}: mode: prune pools over the kept tokens only, which tokenopt does for class-"
                        f"token and average pooling; this model pools by {', '.join(sorted(kinds)) or 'nothing found'}."
                        "\n  Use mode: bypass.")
    for later in g.analysis.blocks[block.index + 1:]:
        if later.refusal is not None:
            raise PlanError(f"{block.path}: mode: prune keeps the stream packed to the end, but {later.path} cannot "
                            f"attend over a packed batch ({later.refusal}).\n  Use mode: bypass.")


# ----------------------------------------------------------------------------------------------
# the API for training and benchmarks


def gates_of(model: torch.nn.Module) -> dict[int, TokenGate]:
    """The SPA gates of a rewritten model, by the index of their layer (also inside a wrapper such as
    DistributedDataParallel, whose names start with ``module.``)."""
    return learned_modules(model, GATES)


def capture_gate_outputs(model: torch.nn.Module):
    """A dict that every forward pass of ``model`` inside the block fills: layer index ->
    `GateOutput` (prob, valid, keep on the original (B, N) grid; prob keeps its graph)."""
    return ops.capture_outputs(gates_of(model).values())


@contextlib.contextmanager
def force_keep(model: torch.nn.Module, fraction: float, seed: int = 0) -> Iterator[None]:
    """Inside the block every gate keeps a random ``fraction`` of each image's patch tokens (within
    its max_keep), whatever it scores: benchmarks measure speed at a known keep rate."""
    gen = torch.Generator().manual_seed(seed)
    gates = gates_of(model)
    for m in gates.values():
        m.forced = (fraction, gen)
    try:
        yield
    finally:
        for m in gates.values():
            m.forced = None


#: Forward pre-hook checking the gates only (the model itself carries learned.check_trained).
check_gates_trained = hook_for(GATES)
