"""ToSA: token selective attention (Singh et al., CVPRW 2024) — learned selectors, bypass, restore.

A selective layer i attends among k tokens chosen by a small selector that reads layer i-1's
attention logits; the others bypass the layer unchanged and every token is put back in place, so
no token is dropped and dense heads keep working. Before (layer i)::

    y = block_i(x)

After (``bypass: block``; with ``bypass: attention`` the restore moves to the attention residual
and every token goes through the MLP)::

    logits = q_{i-1} @ k_{i-1}^T * scale          # extra nodes when layer i-1 is a fused SDPA
    logp   = tosa_selectors.i(logits)             # predicted attention of layer i
    idx    = topk_tokens(token_scores(logp), k, prefix)
    y      = restore_tokens(x, idx, block_i(gather_tokens(x, idx)))

The selectors are submodules of the rewritten model (``tosa_selectors.<layer>``), so they are in
its state_dict and artifacts; ``tokenopt train`` fits them (tokenopt.train.selector). Until then
using the model warns (``strict: true``: refuses), since untrained selectors pick tokens from the
previous layer's attention alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Union

import torch
import torch.fx as fx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenopt.analysis import shape_of
from tokenopt.errors import PlanError, RecipeError
from tokenopt.ops import selection as ops
from tokenopt.passes.base import LayerStep, Pass, PassOptions, register_pass
from tokenopt.rewrite.learned import LearnedKind, hook_for, learned_modules, register_learned
from tokenopt.tokens import TokenCount

SELECTOR_PREFIX = "tosa_selectors"


class UntrainedSelectorWarning(UserWarning):
    """A ToSA model runs with selectors that were never trained."""


SELECTORS = register_learned(LearnedKind(
    SELECTOR_PREFIX, ops.TokenSelector, "ToSA selectors", UntrainedSelectorWarning,
    untrained="they pick tokens by the previous layer's attention alone",
    api="tokenopt.train.selector.train_selectors"))


class SelectorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input: Literal["map", "pooled"] = Field(
        "map", description="map: the full N x N logits (the paper) | pooled: two logit rows per head, O(N d)")
    # upper bounds: past them building the selector fails (an int64 overflow in torch), not the recipe check
    hidden: int = Field(64, ge=1, le=4096, description="channels between the two convolutions")
    kernel: int = Field(3, ge=1, le=1023, description="odd convolution width along the keys")
    residual: bool = Field(True, description="add the input logits to the prediction (untrained = previous layer)")

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel must be odd so the keys keep their positions, got {v}")
        return v


class ToSAOptions(PassOptions):
    keep: Union[int, float] = Field(
        description="tokens that attend in each selected layer: a fraction in (0, 1] of the non-prefix tokens, "
                    "or a whole number of them")
    bypass: Literal["block", "attention"] = Field(
        "block", description="what unselected tokens skip: block (attention and MLP) | attention")
    selector: SelectorOptions = Field(default_factory=SelectorOptions)

    @field_validator("keep", mode="before")
    @classmethod
    def _keep(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"keep must be a fraction in (0, 1] or a whole number of tokens, got {v!r}")
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(f"keep must be a fraction in (0, 1] (e.g. 0.5) or a whole number of tokens >= 1, got {v}")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"keep must be at least 1 token (or a fraction in (0, 1]), got {v}")
        return v


@dataclass(frozen=True)
class ToSAParams:
    """One layer: ``keep`` asked by the recipe; ``k`` tokens (besides the prefix) attend, decided by the plan."""

    keep: Union[int, float]
    bypass: str
    selector: SelectorOptions
    k: int = 0


@dataclass
class _Selected:
    """A selective layer as the next one reads it: its selector's input node and kind, its top-k node."""

    input: fx.Node
    kind: str
    idx: fx.Node


@dataclass
class ToSAGraphState:
    """What ToSA carries through one rewrite: the selective layers so far."""

    layers: dict[int, _Selected] = field(default_factory=dict)


