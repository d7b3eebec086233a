"""Questions about one fx node: its recorded shape, which op it is, which module it came from.

The patterns in this package are built from these predicates. An op is recognised in every
spelling fx records for it::

    x + y          call_function operator.add      |  x.add(y)       call_method "add"
    a @ b          call_function operator.matmul   |  torch.bmm(a, b), torch.einsum("...", a, b)
    a.softmax(-1)  call_method "softmax"           |  F.softmax(a, -1), nn.Softmax leaf
    F.scaled_dot_product_attention(q, k, v)        |  nn.MultiheadAttention leaf (call_module)
    F.linear(x, w, b)                              |  nn.Linear leaf, aten.linear
    F.layer_norm(x, ...)                           |  nn.LayerNorm leaf, aten.layer_norm

and in the ATen spelling torch.export records (``aten.add.Tensor``, ``aten.scaled_dot_product_attention``
...), although the export front end rewrites those into the calls above first
(:mod:`tokenopt.analysis.aten_vocabulary`); the predicates accept both so a graph half rewritten by
hand still matches.

Shapes come from ``node.meta["tensor_meta"]``, written when the analysis ran the graph on the
example batch (see :mod:`tokenopt.analysis.example`).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_aten = torch.ops.aten


def aten_overloads(*names: str) -> set:
    """ATen overloads by ``op.overload`` name, those this torch build has."""
    found = set()
    for name in names:
        op, _, overload = name.partition(".")
        packet = getattr(_aten, op, None)
        if packet is not None and hasattr(packet, overload or "default"):
            found.add(getattr(packet, overload or "default"))
    return found


SDPA_FN = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention} | \
    aten_overloads("scaled_dot_product_attention")
SOFTMAX_FN = {torch.softmax, F.softmax, torch.Tensor.softmax} | aten_overloads("softmax.int", "_softmax")
MATMUL_FN = {operator.matmul, torch.matmul, torch.bmm, torch.einsum} | aten_overloads("matmul", "bmm")
ADD_FN = {operator.add, torch.add, operator.iadd} | aten_overloads("add.Tensor")
LINEAR_FN = {F.linear, torch._C._nn.linear} | aten_overloads("linear")
LAYER_NORM_FN = {F.layer_norm, torch.layer_norm} | aten_overloads("layer_norm")


def shape_of(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def captured_shape(node) -> tuple | None:
    """:func:`shape_of`, or else the shape of the value torch.export recorded (``meta["val"]``):
    an exported graph carries that before the analysis runs it on the example batch."""
    shape = shape_of(node)
    if shape is not None:
        return shape
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if hasattr(val, "shape") else None


def keeps_under_dce(n: fx.Node) -> bool:
    """What dead-code elimination must keep (``is_impure_node=``): impure calls, and the input
    checks an exported module runs (``_guards_fn``) although nothing reads their result."""
    return n.is_impure() or (n.op == "call_module" and str(n.target).startswith("_guards"))


def region(start: fx.Node, end: fx.Node, order: dict[fx.Node, int] | None = None) -> set[fx.Node]:
    """The nodes ``end`` is computed from, back to (not including) ``start``, plus ``end``: e.g. a
    block's body from its input to its output.

    With ``order`` (each node's position in the graph) the walk also stops at nodes placed before
    ``start``: what the block reads from earlier (the image's batch size, a mask built up front)
    is then left out, only the nodes computed after its input are in.
    """
    seen, todo = {end}, [end]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a is not start and a not in seen and (order is None or order[a] > order[start]):
                seen.add(a)
                todo.append(a)
    return seen


def is_input_batch_size(n: fx.Node) -> bool:
    """``aten.sym_size.int(image, 0)``: the batch size as torch.export records it, read once off
    the model's input and used by every block (fx graphs read ``x.shape`` inside each block)."""
    return (n.op == "call_function" and n.target is _aten.sym_size.int and len(n.args) == 2
            and n.args[1] == 0 and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder")


SIZE_QUERY_FN = aten_overloads("sym_size.int", "sym_size", "sym_numel", "sym_stride.int")
_METADATA_ATTRS = ("shape", "ndim", "dtype", "device")


def is_size_query(n: fx.Node) -> bool:
    """``x.shape``, ``x.size(0)``, ``x.dim()``, ``aten.sym_size.int(x, 0)`` ...: reads what ``x`` looks
    like, not its values (a reshape by ``x.shape[0]`` does not compute from ``x``)."""
    if n.op == "call_method":
        return n.target in ("size", "dim", "numel")
    return n.op == "call_function" and (n.target in SIZE_QUERY_FN or (
        n.target is getattr and len(n.args) > 1 and n.args[1] in _METADATA_ATTRS))


def is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in ADD_FN) or (n.op == "call_method" and n.target in ("add", "add_"))


def is_matmul(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in MATMUL_FN) or (n.op == "call_method" and n.target in ("matmul", "bmm"))


def is_softmax(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in SOFTMAX_FN) or (n.op == "call_method" and n.target == "softmax")


def is_sdpa(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in SDPA_FN


def is_linear(n: fx.Node, gm: fx.GraphModule) -> bool:
    """nn.Linear called as a module, F.linear, or aten.linear."""
    return (n.op == "call_function" and n.target in LINEAR_FN) or is_module(n, gm, nn.Linear)


def is_layer_norm(n: fx.Node, gm: fx.GraphModule) -> bool:
    """nn.LayerNorm called as a module, F.layer_norm, or aten.layer_norm."""
    return (n.op == "call_function" and n.target in LAYER_NORM_FN) or is_module(n, gm, nn.LayerNorm)


def is_module(n: fx.Node, gm: fx.GraphModule, cls: type) -> bool:
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls)


def is_core_node(n: fx.Node, gm: fx.GraphModule) -> bool:
    """Any node that may be an attention core: SDPA, a softmax (function, method or module), MHA."""
    return is_sdpa(n) or is_softmax(n) or is_module(n, gm, nn.Softmax) or is_module(n, gm, nn.MultiheadAttention)


def is_token_cat(n: fx.Node) -> bool:
    """``torch.cat([...], dim=1)``: tensors joined along the token axis of (B, N, C)."""
    if not (n.op == "call_function" and n.target is torch.cat):
        return False
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
    return isinstance(cat_parts(n), (list, tuple)) and dim in (1, -2)


def cat_parts(n: fx.Node):
    """The tensors a ``torch.cat`` node joins."""
    return n.args[0] if n.args else n.kwargs.get("tensors")


def matmul_operands(n: fx.Node) -> tuple | None:
    """The two tensor operands of a matmul node (einsum: after its equation), or None."""
    args = n.args
    if args and isinstance(args[0], str):                 # torch.einsum("...", a, b) or ("...", [a, b])
        args = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    return tuple(args[:2]) if len(args) >= 2 else None


def tensor_args(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if shape_of(a) is not None or a.op == "get_attr"]


def module_path(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        key = list(stack.keys())[-1]
        val = stack[key]
        # fx stores {key: (qualname, type)} in recent torch; older versions {qualname: type}
        return val[0] if isinstance(val, tuple) else key
    if n.op == "call_module":
        return n.target
    if n.op == "get_attr":
        return n.target.rsplit(".", 1)[0] if "." in n.target else ""
    return ""


def common_module_prefix(paths: list[str]) -> str:
    split = [p.split(".") for p in paths if p is not None]
    if not split:
        return ""
    out = []
    for parts in zip(*split):
        if all(p == parts[0] for p in parts):
            out.append(parts[0])
        else:
            break
    return ".".join(out)
