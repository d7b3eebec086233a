"""Pooling and features: what the model does with the tokens after its last block.

Walks forward from the last block's output through token-wise ops (norms, linears, dropout)
until something reduces or indexes the token axis::

    x[:, 0]                   -> Pooling("cls", token 0)
    x[:, 1:].mean(dim=1)      -> Pooling("avg", start=1)      # prefix tokens excluded
    x.amax(dim=1)             -> Pooling("max")
    return x / attn_pool(x)   -> Pooling("tokens", ...)       # every token is consumed

The *features* node is the last token-wise node that still holds every token (e.g. the final
norm): where a pipeline asking for token outputs reads them.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from tokenopt.analysis.index import GraphIndex
from tokenopt.analysis.nodes import is_layer_norm, is_linear, module_path, shape_of
from tokenopt.analysis.records import BlockRecord, Pooling

_TOKENWISE_MODULES = (nn.LayerNorm, nn.Linear, nn.Dropout, nn.Identity, nn.GELU)
_TOKENWISE_MODULE_NAMES = ("LayerNorm", "RmsNorm", "Identity", "Dropout")
_TOKENWISE_FUNCTIONS = (F.layer_norm, F.linear, F.gelu, F.dropout, operator.mul, operator.add)
_TOKENWISE_FUNCTION_NAMES = ("layer_norm", "rms_norm", "gelu", "dropout")


def find_pooling(last: BlockRecord, gm: fx.GraphModule, index: GraphIndex) -> tuple[list[Pooling], str]:
    """(every way the tokens leave the model, the features node name)."""
    out = index.node(last.output)
    features = out
    n_tok = last.tokens
    pools: list[Pooling] = []
    frontier, seen = [(out, 0)], set()
    while frontier:
        n, start = frontier.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            su = shape_of(u)
            if u.op == "output":
                pools.append(Pooling("tokens", None, detail="the model returns all tokens"))
            elif u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], tuple) \
                    and len(u.args[1]) >= 2 and u.args[1][0] == slice(None):
                idx = u.args[1][1]
                if isinstance(idx, int):
                    pools.append(Pooling("cls", u.name, detail=f"token {idx}"))
                elif isinstance(idx, slice):
                    frontier.append((u, (idx.start or 0)))
                else:
                    pools.append(Pooling("tokens", u.name, detail=f"indexes tokens with {idx!r}"))
            elif (u.op == "call_method" and u.target in ("mean", "sum", "amax", "max")) or (
                    u.op == "call_function" and u.target in (torch.mean, torch.sum, torch.amax, torch.max)):
                dim = u.kwargs.get("dim", u.args[1] if len(u.args) > 1 else None)
                if dim in (1, -2, (1,), [1]):
                    kind = "avg" if u.target in ("mean", torch.mean, "sum", torch.sum) else "max"
                    name = u.target if isinstance(u.target, str) else u.target.__name__
                    pools.append(Pooling(kind, u.name, start=start, detail=f"{name} over tokens"))
                else:
                    pools.append(Pooling("tokens", u.name, detail="reduces over channels, keeps tokens"))
            elif su is not None and len(su) == 3 and su[1] in (n_tok, n_tok - start) and _token_wise(u, gm):
                frontier.append((u, start))
                if start == 0 and index.position(u) > index.position(features):
                    features = u
            else:
                pools.append(Pooling("tokens", u.name, detail=_consumer(u, gm)))
    return pools, features.name


def _consumer(u: fx.Node, gm: fx.GraphModule) -> str:
    """How ``u`` uses the tokens, worded for a person: the module (path and class) or the
    operation, and the module it runs in; never fx's node names."""
    if u.op == "call_module":
        return f"{u.target} ({type(gm.get_submodule(u.target)).__name__}) reads every token"
    if u.op == "call_function" and u.target is getattr:
        what = f"the tokens' .{u.args[1]} is read"
    else:
        name = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", str(u.target))
        what = f"{name}() reads every token"
    where = module_path(u)
    return what + (f" in {where}" if where else "")


def _token_wise(u: fx.Node, gm: fx.GraphModule) -> bool:
    if is_linear(u, gm) or is_layer_norm(u, gm):
        return True
    if u.op == "call_module":
        mod = gm.get_submodule(u.target)
        return isinstance(mod, _TOKENWISE_MODULES) or type(mod).__name__ in _TOKENWISE_MODULE_NAMES
    if u.op == "call_function":
        return u.target in _TOKENWISE_FUNCTIONS or getattr(u.target, "__name__", "") in _TOKENWISE_FUNCTION_NAMES
    return u.op == "call_method" and u.target in ("contiguous", "to", "float")
