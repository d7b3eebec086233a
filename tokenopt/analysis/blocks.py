"""Blocks: from an attention core out to its residual adds, the merge point and the MLP.

    pre-norm (ViT, DeiT)                       post-norm
    x ──┬─ norm ─ attn ─┐                      x ──┬─ attn ─┐
        └───────────── add  r1 = merge point       └───── add  r1
    h ──┬─ norm ─ mlp ──┐                               norm       merge point (on r1's chain)
        └───────────── add  r2 = output        h ──┬─ mlp ──┐
                                                   └───── add  r2 = output

1. the *attention residual* r1: the first add after the core whose other operand is an ancestor
   of the core, which is therefore the block input x;
2. the *MLP residual* r2: the first later add that sums a node on the direct chain from r1 (r1
   itself, or its norm in post-norm blocks) with something computed from it, with no attention in
   between. That chain node is the *merge point*: ToMe and ToFu reduce tokens there, between
   attention and MLP. A block without an MLP ends at r1.

No r1 means the core is not inside a transformer block: :class:`NoMatch`, with the reason.
The block's branches (:mod:`tokenopt.analysis.branches`) are the attention, r1 and, when there
is one, the MLP and r2; the core learns where its keys and values come from.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch.fx as fx

from tokenopt.analysis.branches import attention_branch, kv_source, mlp_branch
from tokenopt.analysis.index import GraphIndex
from tokenopt.analysis.nodes import common_module_prefix, is_add, is_core_node, is_size_query, module_path, shape_of
from tokenopt.analysis.records import AttentionCore, BlockRecord, NoMatch

NO_RESIDUAL = "no residual add around the attention (x + attn(x))"


def where_of(core: AttentionCore, index: GraphIndex) -> str:
    """How reports name a core: its module path, else its node."""
    return module_path(index.node(core.node)) or core.node


def block_for(core: AttentionCore, number: int, gm: fx.GraphModule, index: GraphIndex) -> BlockRecord | NoMatch:
    """The block around ``core`` (numbered ``number``), refusal not yet decided."""
    c = index.node(core.node)
    after_core = index.descendants(c) | {c}
    before_core = index.ancestors(c)
    r1 = skip = None
    for n in index.after(c):
        if not is_add(n) or n not in after_core:
            continue
        ops = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        if len(ops) != 2:
            continue
        a, b = ops
        if a in before_core and b in after_core:
            r1, skip = n, a
            break
        if b in before_core and a in after_core:
            r1, skip = n, b
            break
    if r1 is None:
        return NoMatch(NO_RESIDUAL, where=where_of(core, index))
    chain = _direct_chain(r1)
    r2 = merge = None
    for n in index.after(r1):
        if not is_add(n):
            continue
        ops = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        if len(ops) != 2:
            continue
        for s, o in (ops, ops[::-1]):
            if s in chain and o in index.descendants(s):
                r2, merge = n, s
                break
        if r2 is not None:
            break
        if n in index.descendants(r1) and any(
                is_core_node(m, gm) for m in index.ancestors(n) - index.ancestors(r1) - {r1}):
            break  # reached the next block's attention: this block has no MLP
    if r2 is not None and any(is_core_node(m, gm) for m in index.between(merge, r2)):
        r2 = None
    has_mlp = r2 is not None
    if not has_mlp:
        merge, r2 = chain[-1], chain[-1]
    path = common_module_prefix([module_path(n) for n in (c, r1, r2)]) or f"block{number}"
    x_shape = shape_of(skip)
    tokens = x_shape[1] if x_shape and len(x_shape) == 3 else (math.prod(x_shape[1:-1]) if x_shape else 0)
    dim = x_shape[-1] if x_shape else 0
    core = replace(_with_heads(core, index, x_shape, tokens), kv_source=kv_source(core, skip, index))
    branches = (attention_branch(core, skip, r1),) + ((mlp_branch(merge, r2),) if has_mlp else ())
    return BlockRecord(number, path, skip.name, core, r1.name, merge.name, r2.name, tokens, dim,
                       branches=branches)


def _with_heads(core: AttentionCore, index: GraphIndex, x_shape, tokens: int) -> AttentionCore:
    """Heads of an attention whose q is (B*H, N, d) (heads folded into the batch, as
    nn.MultiheadAttention computes it): the batch of q over the batch of the tokens."""
    if core.heads is not None or core.q is None or not x_shape:
        return core
    sq = shape_of(index.get(core.q))
    if sq is None or len(sq) != 3 or sq[-2] != tokens or sq[0] % x_shape[0] or sq[0] == x_shape[0]:
        return core
    return replace(core, heads=sq[0] // x_shape[0])


def _direct_chain(r1: fx.Node) -> list[fx.Node]:
    """r1, then its single-user non-add successors of the same shape (post-norm puts a norm here),
    or the same tokens viewed another way: Swin's timm block runs its attention on (B, H, W, C) and
    its MLP on ``x.reshape(B, -1, C)``."""
    chain = [r1]
    # size queries do not count as users: an export reads ``x.size(-1)`` for the reshape
    while len(users := [u for u in chain[-1].users if not is_size_query(u)]) == 1:
        u = users[0]
        if is_add(u) or not _same_tokens(shape_of(u), shape_of(r1)):
            break
        chain.append(u)
    return chain


def _same_tokens(a, b) -> bool:
    """Equal shapes, or (B, H, W, C) and (B, H*W, C): the same tokens and channels."""
    if a == b:
        return True
    return (a is not None and b is not None and len(a) in (3, 4) and len(b) in (3, 4) and a[0] == b[0]
            and a[-1] == b[-1] and math.prod(a) == math.prod(b))
