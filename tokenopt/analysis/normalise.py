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

Two things the capture fixed that token reduction must free again:

* **Shapes.** An exported graph spells the token count as a number: ``x.view(B, 197, 6, 64)``.
  :func:`free_token_axis` writes every size a view, reshape or expand carries over from its input
  as ``x.size(i)`` (and a merged axis as the product, a split one as the quotient), so the graph
  follows the tokens a merge leaves.
* **The batch size.** An exported graph reads it once off the image (``aten.sym_size.int(x, 0)``)
  and every block's reshapes use that one value. :func:`localise_batch` makes each block read it
  from its own input, as fx graphs do (``B, N, C = x.shape``), so a block that runs on another
  batch (SPA's packed tokens, ``(1, T, C)``) reshapes its own. It needs the blocks, so the
  analysis calls it once they are found.
* **Masks.** Hugging Face builds an all-True attention mask from ``arange`` over the token count
  when it is exported. :func:`drop_constant_masks` removes SDPA masks that read neither the image
  nor a parameter and let every query see every key: attention without them is the same.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from tokenopt.analysis.nodes import aten_overloads, is_input_batch_size, shape_of

aten = torch.ops.aten
_MAX = 2 ** 63 - 1


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
    shape = _shape(x)
    return None if shape is None else dim + len(shape)


def _shape(n) -> tuple | None:
    meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
    if meta is not None and hasattr(meta, "shape"):
        return tuple(meta.shape)
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(val.shape) if hasattr(val, "shape") else None


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
    gm.graph.eliminate_dead_code(is_impure_node=_keep_guards)
    gm.graph.lint()
    gm.recompile()
    return changed


# ---------------------------------------------------------------- masks

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


def _is_sdpa(n: fx.Node) -> bool:
    return n.op == "call_function" and (n.target is F.scaled_dot_product_attention or
                                        n.target in aten_overloads("scaled_dot_product_attention"))


def drop_constant_masks(gm: fx.GraphModule, inputs: list) -> list[str]:
    """Remove the SDPA ``attn_mask`` arguments that are constant and mask nothing (see module doc).

    A mask qualifies when it is computed from neither the image nor a parameter or buffer (sizes
    of the image are allowed) and, evaluated on the example ``inputs`` (in placeholder order), is all
    True (boolean) or all zero (float). Returns the names of the SDPA calls that lost their mask.
    """
    candidates = {}
    for n in gm.graph.nodes:
        if not _is_sdpa(n):
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
    values = _values_of(gm, set(candidates.values()), inputs)
    dropped = []
    for call, mask in candidates.items():
        v = values.get(mask)
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
    gm.graph.eliminate_dead_code(is_impure_node=_keep_guards)
    gm.recompile()
    return dropped


def _keep_guards(n: fx.Node) -> bool:
    """Dead-code elimination keeps the input checks an exported module runs (``_guards_fn``)."""
    return n.is_impure() or (n.op == "call_module" and str(n.target).startswith("_guards"))


def _values_of(gm: fx.GraphModule, wanted: set[fx.Node], inputs: list) -> dict:
    seen: dict = {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                seen[n] = out
            return out

    with torch.no_grad():
        Capture(gm).run(*inputs, enable_io_processing=False)
    return seen


# ---------------------------------------------------------------- the token axis

_RESHAPES = ("view", "reshape")


def free_token_axis(gm: fx.GraphModule) -> int:
    """Write the sizes views, reshapes and expands carry over from their input as run-time sizes.

    ``x.view(B, 197, H, d)`` with x (B, 197, C) becomes ``x.view(B, x.size(1), H, d)``: the same
    on the captured shapes, and still right once a merge leaves fewer tokens. Axes are matched by
    the products of the sizes before them (a reshape keeps an axis when those agree); an output
    axis made of several input axes gets their product, an input axis split in two gets the
    quotient for its one constant part, and where axes are regrouped (several in, several out) the
    one output size the capture computed from the batch gets the quotient. Needs ``tensor_meta`` (shapes on the captured example).
    Returns how many sizes became run-time sizes.
    """
    done = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_method" and n.target in _RESHAPES and len(n.args) >= 2:
            done += _free_reshape(gm, n)
        elif n.op == "call_method" and n.target == "expand" and len(n.args) >= 2:
            done += _free_expand(gm, n)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _sizes_arg(n: fx.Node) -> tuple[list, bool]:
    """The target sizes of a view/reshape/expand node, and whether they came as one list."""
    if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)):
        return list(n.args[1]), True
    return list(n.args[1:]), False


def _set_sizes(n: fx.Node, sizes: list, as_list: bool) -> None:
    n.args = (n.args[0], sizes) if as_list else (n.args[0], *sizes)


def _size_node(gm: fx.GraphModule, before: fx.Node, x: fx.Node, dim: int) -> fx.Node:
    with gm.graph.inserting_before(before):
        s = gm.graph.call_method("size", (x, dim))
    s.meta["nn_module_stack"] = dict(before.meta.get("nn_module_stack", {}))
    return s


def _op_node(gm: fx.GraphModule, before: fx.Node, fn, a, b) -> fx.Node:
    with gm.graph.inserting_before(before):
        s = gm.graph.call_function(fn, (a, b))
    s.meta["nn_module_stack"] = dict(before.meta.get("nn_module_stack", {}))
    return s


