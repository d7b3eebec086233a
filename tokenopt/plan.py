"""Plan: a recipe and a model's analysis become one action per block, checked before rewriting.

Rules apply in order and a later rule replaces an earlier one on the same block. Token counts are
walked block by block, each token stream from its own first block's count, so that a reduction
too large for the tokens left is caught here, with the layer and the recipe line named, before
any graph is touched. A count is a :class:`~tokenopt.tokens.TokenCount`: fixed for merges, "at
most, about" for per-image gates.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from tokenopt.analysis import ModelAnalysis
from tokenopt.errors import PlanError, RecipeError, TokenoptError
from tokenopt.passes import available_passes, get_pass
from tokenopt.passes.base import LayerStep
from tokenopt.recipe import Recipe, Rule, resolve_layers
from tokenopt.tokens import TokenCount


class TokenoptWarning(UserWarning):
    """A recipe asked for more than a layer can give; the layer took the most it could."""


@dataclass
class LayerPlan:
    block: int
    path: str
    tokens_in: TokenCount          # per image; an int given here becomes a fixed count
    tokens_out: TokenCount
    rule: Rule | None = None
    step: LayerStep | None = None

    def __post_init__(self):
        self.tokens_in, self.tokens_out = TokenCount.of(self.tokens_in), TokenCount.of(self.tokens_out)

    @property
    def acted(self) -> str:
        if self.rule is None or self.step is None:
            return "-"
        return f"rule {self.rule.index + 1} ({self.rule.pass_name}): {self.step.describe}"


@dataclass
class Plan:
    recipe: Recipe
    layers: list[LayerPlan]
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (block path, why it was left alone)


def make_plan(recipe: Recipe, analysis: ModelAnalysis, context: dict | None = None) -> Plan:
    """``context`` carries what the passes' calibration measured (see :meth:`Pass.calibrate`)."""
    context = context or {}
    blocks = analysis.blocks
    paths = analysis.block_paths
    if analysis.prefix_tokens >= blocks[0].tokens:
        raise PlanError(f"{recipe.source}: prefix_tokens is {analysis.prefix_tokens} ({analysis.prefix_source}), but "
                        f"{paths[0]}, the first block, sees only {blocks[0].tokens} tokens: no patch token would be "
                        "left to reduce.\n  Set prefix_tokens to the number of cls/distillation/register tokens, "
                        "or leave it out to detect it.")
    chosen: dict[int, tuple[Rule, object]] = {}
    skipped: list[tuple[str, str]] = []
    for rule in recipe.rules:
        where = rule.where(recipe.source)
        idx = resolve_layers(rule.layers, paths, where, streams=[b.stream for b in blocks])
        p = get_pass(rule.pass_name)()
        per_layer = p.resolve(rule.options, p.layer_options(rule.options, len(idx), where),
                              [blocks[i] for i in idx], context, where)
        usable, refused = [], []
        for i, params in zip(idx, per_layer):
            why = p.refuse_layer(blocks[i], params, analysis)
            if why is None:
                usable.append(i)
                chosen[i] = (rule, params)
            else:
                chosen.pop(i, None)
                skipped.append((paths[i], why))
                refused.append((blocks[i], why))
        if not usable:
            raise RecipeError(_nothing_usable(where, p, refused, blocks))
    for name in dict.fromkeys(r.pass_name for r, _ in chosen.values()):   # each pass sees all its layers
        get_pass(name)().check_layers([(blocks[i], params, r.where(recipe.source))
                                       for i, (r, params) in sorted(chosen.items()) if r.pass_name == name])
    _check_grids(recipe, analysis, chosen)

    layers, notes = [], []
    stream, tokens = blocks[0].stream, TokenCount.fixed(blocks[0].tokens)
    for b in blocks:
        if b.stream != stream:      # a new stream starts at its own count: reductions end at a Downsample
            stream, tokens = b.stream, TokenCount.fixed(b.tokens)
        prefix = analysis.streams[stream].prefix_tokens if stream < len(analysis.streams) else analysis.prefix_tokens
        lp = LayerPlan(b.index, b.path, tokens, tokens)
        if b.index in chosen:
            rule, params = chosen[b.index]
            try:
                step = get_pass(rule.pass_name)().plan_layer(b, params, tokens, prefix)
            except TokenoptError as e:   # the pass names the layer; the recipe line is the planner's to add
                raise type(e)(f"{rule.where(recipe.source)}: {e}") from None
            if step.shortfall:
                msg = f"{rule.where(recipe.source)}: {b.path} ({b.index}): {step.shortfall}"
                if recipe.strict:
                    raise PlanError(msg + ".\n  Lower the reduction for this layer, or drop `strict: true` to let "
                                          "it take the most it can.")
                notes.append(msg)
            lp.rule, lp.step, lp.tokens_out = rule, step, step.tokens_out
            tokens = step.tokens_out
        layers.append(lp)
    for n in notes:
        warnings.warn(n, TokenoptWarning, stacklevel=3)
    return Plan(recipe, layers, notes, skipped)


