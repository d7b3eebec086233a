"""Token axis sizes an exported graph fixed, written as run-time sizes again.

An exported graph spells the token count as a number: ``x.view(B, 197, 6, 64)``.
:func:`free_token_axis` writes every size a view, reshape or expand carries over from its input
as ``x.size(i)`` (and a merged axis as the product, a split one as the quotient), so the graph
follows the tokens a merge leaves.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from tokenopt.analysis.nodes import captured_shape

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
    sin, sout = captured_shape(x), captured_shape(n)
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
        if any(isinstance(sizes[j], int) and sizes[j] == -1 and sout[j] != 1 for j in gj):
            continue         # the one inferred size already follows the input
        # (a -1 standing for a size-1 axis follows nothing: Hugging Face Swin's (B*nW, -1, N, d) heads)
        real_in = [i for i in gi if sin[i] != 1]
        real_out = [j for j in gj if sout[j] != 1]
        if len(real_out) == 1 and len(real_in) == 1 and _reads_input_size(sizes[real_out[0]]):
            continue         # kept, already read at run time from an input (the batch size)
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


def _reads_input_size(v) -> bool:
    """Whether ``v`` is a size read from one of the graph's inputs (the batch size). A size computed
    otherwise (a token count export derived from the image's height and width) is read again from
    the reshaped tensor, which follows the tokens a merge leaves."""
    if not isinstance(v, fx.Node):
        return False
    reads = v.op == "call_method" and v.target == "size" or v.op == "call_function" and "sym_size" in str(v.target)
    return reads and isinstance(v.args[0], fx.Node) and v.args[0].op == "placeholder"


def _free_expand(gm: fx.GraphModule, n: fx.Node) -> int:
    x = n.args[0]
    sin = captured_shape(x)
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
