"""The op-level placement of a merge: reduce -> op -> restore around each branch of a block.

Stream-level merging (the default, ``placement: stream``) removes tokens from a block on, for
every later block. Op-level merging (``placement: op``, as ToMe for Stable Diffusion places it)
keeps the stream whole: in each chosen block the normed tokens an op reads are merged, the op
runs on fewer tokens, and its output is unmerged back to every position before the residual add::

    match = grid_matching(x, grid, sx, sy, r = int(N * ratio))     # once per block, from its input x
    x = x + unmerge(attn(merge(norm1(x), match)), match)           # merge_attn
    x = x + unmerge(cross_attn(merge(norm2(x), match), text), match)   # merge_crossattn
    x = x + unmerge(mlp(merge(norm3(x), match)), match)            # merge_mlp

Each branch is one :meth:`GraphRewriter.bracket` (entry: the normed tokens, after any adaLN
scale and shift of a DiT; exit: the branch's output, before a DiT's gate), so the token state
outside it is untouched. It needs the block's token grid; blocks more than ``max_downsample``
times below the model's largest grid are left as they are. Prefix tokens (a ViT's class token)
are destinations: they are never merged away.

The placement is shared by every merging pass: ToMe merges each group by its mean, ToFu by its
per-layer rule (prune or MLERP; ``OpLevelParams.op``); the options, plan and rewrite are here.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator
from torch import fx

from tokenopt.analysis.nodes import is_layer_norm, shape_of
from tokenopt.errors import PlanError, RecipeError
from tokenopt.ops import grid_merge as ops
from tokenopt.passes.base import LayerStep, PassOptions, TuneMethod
from tokenopt.tokens import TokenCount

OP_KEYS = ("ratio", "sx", "sy", "use_rand", "seed", "max_downsample", "merge_attn", "merge_crossattn", "merge_mlp")
BRANCH_OPTION = {"self_attention": "merge_attn", "cross_attention": "merge_crossattn", "mlp": "merge_mlp"}


class OpLevelOptions(PassOptions):
    """The recipe keys of the op-level placement, for a merging pass's Options to extend."""

    placement: Literal["stream", "op"] = Field(
        "stream", description="stream: tokens leave the stream from the block on; op: merge around each op "
                              "(attention, cross-attention, MLP) and unmerge its output, the stream keeps every token")
    ratio: Optional[float] = Field(None, ge=0, lt=1, description="placement: op — fraction of a block's tokens "
                                                                 "merged, in [0, 1)")
    sx: PositiveInt = Field(2, description="placement: op — grid cell width: one destination token per sx x sy cell")
    sy: PositiveInt = Field(2, description="placement: op — grid cell height")
    use_rand: bool = Field(False, description="placement: op — a random destination per cell (seeded) instead of "
                                              "its top-left token")
    seed: NonNegativeInt = Field(0, description="placement: op, use_rand — the seed of the destination draw")
    max_downsample: PositiveInt = Field(1, description="placement: op — merge only in blocks whose grid is at most "
                                                       "this many times smaller (per side) than the largest")
    merge_attn: bool = Field(True, description="placement: op — merge around the self-attention")
    merge_crossattn: bool = Field(False, description="placement: op — merge around the cross-attention")
    merge_mlp: bool = Field(False, description="placement: op — merge around the MLP (feed-forward)")

    @model_validator(mode="before")
    @classmethod
    def _placement_keys(cls, data):
        """``placement: op`` takes ``ratio`` instead of ``r``; ``placement: stream`` takes none of the op keys."""
        if not isinstance(data, dict):
            return data
        if data.get("placement") == "op":
            if "r" in data:
                raise ValueError("option 'r' does not go with placement: op; give 'ratio' (the fraction of each "
                                 "block's tokens merged) instead")
            if "ratio" not in data:
                raise ValueError("option 'ratio' is required with placement: op (the fraction of each block's "
                                 "tokens merged, in [0, 1))")
            return {**data, "r": 0}
        given = [k for k in OP_KEYS if k in data and data.get("placement", "stream") == "stream"]
        if given:
            named = ", ".join(repr(k) for k in given)
            raise ValueError(f"option{'s' if len(given) > 1 else ''} {named} only go{'' if len(given) > 1 else 'es'} "
                             "with placement: op (merging around each op); add placement: op and ratio, or remove "
                             f"{'them' if len(given) > 1 else 'it'}")
        return data

    def model_dump(self, **kwargs) -> dict:
        """Only the keys of the rule's placement, so the dump loads back (a saved recipe, Recipe.to_dict)."""
        out = super().model_dump(**kwargs)
        if out.get("placement") == "op":
            out.pop("r", None)
        else:
            for key in ("placement", *OP_KEYS):
                out.pop(key, None)
        return out


