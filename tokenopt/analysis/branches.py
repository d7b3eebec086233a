"""Branches: the residual branches of a block, and where each attention reads its keys and values.

    x ──┬─ norm ─ self-attn ───┐             Branch("self_attention",  entry=x,  exit=attn out, residual=h1)
        └───────────────────── add h1
    h1 ─┬─ norm ─ cross-attn ──┐ ← text      Branch("cross_attention", entry=h1, exit=attn out, residual=h2)
        └───────────────────── add h2
    h2 ─┬─ norm ─ mlp ─────────┐             Branch("mlp",             entry=h2, exit=mlp out,  residual=h3)
        └───────────────────── add h3

An attention reads its keys and values from the token stream (``kv_source == "tokens"``) when the
block input is among the tensors its keys are computed from: self-attention, and also CaiT's class
attention (keys from the class token joined to the stream) and PVT's spatial reduction (keys from
a downsampled copy of the stream), which the refusals keep as they are. Otherwise it is a
cross-attention and ``kv_source`` names where the keys come from (the text states of a diffusion
UNet). Size queries are not followed: keys reshaped with ``x.shape[0]`` read the stream's size,
not its values.

:func:`blocks.block_for` finds one attention, its residual and the MLP after it, so a
cross-attention between a self-attention and its MLP comes out as a block of its own;
:func:`join_cross_attention` joins it to the block before: one block, three branches.
"""
from __future__ import annotations

from collections import deque
from dataclasses import replace

import torch.fx as fx

from tokenopt.analysis.index import GraphIndex
from tokenopt.analysis.nodes import common_module_prefix, is_size_query
from tokenopt.analysis.records import CROSS_ATTENTION, MLP, SELF_ATTENTION, AttentionCore, BlockRecord, Branch

TOKENS = "tokens"


def keys_of(core: AttentionCore, index: GraphIndex) -> fx.Node | None:
    """The node the keys are computed as: ``core.k``; for nn.MultiheadAttention its key argument."""
    if core.kind == "mha":
        n = index.node(core.node)
        key = n.args[1] if len(n.args) > 1 else n.kwargs.get("key")
        return key if isinstance(key, fx.Node) else None
    return index.get(core.k) if core.k is not None else None


def kv_source(core: AttentionCore, block_input: fx.Node, index: GraphIndex) -> str:
    """"tokens" when the keys are computed from ``block_input``; else the model input they come from
    (the nearest placeholder behind them), or the keys' own node when no input is behind them."""
    k = keys_of(core, index)
    if k is None or block_input in index.data_ancestors(k) or k is block_input:
        return TOKENS
    seen, todo = {k}, deque([k])
    while todo:        # breadth first: the nearest model input is the source
        n = todo.popleft()
        if n.op == "placeholder":
            return n.name
        for a in () if is_size_query(n) else n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return k.name


def attention_branch(core: AttentionCore, skip: fx.Node, residual: fx.Node) -> Branch:
    kind = SELF_ATTENTION if core.kv_source == TOKENS else CROSS_ATTENTION
    return Branch(kind, skip.name, _other_operand(residual, skip).name, residual.name, core)


def mlp_branch(entry: fx.Node, residual: fx.Node) -> Branch:
    return Branch(MLP, entry.name, _other_operand(residual, entry).name, residual.name)


def _other_operand(add: fx.Node, one: fx.Node) -> fx.Node:
    a, b = (x for x in add.args[:2])
    return b if a is one else a


def is_cross_attention(block: BlockRecord) -> bool:
    return block.attention.kv_source != TOKENS


def join_cross_attention(blocks: list[BlockRecord]) -> list[BlockRecord]:
    """Join each cross-attention block to the block before it when that block has no MLP and ends
    where the cross-attention begins (the same stream, nothing in between); renumber the blocks.

    The joined block keeps the first block's input, attention (the self-attention: what every pass
    reads) and attention residual; its merge point and output are the cross-attention block's, so
    a stream-level reduction still runs between the attentions and the MLP.
    """
    out: list[BlockRecord] = []
    for b in blocks:
        prev = out[-1] if out else None
        if (prev is not None and is_cross_attention(b) and b.input == prev.output
                and all(br.kind != MLP for br in prev.branches)):
            path = common_module_prefix([prev.path, b.path]) or prev.path
            out[-1] = replace(prev, path=path, merge_point=b.merge_point, output=b.output,
                              branches=prev.branches + b.branches)
        else:
            out.append(b)
    return [b if b.index == i else replace(b, index=i) for i, b in enumerate(out)]
