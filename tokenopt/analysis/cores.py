"""Attention cores: where a graph computes softmax(q k^T) v, in the three forms fx shows it.

    sdpa     out = F.scaled_dot_product_attention(q, k, v, attn_mask=...)
             q, k, v = its arguments; output = the call

    softmax  logits = (q @ k.transpose(-2, -1)) * scale [+ bias]      # walked back from the softmax
             attn   = logits.softmax(-1) [-> dropout, head mixing]    # same-size ops only
             out    = attn @ v
             q, k = the operands of the q @ k^T product (k: before its transpose, token axis at -2);
             logits = the softmax input; v = the other operand of attn @ v; output = that matmul

    mha      out, weights = self.mha(query, key, value)               # nn.MultiheadAttention leaf
             output = the call_module node (a tuple); q/k/v live inside the module

A softmax that does not feed a matmul (a gate, a routing weight) is not attention: it comes back
as a ``NoMatch`` with ``near_miss=False``, which reports leave out. A softmax that feeds
``attn @ v`` but has no ``q @ k^T`` behind it is a near miss, reported with its reason.
"""
from __future__ import annotations

import math

import torch.fx as fx
from torch import nn

from tokenopt.analysis.index import GraphIndex
from tokenopt.analysis.nodes import is_matmul, is_module, is_sdpa, is_softmax, matmul_operands, shape_of
from tokenopt.analysis.records import AttentionCore, NoMatch

# Ops that pass a tensor through without mixing tokens (used to walk from k^T back to k, etc.).
PASSTHROUGH_METHODS = {"transpose", "permute", "mul", "div", "contiguous", "to", "float", "type_as", "mT"}
PASSTHROUGH_FUNCTIONS = {"transpose", "permute", "mul", "truediv"}
NOT_ATTENTION = "the softmax result does not multiply values (softmax(...) @ v): not attention"


def find_cores(gm: fx.GraphModule, index: GraphIndex) -> tuple[list[AttentionCore], list[NoMatch]]:
    """Every attention core of the graph, in graph order, and every softmax that is not one."""
    cores, misses = [], []
    for n in index.nodes:
        if is_sdpa(n):
            cores.append(sdpa_core(n))
        elif is_module(n, gm, nn.MultiheadAttention):
            cores.append(mha_core(n, gm))
        elif is_softmax(n) or is_module(n, gm, nn.Softmax):
            core = explicit_core(n)
            if core:
                cores.append(core)
            else:
                misses.append(core.at(n.name))
    return cores, misses


def sdpa_core(n: fx.Node) -> AttentionCore:
    args = n.args + (None, None, None)
    q, k, v = (a if a is not None else n.kwargs.get(key) for a, key in zip(args[:3], ("query", "key", "value")))
    sq = shape_of(q)
    return AttentionCore("sdpa", n.name, q=q.name, k=k.name, heads=sq[1] if sq and len(sq) == 4 else None,
                         v=getattr(v, "name", None), output=n.name)


def mha_core(n: fx.Node, gm: fx.GraphModule) -> AttentionCore:
    mod = gm.get_submodule(n.target)
    return AttentionCore("mha", n.name, heads=mod.num_heads, module=n.target, output=n.name)


def explicit_core(sm: fx.Node) -> AttentionCore | NoMatch:
    """softmax(q @ k^T ...) @ v  ->  AttentionCore, or NoMatch saying which part is missing."""
    # the softmax result must reach the left operand of a matmul through a short chain of
    # same-size ops (dropout; CaiT's talking heads: permute, linear over heads, permute)
    numel = math.prod(shape_of(sm) or (0,))
    prev, nxt, steps = None, sm, 0
    while nxt is not None and not is_matmul(nxt) and steps < 6:
        users = list(nxt.users)
        ok = len(users) == 1 and (is_matmul(users[0]) or math.prod(shape_of(users[0]) or (-1,)) == numel)
        prev, nxt = nxt, (users[0] if ok else None)
        steps += 1
    if nxt is None or not is_matmul(nxt):
        return NoMatch(NOT_ATTENTION, near_miss=False)
    pv = matmul_operands(nxt) or (prev, None)
    v = pv[1] if pv[0] is prev else pv[0]
    # walk back from the softmax input to the q @ k^T matmul, through scale, mask, bias adds
    # and head-mixing ops of the same size
    logits = sm.args[0]
    cur = logits
    seen = 0
    while cur is not None and not is_matmul(cur) and seen < 8:
        cur = next((a for a in cur.all_input_nodes if shape_of(a) is not None and
                    math.prod(shape_of(a)) == numel and a.op != "get_attr"), None)
        seen += 1
    qk = matmul_operands(cur) if cur is not None and is_matmul(cur) else None
    if qk is None:
        return NoMatch("softmax does not follow a q @ k^T product")
    q, kt = qk
    k = _untransposed(kt, shape_of(logits))
    sk = shape_of(k)
    if sk is None or sk[-2] != shape_of(logits)[-1]:
        return NoMatch("cannot find the keys of the q @ k^T product")
    sl = shape_of(logits)
    return AttentionCore("softmax", sm.name, q=q.name, k=k.name, logits=logits.name,
                         heads=sl[1] if len(sl) == 4 else None, v=getattr(v, "name", None), output=nxt.name)


def _untransposed(kt, logits_shape) -> fx.Node:
    """From the right operand of q @ k^T back through transposes and scales to k with its token
    axis at -2 (the keys per head, before ``transpose(-2, -1)``)."""
    k = kt
    while isinstance(k, fx.Node) and (
            (k.op == "call_method" and k.target in PASSTHROUGH_METHODS) or
            (k.op == "call_function" and getattr(k.target, "__name__", "") in PASSTHROUGH_FUNCTIONS)):
        sk = shape_of(k)
        if sk is not None and logits_shape is not None and sk[-2] == logits_shape[-1] and k is not kt:
            break
        k = k.args[0]
    return k
