"""ToFu: token fusion (Kim et al., WACV 2024) — ToMe's matching, a per-layer reduction op.

Where a block responds non-linearly to interpolated inputs, averaging two tokens produces an
input the next layers never saw: prune instead (drop the matched token, keep its partner). Where
it is close to linear, merge, with MLERP so merged tokens keep their norms::

    h, size, index = tofu_reduce(h, metric, size, index, r, prefix, op)   # op: prune | merge | mlerp

``op: auto`` picks prune or mlerp per layer from a measured linearity profile
(tokenopt.train.probe) of calibration images: the layers whose relative linearity error is at or
above ``threshold`` prune, the others merge with MLERP. Without a threshold the median of the
selected layers is used, the same prune/merge split as the usual fixed rule (prune the first
half), but chosen by measurement instead of by depth.
"""
from __future__ import annotations

import statistics
from typing import Literal, Optional

from pydantic import Field

from tokenopt.errors import RecipeError
from tokenopt.ops import tome as ops
from tokenopt.passes.base import LayerStep, register_pass
from tokenopt.passes.tome import ToMe, ToMeOptions, expand_r


class ToFuOptions(ToMeOptions):
    op: Literal["prune", "merge", "mlerp", "auto"] = Field(
        "mlerp", description="reduction per layer: prune | merge (size-weighted) | mlerp | auto (linearity probe)")
    threshold: Optional[float] = Field(
        None, ge=0, description="op: auto — layers with linearity error >= threshold prune (default: median)")


@register_pass("tofu")
class ToFu(ToMe):
    """ToMe's matching with prune, merge or MLERP chosen per layer."""

    Options = ToFuOptions

    def needs_calibration(self, options: ToFuOptions) -> bool:
        return options.op == "auto"

    def layer_options(self, options: ToFuOptions, n_layers: int, where: str) -> list[dict]:
        return [{"r": r, "prop_attn": options.prop_attn, "order": options.order, "op": options.op,
                 "threshold": options.threshold, "where": where} for r in expand_r(options.r, n_layers, where)]

    def resolve(self, per_layer: list[dict], blocks: list, context: dict) -> list[dict]:
        """op: auto -> prune or mlerp per layer, from the linearity profile in ``context``."""
        if not per_layer or per_layer[0]["op"] != "auto":
            return per_layer
        profile = context.get("linearity")
        if profile is None:
            raise RecipeError(
                f"{per_layer[0]['where']}: op: auto needs calibration images to measure each block's linearity.\n"
                "  API: tokenopt.optimize(model, recipe, calibration=images); CLI: --calibration digits|DIR; "
                "or run `tokenopt probe MODEL --data ...` and use the recipe it writes.")
        errors = [profile[b.index] for b in blocks]
        tau = per_layer[0]["threshold"]
        if tau is None:
            tau = statistics.median(errors)
        return [{**o, "op": "prune" if e >= tau else "mlerp", "linearity": e} for o, e in zip(per_layer, errors)]

    def plan_layer(self, block, opts: dict, tokens_in: int, prefix: int) -> LayerStep:
        step = super().plan_layer(block, opts, tokens_in, prefix)
        step.params["op"] = opts["op"]
        step.describe = f"{opts['op']} r={step.params['r']}"
        if "linearity" in opts:
            step.describe += f" (linearity error {opts['linearity']:.3f})"
        return step

    def insert_reduction(self, g, metric, h, r: int, step: LayerStep):
        op = step.params["op"]
        return g.insert_after(metric, ops.tofu_reduce, h, metric, g.state.size, g.state.index, r,
                              g.analysis.prefix_tokens, op, order=step.params["order"], label=f"ToFu {op} r={r}")
