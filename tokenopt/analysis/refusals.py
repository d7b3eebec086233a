"""Refusals: the named checks that decide a block must keep its original token grid.

A block whose tokens cannot be removed, merged or moved is still a block (later passes must know
where it is, and a block that needs the grid stops earlier blocks from changing it), but it is
refused, with a reason a user can act on. The checks run in the order written here; the first
that answers refuses the block and its name goes in ``BlockRecord.refused_by``::

    windowed                attention inside windows the analysis read    Swin (passes that know windows run)
    token_stream            x is (B, H, W, C), not (B, N, C)              a grid the analysis could not read
    mha_batch_first         nn.MultiheadAttention(batch_first=False)
    mha_cross_attention     mha(query, key, value) with different inputs
    qk_shapes               q or k has no recorded shape
    windowed_attention      batch of q = batch x windows                  windows in a 3-D stream
    cross_covariance        attention over channels (q: B, H, C, N)        XCiT
    class_attention         a few class-token queries read every token    CaiT, XCiT head
    pooled_queries          fewer/more queries than tokens                MViT-style pooling
    spatial_reduction       fewer keys than queries                       PVT, Twins
    relative_position_bias  a bias over a fixed N x N grid on the logits  BEiT
    rope                    q, k rotated by fixed per-position tables     EVA-02

A check is ``fn(block, ctx) -> NoMatch | None`` registered with ``@check(name)``; ``ctx`` gives
it the graph, the index and the prefix-token count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from tokenopt.analysis.index import GraphIndex
from tokenopt.analysis.nodes import is_add, is_layer_norm, is_linear, shape_of
from tokenopt.analysis.records import CLASS_ATTENTION, WINDOWED, BlockRecord, NoMatch


@dataclass(frozen=True)
class CheckContext:
    gm: fx.GraphModule
    index: GraphIndex
    prefix: int = 0                # prefix tokens (positional checks: the grid is N or N - prefix)


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[[BlockRecord, CheckContext], NoMatch | None]

    def __call__(self, block: BlockRecord, ctx: CheckContext) -> NoMatch | None:
        return self.fn(block, ctx)


CHECKS: list[Check] = []


def check(name: str):
    """Register ``fn`` as the next refusal check, under ``name``."""
    def register(fn):
        if any(c.name == name for c in CHECKS):
            raise ValueError(f"refusal check {name!r} is registered twice")
        CHECKS.append(Check(name, fn))
        return fn
    return register


def first_refusal(block: BlockRecord, ctx: CheckContext, checks: list[Check] | None = None) -> tuple[str, NoMatch] | None:
    """(check name, reason) of the first check that refuses ``block``; None when none does."""
    for c in CHECKS if checks is None else checks:
        why = c(block, ctx)
        if why is not None:
            return c.name, why.at(block.path)
    return None


def check_named(name: str) -> Check:
    return next(c for c in CHECKS if c.name == name)


# ---------------------------------------------------------------- windows, the token stream and MHA

WINDOWED_REASON = ("windowed attention (as in Swin): tokens can be reduced only inside each window, by a pass "
                   "that knows windows (tome, tofu, spa)")


@check(WINDOWED)
def _windowed_block(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    # the analysis read the block's partition (analysis.windows): window-aware passes accept it, the rest
    # refuse it with this reason (removing a stream token breaks the partition)
    return NoMatch(WINDOWED_REASON) if b.window is not None else None


@check("token_stream")
def _token_stream(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    # Swin keeps tokens as a 2-D grid (B, H, W, C) and partitions it into windows
    x = shape_of(ctx.index.node(b.input))
    if x is None or len(x) != 3:
        return NoMatch(f"the token stream is not (batch, tokens, channels) but {x}: "
                       "a 2-D token grid with no window partition tokenopt can read cannot lose tokens")
    return None


@check("mha_batch_first")
def _mha_batch_first(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    if b.attention.kind == "mha" and not ctx.gm.get_submodule(b.attention.module).batch_first:
        return NoMatch("nn.MultiheadAttention with batch_first=False keeps tokens on axis 0; "
                       "tokenopt needs (batch, tokens, channels)")
    return None


@check("mha_cross_attention")
def _mha_cross_attention(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    if b.attention.kind != "mha":
        return None
    n = ctx.index.node(b.attention.node)
    if not (n.args[0] is n.args[1] is n.args[2]) and len(n.args) >= 3:
        return NoMatch("cross-attention (query, key and value differ): not a self-attention block")
    return None


# ---------------------------------------------------------------- shapes of q and k (SDPA, explicit)

def _qk(b: BlockRecord, ctx: CheckContext):
    """(q, k, x) shapes of a non-MHA block, or None when any is unknown (or the block is MHA)."""
    if b.attention.kind == "mha":
        return None
    q, k = shape_of(ctx.index.get(b.attention.q)), shape_of(ctx.index.get(b.attention.k))
    x = shape_of(ctx.index.node(b.input))
    return None if q is None or k is None or x is None else (q, k, x)


@check("qk_shapes")
def _qk_shapes(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    if b.attention.kind != "mha" and (shape_of(ctx.index.get(b.attention.q)) is None or
                                      shape_of(ctx.index.get(b.attention.k)) is None):
        return NoMatch("cannot read the shapes of q and k")
    return None


@check("windowed_attention")
def _windowed(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    # windows folded into the batch axis: removing a token breaks the partition. Heads folded
    # into it instead ((B*H, N, d), nn.MultiheadAttention written out by torch.export) keep every
    # token in each row of the batch: not windows
    if (s := _qk(b, ctx)) and s[0][0] != s[2][0] and s[0][-2] != b.tokens:
        q, _, x = s
        return NoMatch(f"windowed attention: attention runs over {q[0] // max(x[0], 1)} fixed windows per image "
                       "(batch of q is batch x windows); removing tokens breaks the window partition")
    return None


@check("cross_covariance")
def _cross_covariance(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    # XCiT: q is (B, H, C, N), so the attention map is channels x channels
    if (s := _qk(b, ctx)) and s[0][-2] != b.tokens and s[0][-1] == b.tokens:
        return NoMatch("cross-covariance attention (XCiT): attention runs over channels, and the block's local "
                       "patch interaction convolves the token grid")
    return None


@check("class_attention")
def _class_attention(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    # CaiT / XCiT heads: only the class token queries; it reads any number of keys (not grid bound)
    if not (s := _qk(b, ctx)):
        return None
    q, k, _ = s
    if k[-2] > q[-2] or (q[-2] < b.tokens and k[-2] == b.tokens):
        return NoMatch(f"{CLASS_ATTENTION}: {q[-2]} class token quer{'y reads' if q[-2] == 1 else 'ies read'} "
                       f"{k[-2]} tokens as keys; only the class token is updated, there is nothing to reduce here")
    return None


@check("pooled_queries")
def _pooled_queries(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    if (s := _qk(b, ctx)) and s[0][-2] != b.tokens:
        return NoMatch(f"attention sees {s[0][-2]} queries but the block has {b.tokens} tokens "
                       "(windowed or pooled attention)")
    return None


@check("spatial_reduction")
def _spatial_reduction(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    # PVT / Twins: keys and values from a strided conv over the token grid
    if (s := _qk(b, ctx)) and s[1][-2] < s[0][-2]:
        q, k, _ = s
        return NoMatch(f"spatial-reduction attention: keys come from a downsampled grid ({k[-2]} keys for {q[-2]} queries)")
    return None


# ---------------------------------------------------------------- position terms tied to the grid

RELATIVE_BIAS = "relative-position bias: an attention bias indexed by a fixed N x N token grid (as in BEiT)"


def _fixed_operand(op_node: fx.Node, inside: frozenset, x_in: fx.Node, grid_sizes: set) -> fx.Node | None:
    """An operand of ``op_node`` not computed from the tokens, carrying a token-sized axis.

    The token axis of a table is one of the two before the channels (``(N, d)``, ``(N, H, d)``);
    the last axis is channels, whose width can equal the token count: a DiT's adaLN scale
    ``(B, 1, C)`` with C = 64 channels on 64 patches is conditioning, not a position table.
    """
    for a in op_node.all_input_nodes:
        sa = shape_of(a)
        if a in inside or a is x_in or sa is None or len(sa) < 2:
            continue
        if any(s in grid_sizes and s > 1 for s in sa[-3:-1]):
            return a
    return None


def _grid_sizes(b: BlockRecord, ctx: CheckContext) -> set:
    return {b.tokens, b.tokens - ctx.prefix}


@check("relative_position_bias")
def _relative_position_bias(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    # additive terms on the logits: attn_mask of SDPA, or adds between q@k^T and softmax
    core, idx = b.attention, ctx.index
    if core.kind == "sdpa":
        c = idx.node(core.node)
        mask = c.kwargs.get("attn_mask", c.args[3] if len(c.args) > 3 else None)
        if isinstance(mask, fx.Node) and mask.op != "placeholder" and shape_of(mask) is not None:
            names = " ".join(a.target for a in idx.ancestors(mask) | {mask} if a.op == "get_attr")
            if "relative" in names or "rel_pos" in names or shape_of(mask)[-1] in _grid_sizes(b, ctx):
                return NoMatch(RELATIVE_BIAS)
    elif core.kind == "softmax":
        x_in = idx.node(b.input)
        inside, lg = idx.descendants(x_in), idx.node(core.logits)
        for m in (idx.ancestors(lg) | {lg}) - idx.ancestors(core.k):
            if is_add(m) and m in inside and _fixed_operand(m, inside, x_in, _grid_sizes(b, ctx)) is not None:
                return NoMatch(RELATIVE_BIAS)
    return None


@check("rope")
def _rope(b: BlockRecord, ctx: CheckContext) -> NoMatch | None:
    # rotary embeddings: q/k multiplied by position-dependent sin/cos
    core, idx = b.attention, ctx.index
    if core.kind == "mha":
        return None
    x_in = idx.node(b.input)
    inside = idx.descendants(x_in)
    for qk in (core.q, core.k):
        qn = idx.node(qk)
        for m in (idx.ancestors(qn) | {qn}) & inside:
            # a weight is a fixed operand too, and its width can equal the token count (64 channels,
            # 64 patches): only the elementwise ops after the projection can apply a rotation table
            if is_linear(m, ctx.gm) or is_layer_norm(m, ctx.gm):
                continue
            if m.op in ("call_function", "call_method") and \
                    _fixed_operand(m, inside, x_in, _grid_sizes(b, ctx)) is not None:
                return NoMatch("rotary position embedding (RoPE): q and k are rotated by position-dependent "
                               "sin/cos tables tied to the original token grid")
    return None