@dataclass(frozen=True)
class OpLevelParams:
    """One layer of op-level merging: the fraction merged and how the destinations are chosen."""

    ratio: float
    sx: int = 2
    sy: int = 2
    use_rand: bool = False
    seed: int = 0
    max_downsample: int = 1
    branches: tuple[str, ...] = ("self_attention",)
    op: str = "merge"               # how a destination takes its sources: merge (mean) | mlerp | prune
    r: int = 0                      # filled in by the planner: int(tokens * ratio)


def op_params(options, op: str = "merge") -> OpLevelParams:
    """The layer params of an op-level rule; ``op`` is the pass's merge rule (grid_merge.MERGE_RULES)."""
    branches = tuple(kind for kind, key in BRANCH_OPTION.items() if getattr(options, key))
    return OpLevelParams(options.ratio, options.sx, options.sy, options.use_rand, options.seed,
                         options.max_downsample, branches, op)


BRANCH_SHORT = {"self_attention": "attn", "cross_attention": "cross", "mlp": "mlp"}


def op_level_cap(tokens: int, prefix: int, sx: int, sy: int) -> int:
    """The most tokens one op can merge in a block of ``tokens``: every source, i.e. all of them but the
    prefix tokens and one destination per ``sx x sy`` cell (grid_matching never merges more)."""
    grid = tokens - prefix
    return max(grid - grid // (sx * sy), 0)


def plan_op_level(block, params: OpLevelParams, tokens_in, prefix: int):
    """The step of one op-level layer: the stream keeps its count; each chosen op runs on r fewer tokens,
    ``ratio`` of the block's tokens (tomesd's ``int(N * ratio)``), at most `op_level_cap`."""
    if TokenCount.of(tokens_in).max != block.tokens:
        # the matching tiles the block's whole grid; a stream an earlier rule shortened has lost it
        raise PlanError(f"{block.path}: placement: op needs the block's whole token grid ({block.tokens} tokens), "
                        f"but an earlier stream-level reduction leaves it {tokens_in}.\n  Put op-level rules only "
                        "on blocks before the first stream-level one, or use placement: stream here too.")
    r = min(int(block.tokens * params.ratio), op_level_cap(block.tokens, prefix, params.sx, params.sy))
    around = "/".join(BRANCH_SHORT[b] for b in params.branches)
    return LayerStep(tokens_in, replace(params, r=r), f"op-level {params.op} r={r} around {around}")


def ratio_for(r: int, tokens: int) -> float:
    """The ratio with the fewest decimals that plans ``r`` merges in a block of ``tokens`` (the inverse of
    plan_op_level's ``int(tokens * ratio)``): how a count is written in a recipe."""
    for digits in range(1, 16):
        ratio = round((r + 0.5) / tokens, digits)
        if int(tokens * ratio) == r:
            return ratio
    raise ValueError(f"no ratio merges {r} of {tokens} tokens")


def tune_op_level(pass_name: str, **extra) -> TuneMethod:
    """The tuner's op-level choice for a merging pass: merge around the self-attention only (tomesd's
    default), destinations on the default cells. ``ratio`` is one fraction for all the layers of a rule (as
    tomesd's), so the layers are written one rule per distinct ratio; ``extra``: the pass's own keys."""
    sx, sy = (OpLevelOptions.model_fields[k].default for k in ("sx", "sy"))

    def rules(layers: list[int], rs: list[int], tokens: int | None) -> list[dict]:
        if tokens is None:
            raise ValueError("an op-level rule needs the tokens entering its blocks to write its ratio")
        by_ratio: dict[float, list[int]] = {}
        for i, r in zip(layers, rs):
            by_ratio.setdefault(ratio_for(r, tokens), []).append(i)
        return [{"pass": pass_name, "layers": idx, "placement": "op", "ratio": ratio, **extra}
                for ratio, idx in by_ratio.items()]

    return TuneMethod(rules, keeps_stream=True, cap=lambda tokens, prefix: op_level_cap(tokens, prefix, sx, sy))


def downsample_of(block, analysis) -> int:
    """How many times smaller (per side) the block's grid is than the largest in the model."""
    top = max(b.tokens for b in analysis.blocks)
    return int(math.ceil(math.sqrt(top // block.tokens)))


def refuse_op_level(block, params: OpLevelParams, analysis, pass_name: str) -> str | None:
    """Why ``block`` is left alone (below max_downsample), None to merge; RecipeError for a block
    that cannot take op-level merging at all (no grid, a grid the cells do not tile)."""
    if block.refusal is not None:
        return block.refusal
    stream = analysis.streams[block.stream] if block.stream < len(analysis.streams) else None
    if stream is None or stream.grid is None:
        raise RecipeError(f"{block.path}: {pass_name} placement: op needs the block's token grid (H x W), and the "
                          "shapes do not show one.\n  Use placement: stream for this block, or select only "
                          "blocks whose tokens come from a (B, C, H, W) map.")
    h, w = stream.grid
    if h % params.sy or w % params.sx:
        raise RecipeError(f"{block.path}: sx={params.sx}, sy={params.sy} do not tile its {h}x{w} token grid "
                          f"(H must divide by sy, W by sx).\n  Choose sx dividing {w} and sy dividing {h}.")
    ds = downsample_of(block, analysis)
    if ds > params.max_downsample:
        return (f"its grid ({h}x{w}) is {ds}x below the largest, beyond max_downsample={params.max_downsample} "
                "(raise max_downsample to merge there)")
    if not any(br.kind in params.branches for br in block.branches):
        return "it has none of the branches the rule merges around"
    return None


_MODULATE = {operator.mul, operator.add, torch.mul, torch.add}


def _modulation(node, g, body):
    """The user of ``node`` that scales or shifts it by one value per image (adaLN: a (B, 1, C)
    operand, broadcast over the tokens), or None."""
    users = [u for u in node.users if u in body]
    if len(users) != 1 or users[0].target not in _MODULATE:
        return None
    u = users[0]
    others = [a for a in u.args if a is not node]
    if len(others) != 1 or not isinstance(others[0], fx.Node):
        return None
    mine, theirs = shape_of(node), shape_of(others[0])
    if mine is None or theirs is None or len(mine) < 2:
        return None
    per_image = len(theirs) < len(mine) - 1 or (len(theirs) == len(mine) and theirs[-2] == 1)
    return u if per_image else None


def op_input(g, block, branch):
    """The tokens a branch's op reads, where the merge goes: the norm right after the branch's
    entry (norm1/norm2/norm3) and the adaLN modulation that follows it (DiT, PixArt:
    ``norm(x) * (1 + scale) + shift``, one scale and shift per image), as tomesd merges the output
    of a diffusers norm; a branch with no norm reads the stream itself (PixArt's cross-attention)."""
    entry = g.node(branch.entry)
    body = g.region(entry, g.node(branch.exit))
    norms = [u for u in entry.users if u in body and is_layer_norm(u, g.gm)]
    if len(norms) > 1:
        raise PlanError(f"{block.path}: the {branch.kind.replace('_', ' ')} branch reads the token stream through "
                        f"{len(norms)} LayerNorms, so op-level merging cannot tell which tokens the op reads.\n"
                        "  Use placement: stream, or leave this branch out (merge_attn / merge_crossattn / merge_mlp).")
    if not norms:
        return entry
    start = norms[0]
    for _ in range(2):          # scale, then shift
        nxt = _modulation(start, g, body)
        if nxt is None:
            break
        start = nxt
    return start


def rewrite_op_level(g, block, params: OpLevelParams, grid: tuple[int, int], prefix: int) -> None:
    """Bracket each chosen branch of ``block``: merge its normed tokens, unmerge its output."""
    if params.r <= 0:
        return      # nothing merged: the graph is the original's, bit for bit
    x = g.node(block.input)
    match = g.insert_after(x, ops.grid_matching, x, grid, params.sx, params.sy, params.r, prefix,
                           params.use_rand, params.seed,
                           label=f"op-level matching r={params.r} ({params.sx}x{params.sy} cells)")
    for branch in block.branches:
        if branch.kind not in params.branches:
            continue
        start = op_input(g, block, branch)
        g.bracket(start, g.node(branch.exit),
                  enter=lambda s, kind=branch.kind: g.insert_after(s, ops.merge_tokens, s, match, params.op,
                                                                   label=f"{params.op} before {kind}"),
                  exit=lambda s, end, kind=branch.kind: (ops.unmerge_tokens, (match,), f"unmerge {kind} output"))