def _check_grids(recipe: Recipe, analysis: ModelAnalysis, chosen: dict[int, tuple[Rule, object]]) -> None:
    """A pass that changes the token count breaks every later block of its stream that needs the
    original grid, and every later stream: a Downsample (patch merging, a strided conv) reads the
    whole grid of the stream before it."""
    blocks = analysis.blocks
    # a windowed block (Swin) is reduced inside its windows only: its stream keeps every token
    first_change = min((i for i, (r, _) in chosen.items()
                        if get_pass(r.pass_name)().changes_tokens(r.options) and blocks[i].window is None),
                       default=None)
    if first_change is None:
        return
    changed = blocks[first_change]
    where = chosen[first_change][0].where(recipe.source)
    for b in blocks[first_change + 1:]:
        if b.stream != changed.stream:
            raise PlanError(
                f"{where}: reducing tokens at {changed.path} breaks {b.path}, which needs the original token grid "
                f"({_stream_origin(analysis, changed.stream, b.stream)}).\n"
                f"  Select only layers on the last token stream (from {_first_of_last_stream(analysis).path} on).")
        if b.grid_bound:
            raise PlanError(
                f"{where}: reducing tokens at {changed.path} breaks "
                f"{b.path}, which needs the original token grid ({b.refusal}).\n"
                f"  Select only layers after {b.path}.")


def _stream_origin(analysis: ModelAnalysis, source: int, target: int) -> str:
    step = next((d for d in analysis.downsamples if d.target == target), None)
    if step is None:
        return f"it is on token stream {target}, after stream {source}"
    return (f"it is on token stream {target}: a {step.kind} at {step.node} makes it from the whole grid of "
            f"stream {source}")


def _first_of_last_stream(analysis: ModelAnalysis):
    last = analysis.blocks[-1].stream
    return next(b for b in analysis.blocks if b.stream == last)


def _nothing_usable(where: str, p, refused: list, blocks: list) -> str:
    """The message for a rule whose pass refuses every block it selects: each distinct reason once
    (with how many blocks), then advice that is true for this model: the passes that would accept
    those blocks, or that none would; other layers only where this pass accepts some."""
    groups: dict[str, list] = {}
    for b, why in refused:
        # one check refuses with a text that may carry the block's shapes (Swin's stages): group by check
        key = b.refused_by if (b.refused_by and why == b.refusal) else why
        groups.setdefault(key, []).append((b, why))
    parts = []
    for members in groups.values():
        (first, why), n = members[0], len(members)
        if n == 1:
            parts.append(f"{first.path}: {why}")
        elif all(w == why for _, w in members):
            parts.append(f"{n} blocks: {why}")
        else:
            parts.append(f"{n} blocks (as at {first.path}): {why}")
    accepts = {name: sum(get_pass(name)().refuse(b) is None for b, _ in refused)
               for name in available_passes() if name != p.name}
    others = [f"{name}" + ("" if k == len(refused) else f" ({k} of them)") for name, k in accepts.items() if k]
    elsewhere = [b.path for b in blocks if p.refuse(b) is None]
    if others:
        advice = f"Use {' or '.join(others)} for these blocks"
    else:
        advice = (f"None of tokenopt's passes ({', '.join(available_passes())}) can reduce these blocks yet, "
                  f"for the reason{'s' if len(parts) > 1 else ''} above")
        if not any(get_pass(name)().refuse(b) is None for name in available_passes() for b in blocks):
            advice += "; no block of this model can be reduced"
    if elsewhere:
        shown = ", ".join(elsewhere[:3]) + (f" and {len(elsewhere) - 3} more" if len(elsewhere) > 3 else "")
        advice += f"; select other layers: {p.name} can rewrite {shown}"
    return (f"{where}: {p.name} cannot rewrite any block it selects ({len(refused)} selected): "
            f"{'; '.join(parts)}.\n  {advice}.")
