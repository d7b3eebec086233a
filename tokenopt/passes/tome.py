"""ToMe: merge r tokens per block by bipartite soft matching (Bolya et al., ICLR 2023).

Before (one block)::

    h = x + attn(norm1(x))
    y = h + mlp(norm2(h))

After::

    h = x + attn(norm1(x), bias=log(size))          # proportional attention, from earlier merges
    metric = keys_per_token(k)                      # (B, N, H, d); matching averages the heads
    h, size, index = tome_merge(h, metric, size, index, r, prefix)
    y = h + mlp(norm2(h))
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from tokenopt.errors import PlanError, RecipeError
from tokenopt.ops import tome as ops
from tokenopt.ops.matching import max_reduction
from tokenopt.passes.base import LayerStep, Pass, TuneMethod, register_pass
from tokenopt.passes.in_windows import is_windowed, plan_in_windows, refuse_in_windows, rewrite_in_windows
from tokenopt.passes.op_level import (OpLevelOptions, OpLevelParams, op_params, plan_op_level, refuse_op_level,
                                      rewrite_op_level, tune_op_level)
from tokenopt.rewrite.state import KeyBias
from tokenopt.tokens import Dense, TokenCount

PROPORTIONAL_ATTENTION = "proportional attention log(size)"


class DecreasingSchedule(BaseModel):
    """r falls linearly from ``start`` at the first selected layer to ``end`` at the last."""

    model_config = ConfigDict(extra="forbid", strict=True)
    start: int = Field(ge=0)
    end: int = Field(ge=0)


class ToMeOptions(OpLevelOptions):
    r: Union[NonNegativeInt, Annotated[list[NonNegativeInt], Field(min_length=1)], DecreasingSchedule] = Field(
        description="tokens merged per layer: an int, a per-layer list, or {start, end}")
    prop_attn: bool = Field(True, description="add log(size) to every later attention's logits")
    order: Literal["original", "rank"] = Field(
        "original", description="unmerged tokens in their original order, or in rank order (most similar "
                                "first) as the reference implementation leaves them in models without a class token")


@dataclass(frozen=True)
class ToMeParams:
    """One layer: merge ``r`` tokens (asked by the recipe, then capped by the planner)."""

    r: int
    prop_attn: bool = True
    order: str = "original"          # unmerged tokens: "original" order or "rank" (the reference's, no prefix)


def expand_r(r, n_layers: int, where: str) -> list[int]:
    """One r per selected layer from an int, a list, or a linear {start, end} schedule."""
    if isinstance(r, int):
        if r < 0:
            raise RecipeError(f"{where}: r must be >= 0, got {r}")
        return [r] * n_layers
    if isinstance(r, list):
        if len(r) != n_layers:
            raise RecipeError(f"{where}: r lists {len(r)} values but the rule selects {n_layers} layers; "
                              "give one value per selected layer")
        if any(v < 0 for v in r):
            raise RecipeError(f"{where}: every r must be >= 0, got {r}")
        return list(r)
    if n_layers == 1:
        return [r.start]
    # exact arithmetic: a float overflows on an absurd start, and the planner caps r per layer anyway
    return [round(r.start + Fraction((r.end - r.start) * i, n_layers - 1)) for i in range(n_layers)]


@register_pass("tome")
class ToMe(Pass):
    """Merge r tokens per block by bipartite soft matching."""

    Options = ToMeOptions
    changes_token_count = True

    @classmethod
    def sweep_curves(cls) -> dict:
        return {"tome": lambda r: [{"pass": "tome", "r": r}]}

    @classmethod
    def tune_methods(cls) -> dict[str, TuneMethod]:
        # tome-op: the op-level placement, merging around the self-attention only (tomesd's default)
        return {"tome": TuneMethod(lambda layers, rs, tokens: [{"pass": "tome", "layers": list(layers),
                                                                "r": list(rs)}]),
                "tome-op": tune_op_level("tome")}

    def layer_options(self, options: ToMeOptions, n_layers: int, where: str) -> list:
        if options.placement == "op":
            return [op_params(options)] * n_layers
        return [ToMeParams(r, options.prop_attn, options.order) for r in expand_r(options.r, n_layers, where)]

    def changes_tokens(self, options) -> bool:
        return options.placement != "op"     # op-level: every token comes back after each op

    def refuse(self, block) -> str | None:
        if is_windowed(block):          # Swin: merged inside each window (passes.in_windows)
            return refuse_in_windows(block)
        return super().refuse(block)

    def refuse_layer(self, block, params, analysis) -> str | None:
        if isinstance(params, OpLevelParams):
            return refuse_op_level(block, params, analysis, self.name)
        return self.refuse(block)

    def plan_layer(self, block, params, tokens_in: TokenCount, prefix: int) -> LayerStep:
        if is_windowed(block):          # the stream keeps every token; each window attends on fewer
            return LayerStep(tokens_in, params, plan_in_windows(block, params.r, self.name))
        if isinstance(params, OpLevelParams):   # the stream keeps its count; each op runs on fewer tokens
            return plan_op_level(block, params, tokens_in, prefix)
        want = params.r
        # the matching splits the tokens an image has; with a varying count only the images at
        # the maximum are guaranteed r merges, so the cap (and the shortfall) use the maximum
        cap = max_reduction(tokens_in.max, prefix)
        r = min(want, cap)
        short = "" if r == want else (f"r={want} asked, but only {cap} of its {tokens_in} tokens can merge "
                                      f"({prefix} prefix token(s) are protected); it merges {r}")
        # at another input size the same r merges as long as the matching can still pair r tokens
        return LayerStep(tokens_in.minus(r), replace(params, r=r), self.describe(replace(params, r=r)), short,
                         min_tokens=prefix + 2 * r)

    def describe(self, params: ToMeParams) -> str:
        return f"merge r={params.r}"

    def rewrite(self, g, block, step: LayerStep) -> None:
        if isinstance(step.params, OpLevelParams):
            stream = g.analysis.streams[block.stream]
            rewrite_op_level(g, block, step.params, stream.grid, stream.prefix_tokens)
            return
        r = step.params.r
        if is_windowed(block):
            rewrite_in_windows(g, block, r, step.params.prop_attn, getattr(step.params, "op", "merge"))
            return
        if not isinstance(g.state.layout, Dense):
            # a varying count alone is fine (merges cap by the maximum); a packed stream is not (B, N, C)
            raise PlanError(f"{block.path}: {self.name} cannot merge a packed token stream (SPA mode: prune before "
                            f"it).\n  Apply {self.name} to layers before the spa ones, or use spa mode: bypass.")
        if r > 0:   # r=0 leaves the graph untouched: output bit-identical to the original
            h = g.node(block.merge_point)
            metric = keys_metric(g, block, after=h)
            ensure_index(g)
            merged = self.insert_reduction(g, metric, h, r, step)
            x = g.insert_after(merged, operator.getitem, merged, 0, label="merged tokens")
            size = g.insert_after(x, operator.getitem, merged, 1, label="token sizes")
            index = g.insert_after(size, operator.getitem, merged, 2, label="token index map") \
                if g.state.index is not None else None
            g.replace_uses(h, x, keep=(metric, merged))
            g.state.size, g.state.index, g.state.reduced = size, index, True
        # later attentions weigh each key by the patches it stands for (proportional attention)
        if step.params.prop_attn and g.state.size is not None:
            g.state.oblige(KeyBias(PROPORTIONAL_ATTENTION, ops.key_log_size, (g.state.size,)))
        else:
            g.state.release(PROPORTIONAL_ATTENTION)

    def insert_reduction(self, g, metric, h, r: int, step: LayerStep):
        """The node that reduces tokens h by r given the matching metric; returns (x, size, index)."""
        return g.insert_after(metric, ops.tome_merge, h, metric, g.state.size, g.state.index, r,
                              g.analysis.prefix_tokens, order=step.params.order, label=f"ToMe merge r={r}")


def keys_metric(g, block, after):
    """ToMe's matching metric for ``block``, inserted after ``after``: its keys per head (B, N, H, d),
    whose mean over heads the matching takes. An nn.MultiheadAttention is written out first, so
    its keys are the ones the attention computes (no second projection)."""
    _, k, _ = g.attention_qkv(block)
    return g.insert_after(after, ops.keys_per_token, k, g.node(block.merge_point),
                          label="metric: keys (mean over heads taken by the matching)")


def ensure_index(g) -> None:
    """Start tracking original token positions at the first reduction (needed to unmerge)."""
    if g.track_index and g.state.index is None:
        x_in = g.node(g.analysis.blocks[0].input)
        g.state.index = g.insert_after(x_in, ops.initial_index, x_in, label="token index map")