@register_pass("tosa")
class ToSA(Pass):
    """Attend among the tokens a learned selector picks; the rest bypass the layer unchanged."""

    Options = ToSAOptions
    learned = SELECTORS
    changes_token_count = False   # every token comes back, in place, after each selective layer

    def layer_options(self, options: ToSAOptions, n_layers: int, where: str) -> list[ToSAParams]:
        return [ToSAParams(options.keep, options.bypass, options.selector) for _ in range(n_layers)]

    def resolve(self, options: ToSAOptions, per_layer: list[ToSAParams], blocks: list, context: dict,
                where: str) -> list[ToSAParams]:
        for b in blocks:
            if b.index == 0:
                raise RecipeError(
                    f"{where}: layer 0 ({b.path}) cannot be selective: its selector reads the attention "
                    "of the layer before it, and there is none.\n  Start the layers at 1 (e.g. \"1-11\") "
                    "or use second-half.")
        return per_layer

    def plan_layer(self, block, params: ToSAParams, tokens_in: TokenCount, prefix: int) -> LayerStep:
        if tokens_in != block.tokens:
            raise RecipeError(f"{block.path} ({block.index}) gets {tokens_in} of its {block.tokens} "
                              "tokens after an earlier merge; ToSA needs every token in place (its selector reads "
                              "the full attention of the layer before).\n  Apply tosa to layers before the merging ones.")
        free = tokens_in.max - prefix
        keep = params.keep
        if isinstance(keep, int) and keep > free:
            raise RecipeError(f"keep={keep} at {block.path} ({block.index}), but it has only {free} "
                              f"tokens to select from ({tokens_in} with {prefix} prefix token(s), which always "
                              f"attend).\n  Use keep <= {free}, or a fraction such as 0.5.")
        k = keep if isinstance(keep, int) else max(1, round(keep * free))
        return LayerStep(tokens_in, replace(params, k=k),
                         f"attend {k}/{free}{f' + {prefix} prefix' if prefix else ''}, bypass {params.bypass}, "
                         f"selector {params.selector.input}",
                         fixed_grid=f"attends a fixed {k} of its {free} tokens, with a selector trained on that grid")

    def rewrite(self, g, block, step: LayerStep) -> None:
        k, bypass, sel = step.params.k, step.params.bypass, step.params.selector
        prefix = g.analysis.prefix_tokens
        prev = g.analysis.blocks[block.index - 1]
        state = g.pass_state(ToSAGraphState)
        x = g.node(block.input)
        heads = _heads(g, prev)
        if block.attention.heads and block.attention.heads != heads:
            raise PlanError(f"{block.path}: it has {block.attention.heads} attention heads and the layer before it "
                            f"{heads}; a ToSA selector predicts one layer's heads from the other's.")
        g.attention_qkv(prev)   # an MHA written out is the previous block's own work, not selector cost
        before = set(g.inserted)
        features = _selector_input(g, prev, sel.input, x, state.layers.get(prev.index), prefix)
        selector = ops.SELECTORS[sel.input](heads, sel.hidden, sel.kernel, sel.residual)
        logp = g.add_learned(block, SELECTORS, selector, features, label=f"ToSA selector ({sel.input})")
        scores = g.insert_after(logp, ops.token_scores, logp, label="token scores")
        idx = g.insert_after(scores, ops.topk_tokens, scores, k, prefix, label=f"top-{k} tokens (+ prefix)")
        g.mark_overhead(block, *(g.node(n) for n in set(g.inserted) - before))   # logits/stats, selector, top-k
        end = g.node(block.output if bypass == "block" else block.merge_point)
        g.bracket(x, end, blocks=(block,),
                  enter=lambda x: g.insert_after(idx, ops.gather_tokens, x, idx, label="selected tokens"),
                  exit=lambda x, end: (ops.restore_tokens, (x, idx), f"restore: bypassed tokens skip the {bypass}"))
        state.layers[block.index] = _Selected(features, sel.input, idx)


def _heads(g, block) -> int:
    if block.attention.heads:
        return block.attention.heads
    raise PlanError(f"{block.path}: cannot tell how many heads its attention has (needed by the ToSA selector "
                    "of the next layer)")


def _selector_input(g, prev, kind: str, x: fx.Node, record: _Selected | None, prefix: int) -> fx.Node:
    """Layer ``prev``'s logits as the selector of the next layer reads them, inserted after ``x``.

    If ``prev`` was selective (``record``), its logits cover only its selected tokens; they are
    written over the input its own selector read, so the result always spans all N tokens.
    """
    where = f"{prev.path} (the layer before a tosa layer)"
    q, k, _ = g.attention_qkv(prev)          # an nn.MultiheadAttention is written out first
    core = g.core(prev)
    sq = shape_of(q)
    if sq is not None and sq[0] != shape_of(x)[0] and len(sq) == 4:
        raise PlanError(f"{where}: its attention runs in windows, so it has no attention map over all tokens "
                        f"({prev.refusal or 'windowed attention'}).")
    if core.kind == "softmax":
        logits = g.node(core.logits)
        cur = g.insert_after(x, ops.heads_first, logits, x, label=f"{prev.path} logits")
        if kind == "pooled" and (record is None or record.kind == "pooled"):
            cur = g.insert_after(cur, ops.stats_from_logits, cur, x, prefix, label=f"{prev.path} logit stats")
    else:
        scale = g.attention_scale(prev)
        if kind == "map" or (record is not None and record.kind == "map"):
            cur = g.insert_after(x, ops.attention_logits, q, k, scale, x, label=f"{prev.path} logits q k^T")
        else:
            cur = g.insert_after(x, ops.logit_stats, q, k, scale, x, prefix, label=f"{prev.path} logit stats")
    if record is None:
        return cur
    if record.kind == "map":
        cur = g.insert_after(cur, ops.fill_map, record.input, cur, record.idx,
                             label="logits of the selected tokens over the previous map")
        if kind == "pooled":
            cur = g.insert_after(cur, ops.stats_from_logits, cur, x, prefix, label=f"{prev.path} logit stats")
        return cur
    if kind == "map":
        raise PlanError(f"{where}: its selector read pooled statistics, so no full attention map exists for the "
                        "map selector after it.\n  Use the same selector input in consecutive tosa layers.")
    return g.insert_after(cur, ops.fill_stats, record.input, cur, record.idx,
                          label="logit stats of the selected tokens over the previous ones")


def selectors(module: torch.nn.Module) -> dict[int, ops.TokenSelector]:
    """The ToSA selectors of a rewritten model, by the index of the layer they select for."""
    return learned_modules(module, SELECTORS)


#: Forward pre-hook checking the selectors only (the model itself carries learned.check_trained).
check_selectors_trained = hook_for(SELECTORS)
