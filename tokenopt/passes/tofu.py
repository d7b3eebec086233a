"""ToFu: token fusion (Kim et al., WACV 2024) — ToMe's matching, a per-layer reduction op.

``placement: op`` (tokenopt.passes.op_level) places the same per-layer rule around each op of a
block: its groups are pruned or fused by MLERP instead of ToMe's mean, and every position gets
its token's output back.

Where a block responds non-linearly to interpolated inputs, averaging two tokens produces an
input the next layers never saw: prune instead (drop the matched token, keep its partner). Where
it is close to linear, merge, with MLERP so merged tokens keep their norms::

    h, size, index = tofu_reduce(h, metric, size, index, r, prefix, op)   # op: prune | merge | mlerp

``op: auto`` picks prune or mlerp per layer from a measured linearity profile
(tokenopt.passes.linearity, run by ToFu.calibrate) of calibration images: the layers whose relative linearity error is at or
above ``threshold`` prune, the others merge with MLERP. Without a threshold the median of the
selected layers is used, the same prune/merge split as the usual fixed rule (prune the first
half), but chosen by measurement instead of by depth.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Literal, Optional

from pydantic import Field

from tokenopt.errors import RecipeError
from tokenopt.ops import tome as ops
from tokenopt.passes.base import LayerStep, Probe, TuneMethod, register_pass
from tokenopt.passes.op_level import op_params, tune_op_level
from tokenopt.passes import linearity
from tokenopt.passes.tome import ToMe, ToMeOptions, ToMeParams, expand_r


class ToFuOptions(ToMeOptions):
    op: Literal["prune", "merge", "mlerp", "auto"] = Field(
        "mlerp", description="reduction per layer: prune | merge (size-weighted) | mlerp | auto (linearity probe)")
    threshold: Optional[float] = Field(
        None, ge=0, description="op: auto — layers with linearity error >= threshold prune (default: median)")


@dataclass(frozen=True)
class ToFuParams(ToMeParams):
    """One layer: reduce ``r`` tokens by ``op``; ``linearity`` is the probe's error when op came from it."""

    op: str = "mlerp"
    linearity: Optional[float] = None