def _groups(shape_in: tuple, shape_out: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input and output axes whose sizes multiply to the same number, in order:
    [(input axes, output axes), ...]. Size-1 axes join the run they sit in."""
    groups, i, j = [], 0, 0
    while i < len(shape_in) or j < len(shape_out):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if pi == pj and gi and gj:
                break
            if (pi <= pj and i < len(shape_in)) or j >= len(shape_out):
                if i >= len(shape_in):
                    return None
                pi *= shape_in[i]
                gi.append(i)
                i += 1
            else:
                pj *= shape_out[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


def _free_reshape(gm: fx.GraphModule, n: fx.Node) -> int:
    x = n.args[0]
    sin, sout = _shape(x), _shape(n)
    if not isinstance(x, fx.Node) or sin is None or sout is None or 0 in sin or 0 in sout:
        return 0
    sizes, as_list = _sizes_arg(n)
    if len(sizes) != len(sout) or not all(isinstance(v, int) for v in (*sin, *sout)):
        return 0
    groups = _groups(sin, sout)
    if groups is None:
        return 0
    done = 0
    for gi, gj in groups:
        if any(isinstance(sizes[j], int) and sizes[j] == -1 for j in gj):
            continue         # the one inferred size already follows the input
        real_in = [i for i in gi if sin[i] != 1]
        real_out = [j for j in gj if sout[j] != 1]
        if len(real_out) == 1 and len(real_in) == 1 and isinstance(sizes[real_out[0]], fx.Node):
            continue         # kept, already read at run time (the batch size)
        if len(real_out) == 1 and real_in:
            # kept (one input axis) or merged (several): the size, read at run time
            node = _size_node(gm, n, x, real_in[0])
            for i in real_in[1:]:
                node = _op_node(gm, n, operator.mul, node, _size_node(gm, n, x, i))
            sizes[real_out[0]] = node
            done += 1
        elif len(real_in) == 1 and len(real_out) > 1:
            constant = [j for j in real_out if isinstance(sizes[j], int)]
            if len(constant) != 1:
                continue     # several constant parts (e.g. 3C -> 3, H, d): channels, left alone
            j = constant[0]
            rest = [sizes[o] for o in real_out if o != j]
            divisor = rest[0]
            for r in rest[1:]:
                divisor = _op_node(gm, n, operator.mul, divisor, r)
            sizes[j] = _op_node(gm, n, operator.floordiv, _size_node(gm, n, x, real_in[0]), divisor)
            done += 1
        elif len(real_in) > 1 and len(real_out) > 1:
            # axes regrouped ((N, B*H, d) -> (N*B, C): heads folded into the batch); the one size
            # computed from the batch at run time is the one that also carries the tokens
            computed = [j for j in real_out if isinstance(sizes[j], fx.Node)]
            if len(computed) != 1 or not all(isinstance(sizes[j], int) for j in real_out if j != computed[0]):
                continue
            total = _size_node(gm, n, x, real_in[0])
            for i in real_in[1:]:
                total = _op_node(gm, n, operator.mul, total, _size_node(gm, n, x, i))
            others = 1
            for j in real_out:
                if j != computed[0]:
                    others *= sizes[j]
            sizes[computed[0]] = _op_node(gm, n, operator.floordiv, total, others)
            done += 1
    if done:
        _set_sizes(n, sizes, as_list)
    return done


def _free_expand(gm: fx.GraphModule, n: fx.Node) -> int:
    x = n.args[0]
    sin = _shape(x)
    sizes, as_list = _sizes_arg(n)
    if not isinstance(x, fx.Node) or sin is None or len(sizes) < len(sin):
        return 0
    done = 0
    offset = len(sizes) - len(sin)
    for i, s in enumerate(sin):
        j = i + offset
        if isinstance(sizes[j], int) and sizes[j] == s and s != 1:
            sizes[j] = -1    # expand keeps this axis as it is
            done += 1
    if done:
        _set_sizes(n, sizes, as_list)
    return done



# ---------------------------------------------------------------- the batch axis, per block

def localise_batch(gm: fx.GraphModule, spans: list[tuple[str, str]]) -> int:
    """Make each block read the batch size from its own input, not from the model's.

    ``spans`` are the blocks as (input node, output node) names. A node of a block (computed from
    its input on the way to its output) that reads the batch size off the image
    (:func:`~tokenopt.analysis.nodes.is_input_batch_size`) reads ``input.size(0)`` instead, one
    such node per block, inserted right after the input. The same value on the captured batch;
    the block's own once its input has another batch. Blocks whose input does not lead with the
    batch axis (sequence-first streams) are left alone. Returns how many uses moved.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    image = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    batch = (shape_of(image) or (None,))[0] if image is not None else None
    moved = 0
    for start_name, end_name in spans:
        start, end = by_name[start_name], by_name[end_name]
        if batch is None or (shape_of(start) or (None,))[0] != batch:
            continue
        local = None
        for n in sorted(_body(start, end, order), key=order.__getitem__):
            for a in n.all_input_nodes:
                if not is_input_batch_size(a):
                    continue
                if local is None:
                    with gm.graph.inserting_after(start):
                        local = gm.graph.call_method("size", (start, 0))
                    local.meta["nn_module_stack"] = dict(n.meta.get("nn_module_stack", {}))
                n.replace_input_with(a, local)
                moved += 1
    if moved:
        gm.graph.lint()
        gm.recompile()
    return moved


def _body(start: fx.Node, end: fx.Node, order: dict) -> set[fx.Node]:
    """The nodes ``end`` is computed from that come after ``start``, plus ``end``."""
    seen, todo = {end}, [end]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen and order[a] > order[start]:
                seen.add(a)
                todo.append(a)
    return seen
