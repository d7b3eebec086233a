"""Constant attention masks that mask nothing, removed from an exported graph.

Hugging Face builds an all-True attention mask from ``arange`` over the token count when it is
exported. Such a mask fixes the token count the capture saw, so a merge that leaves fewer tokens
would break it; attention without it is the same. :func:`drop_constant_masks` removes the SDPA
masks that read neither the image nor a parameter and let every query see every key.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from tokenopt.analysis.nodes import is_sdpa, keeps_under_dce
from tokenopt.trace import values_at

aten = torch.ops.aten


def _data_ancestors(n: fx.Node) -> set[fx.Node]:
    """What ``n``'s value is computed from, not looking through size queries (a shape is not data)."""
    seen, todo = set(), [n]
    while todo:
        m = todo.pop()
        if m.op in ("call_method", "call_function") and (m.target in ("size", aten.sym_size.int) or
                                                          m.target is getattr(aten.sym_size, "default", None)):
            continue
        for a in m.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def drop_constant_masks(gm: fx.GraphModule, inputs: list) -> list[str]:
    """Remove the SDPA ``attn_mask`` arguments that are constant and mask nothing (see module doc).

    A mask qualifies when it is computed from neither the image nor a parameter or buffer (sizes
    of the image are allowed) and, evaluated on the example ``inputs`` (in placeholder order), is all True (boolean) or all
    zero (float). Returns the names of the SDPA calls that lost their mask.
    """
    candidates = {}
    for n in gm.graph.nodes:
        if not is_sdpa(n):
            continue
        mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
        if not isinstance(mask, fx.Node):
            continue
        sources = _data_ancestors(mask) | {mask}
        if any(s.op in ("placeholder", "get_attr") for s in sources):
            continue
        candidates[n] = mask
    if not candidates:
        return []
    with torch.no_grad():
        values = values_at(gm, {m.name for m in candidates.values()}, *inputs)
    dropped = []
    for call, mask in candidates.items():
        v = values.get(mask.name)
        if not isinstance(v, torch.Tensor):
            continue
        trivial = bool(v.all()) if v.dtype == torch.bool else bool((v == 0).all())
        if not trivial:
            continue
        if "attn_mask" in call.kwargs:
            call.kwargs = {k: a for k, a in call.kwargs.items() if k != "attn_mask"}
        else:
            call.args = (*call.args[:3], None, *call.args[4:])
        dropped.append(call.name)
    gm.graph.eliminate_dead_code(is_impure_node=keeps_under_dce)
    gm.recompile()
    return dropped