@register_pass("tofu")
class ToFu(ToMe):
    """ToMe's matching with prune, merge or MLERP chosen per layer."""

    Options = ToFuOptions

    calibration_key = "linearity"

    @classmethod
    def sweep_curves(cls) -> dict:
        def rule(**kw):
            return lambda r: [{"pass": "tofu", "r": r, **kw}]

        return {
            # the fixed rule of public re-implementations: prune the first half, MLERP the second
            "tofu": lambda r: [{"pass": "tofu", "layers": "first-half", "r": r, "op": "prune"},
                               {"pass": "tofu", "layers": "second-half", "r": r, "op": "mlerp"}],
            "tofu-mlerp": rule(op="mlerp"), "tofu-prune": rule(op="prune"), "tofu-auto": rule(op="auto")}

    @classmethod
    def tune_methods(cls) -> dict[str, TuneMethod]:
        # the tuner chooses prune or MLERP per layer by measuring quality, so op: auto is not a choice
        def rule(op):
            return TuneMethod(lambda layers, rs, tokens: [{"pass": "tofu", "layers": list(layers), "r": list(rs),
                                                           "op": op}])

        return {"tofu-prune": rule("prune"), "tofu-mlerp": rule("mlerp"),
                "tofu-op-prune": tune_op_level("tofu", op="prune"), "tofu-op-mlerp": tune_op_level("tofu", op="mlerp")}

    def probe(self, model, analysis, images, r: int, threshold: float | None) -> Probe:
        """Each block's linearity error on ``images``; blocks at or above ``threshold`` (default: the
        median) prune, the others merge with MLERP: the recipe ``op: auto`` would plan."""
        prof = linearity.linearity_profile(model, images, analysis=analysis)
        tau = threshold if threshold is not None else statistics.median(prof.errors)
        ops_ = ["prune" if e >= tau else "mlerp" for e in prof.errors]
        rules = []
        for op in ("prune", "mlerp"):
            idx = [i for i, o in enumerate(ops_) if o == op]
            if idx:
                rules.append({"pass": self.name, "layers": idx, "r": r, "op": op})
        return Probe(
            title="linearity error of each block",
            caption=f"||f(a x1 + (1-a) x2) - (a f(x1) + (1-a) f(x2))|| / ||a f(x1) + (1-a) f(x2)||, "
                    f"{prof.images // 2} image pairs, a in {', '.join(map(str, prof.alphas))}",
            columns=("layer", "block", "error", "op"),
            rows=tuple((str(i), path, f"{e:.4f}", op) for i, (path, e, op) in enumerate(zip(prof.paths, prof.errors,
                                                                                          ops_))),
            note=f"threshold {tau:.4f} ({'given' if threshold is not None else 'median'}): blocks at or above it prune",
            rules=tuple(rules),
            comment=f"ToFu plan: blocks whose linearity error is at or above {tau:.4f} prune, the others\n"
                    "merge with MLERP. Errors: " + ", ".join(f"{e:.3f}" for e in prof.errors))

    def needs_calibration(self, options: ToFuOptions) -> bool:
        return options.op == "auto"

    def calibrate(self, model, analysis, images) -> dict:
        """The per-block linearity errors of ``model`` on ``images``, measured on ``analysis``'s graph."""
        return {self.calibration_key: linearity.linearity_profile(model, images, analysis=analysis).errors}

    def layer_options(self, options: ToFuOptions, n_layers: int, where: str) -> list[ToFuParams]:
        if options.placement == "op":
            if options.op == "auto":
                # the linearity probe interpolates whole token streams of classifier images; around
                # one op of a denoiser there is no such stream to probe
                raise RecipeError(f"{where}: tofu op: auto does not go with placement: op (the linearity probe "
                                  "measures stream-level blocks).\n  Give op: prune or op: mlerp per rule, e.g. "
                                  "layers: first-half with prune and layers: second-half with mlerp.")
            if options.threshold is not None:
                raise RecipeError(f"{where}: option 'threshold' only goes with op: auto; remove it")
            return [op_params(options, options.op)] * n_layers
        return [ToFuParams(r, options.prop_attn, options.order, options.op)
                for r in expand_r(options.r, n_layers, where)]

    def resolve(self, options: ToFuOptions, per_layer: list[ToFuParams], blocks: list, context: dict,
                where: str) -> list[ToFuParams]:
        """op: auto -> prune or mlerp per layer, from the linearity profile in ``context``."""
        if options.op != "auto" or not per_layer:
            return per_layer
        profile = context.get(self.calibration_key)
        if profile is None:
            raise RecipeError(
                f"{where}: op: auto needs calibration images to measure each block's linearity.\n"
                "  API: tokenopt.optimize(model, recipe, calibration=images); CLI: --calibration digits|DIR; "
                "or run `tokenopt probe MODEL --data ...` and use the recipe it writes.")
        if len(profile) <= max(b.index for b in blocks):
            raise RecipeError(f"{where}: the linearity profile has {len(profile)} values but the model has more "
                              "blocks; it was measured on another model. Measure it again on this one.")
        errors = [float(profile[b.index]) for b in blocks]
        tau = options.threshold
        if tau is None:
            tau = statistics.median(errors)
        # the less linear a block (the higher its error), the more an interpolated token misleads it
        return [replace(p, op="prune" if e >= tau else "mlerp", linearity=e) for p, e in zip(per_layer, errors)]

    def describe(self, params: ToFuParams) -> str:
        text = f"{params.op} r={params.r}"
        if params.linearity is not None:
            text += f" (linearity error {params.linearity:.3f})"
        return text

    def insert_reduction(self, g, metric, h, r: int, step: LayerStep):
        op = step.params.op
        return g.insert_after(metric, ops.tofu_reduce, h, metric, g.state.size, g.state.index, r,
                              g.analysis.prefix_tokens, op, order=step.params.order, label=f"ToFu {op} r={r}")
