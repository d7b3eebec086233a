"""One op vocabulary for both capture front ends: an ATen graph rewritten into the calls fx traces.

``torch.export`` records ATen overloads; symbolic tracing records torch functions, Tensor methods
and modules. The patterns of this package (and the GraphRewriter) read the second vocabulary, so
an exported graph is rewritten into it once, right after capture. Each ATen op becomes the call
that dispatches to the very same kernel, so the numbers do not change::

    aten.linear.default(x, w, b)                    ->  F.linear(x, w, b)
    aten.layer_norm.default(x, s, w, b, eps, cudnn) ->  F.layer_norm(x, s, w, b, eps)
    aten.scaled_dot_product_attention.default(...)  ->  F.scaled_dot_product_attention(...)
    aten.softmax.int(x, d) / aten._softmax(x, d, _) ->  torch.softmax(x, d)
    aten.add.Tensor(a, b) / mul / div / sub          ->  a + b / a * b / a / b / a - b
    aten.matmul / aten.bmm                          ->  a @ b / torch.bmm(a, b)
    aten.cat.default(xs, d)                         ->  torch.cat(xs, d)
    aten.select.int(x, 1, 0)                        ->  x[:, 0]
    aten.slice.Tensor(x, 1, 1, MAX)                 ->  x[:, 1:]          (a slice of everything: x)
    aten.mean.dim(x, [1])                           ->  torch.mean(x, [1])
    aten.view / reshape / transpose / permute ...   ->  x.view(...) / x.reshape(...) / ...
    aten._assert_tensor_metadata(x, ...)            ->  (removed: dtype checks of the capture)

What the capture fixed that token reduction must free again is the job of the modules beside this
one: :mod:`~tokenopt.analysis.token_axis` (sizes), :mod:`~tokenopt.analysis.batch_size` (the
batch size, per block) and :mod:`~tokenopt.analysis.constant_masks` (all-True masks).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from tokenopt.analysis.nodes import aten_overloads, captured_shape, keeps_under_dce

_MAX = 2 ** 63 - 1     # torch.export's end of an open slice (x[:, 1:])


def _function(fn, nargs: int | None = None, keep_kwargs: tuple[str, ...] | None = None):
    """Rewrite to call_function ``fn`` with the first ``nargs`` positional args (all when None)."""
    def rule(n: fx.Node):
        args = n.args if nargs is None else n.args[:nargs]
        kwargs = dict(n.kwargs) if keep_kwargs is None else {k: v for k, v in n.kwargs.items() if k in keep_kwargs}
        return "call_function", fn, tuple(args), kwargs
    return rule


def _method(name: str):
    def rule(n: fx.Node):
        if n.kwargs.get("implicit"):
            return None       # expand(..., implicit=True) has no Tensor method spelling
        return "call_method", name, tuple(n.args), {k: v for k, v in n.kwargs.items() if k != "implicit"}
    return rule


def _binary(fn):
    def rule(n: fx.Node):
        if n.kwargs.get("alpha", 1) != 1 or len(n.args) != 2:
            return None       # add(a, b, alpha=2): not a plain operator
        return "call_function", fn, tuple(n.args), {}
    return rule


def _args(n: fx.Node, names: tuple[str, ...], defaults: tuple) -> list:
    """The arguments of ``n`` by position, keywords and defaults filled in (ATen schema order)."""
    out = list(n.args) + [n.kwargs.get(name, default) for name, default in
                          zip(names[len(n.args):], defaults[len(n.args):])]
    return out[:len(names)]


def _layer_norm(n: fx.Node):
    x, shape, w, b, eps, _ = _args(n, ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
                                   (None, None, None, None, 1e-5, True))
    return "call_function", F.layer_norm, (x, shape, w, b, eps), {}


def _softmax(n: fx.Node):
    if n.target in aten_overloads("_softmax"):
        x, dim, half_to_float = _args(n, ("self", "dim", "half_to_float"), (None, None, False))
        return None if half_to_float else ("call_function", torch.softmax, (x, dim), {})
    x, dim, dtype = _args(n, ("self", "dim", "dtype"), (None, None, None))
    return "call_function", torch.softmax, (x, dim), ({"dtype": dtype} if dtype is not None else {})


def _select(n: fx.Node):
    x, dim, idx = n.args[:3]
    dim = _positive_dim(x, dim)
    if dim is None:
        return None
    return "call_function", operator.getitem, (x, (slice(None),) * dim + (idx,)), {}


def _slice(n: fx.Node):
    x = n.args[0]
    dim, start, end, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]
    dim = _positive_dim(x, dim)
    if dim is None or not all(isinstance(v, (int, type(None))) for v in (start, end, step)):
        return None
    start = None if start in (None, 0) else start
    end = None if end is None or end >= _MAX else end
    step = None if step in (None, 1) else step
    if start is None and end is None and step is None:
        return "replace", x       # x[:, :]: the tensor itself
    return "call_function", operator.getitem, (x, (slice(None),) * dim + (slice(start, end, step),)), {}


def _reduce(fn):
    def rule(n: fx.Node):
        x, dims = n.args[0], (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim"))
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if n.kwargs.get("dtype") is not None:
            return None
        return "call_function", fn, (x, dims), {"keepdim": keep} if keep else {}
    return rule


def _drop(n: fx.Node):
    return "drop", None


def _gelu(n: fx.Node):
    approximate = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
    return "call_function", F.gelu, (n.args[0],), ({"approximate": approximate} if approximate != "none" else {})


def _dropout(n: fx.Node):
    x, p, train = (list(n.args) + [0.5, True][len(n.args) - 1:])[:3]
    return "call_function", F.dropout, (x, p, train), {}


def _sdpa(n: fx.Node):
    return "call_function", F.scaled_dot_product_attention, tuple(n.args), dict(n.kwargs)


RULES: dict = {}
for _op in aten_overloads("linear"):
    RULES[_op] = _function(F.linear)
for _op in aten_overloads("layer_norm"):
    RULES[_op] = _layer_norm
for _op in aten_overloads("scaled_dot_product_attention"):
    RULES[_op] = _sdpa
for _op in aten_overloads("softmax.int", "_softmax"):
    RULES[_op] = _softmax
for _name, _fn in (("add.Tensor", operator.add), ("sub.Tensor", operator.sub), ("mul.Tensor", operator.mul),
                   ("div.Tensor", operator.truediv), ("add.Scalar", operator.add), ("mul.Scalar", operator.mul),
                   ("div.Scalar", operator.truediv), ("sub.Scalar", operator.sub)):
    for _op in aten_overloads(_name):
        RULES[_op] = _binary(_fn)
for _op in aten_overloads("matmul"):
    RULES[_op] = _function(operator.matmul)
for _op in aten_overloads("bmm"):
    RULES[_op] = _function(torch.bmm)
for _op in aten_overloads("cat"):
    RULES[_op] = _function(torch.cat)
for _op in aten_overloads("select.int"):
    RULES[_op] = _select
for _op in aten_overloads("slice.Tensor"):
    RULES[_op] = _slice
for _op, _fn in ((aten_overloads("mean.dim"), torch.mean), (aten_overloads("sum.dim_IntList"), torch.sum), (aten_overloads("amax"), torch.amax)):
    for _o in _op:
        RULES[_o] = _reduce(_fn)
for _op in aten_overloads("gelu"):
    RULES[_op] = _gelu
for _op in aten_overloads("dropout"):
    RULES[_op] = _dropout
for _op in aten_overloads("conv2d"):
    RULES[_op] = _function(F.conv2d)
for _op in aten_overloads("_assert_tensor_metadata"):
    RULES[_op] = _drop
for _name in ("view", "reshape", "transpose.int", "permute", "expand", "contiguous", "flatten.using_ints",
              "unflatten.int", "unsqueeze", "squeeze.dim", "to.dtype", "unbind.int", "chunk", "split.Tensor"):
    for _op in aten_overloads(_name):
        RULES[_op] = _method(_name.split(".")[0])


def _positive_dim(x, dim) -> int | None:
    if not isinstance(dim, int):
        return None
    if dim >= 0:
        return dim
    shape = captured_shape(x)
    return None if shape is None else dim + len(shape)


def canonical_ops(gm: fx.GraphModule) -> int:
    """Rewrite the ATen calls of ``gm`` that :data:`RULES` knows into fx's trace vocabulary, in place.

    Nodes keep their names' meaning, their metadata (shapes, module paths) and their users.
    Returns how many nodes changed.
    """
    changed = 0
    for n in list(gm.graph.nodes):
        rule = RULES.get(n.target) if n.op == "call_function" else None
        if rule is None:
            continue
        out = rule(n)
        if out is None:
            continue
        if out[0] == "drop":
            if not n.users:
                gm.graph.erase_node(n)
                changed += 1
            continue
        if out[0] == "replace":
            n.replace_all_uses_with(out[1])
            gm.graph.erase_node(n)
            changed += 1
            continue
        n.op, n.target, n.args, n.kwargs = out
        changed += 1
    # values nobody reads (nn.MultiheadAttention's averaged weights when only [0] is used) would
    # give the attention a second consumer the patterns do not expect
    gm.graph.eliminate_dead_code(is_impure_node=keeps_under_dce)
    gm.graph.lint()
    gm.recompile()
    return changed
