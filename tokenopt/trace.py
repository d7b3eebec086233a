"""Tracing: turn any ViT ``nn.Module`` into a ``torch.fx.GraphModule`` whose graph shows the tokens.

The tracer goes *into* modules (so the attention cores, residual adds and q/k/v are graph nodes
the analysis can match) except where that is impossible or unhelpful:

* timm registers modules and functions that fx cannot trace (``register_notrace_module`` /
  ``register_notrace_function``); they stay leaves / opaque calls here too.
* ``torch.nn`` modules stay leaves as fx does by default (``nn.MultiheadAttention`` is matched
  as a whole), users can add their own leaves (``leaf_modules=``) by class or qualified name.
* Optional forward arguments (timm's ``attn_mask=None``, ``is_causal=False``, ``pre_logits``)
  are made concrete with their defaults, so control flow on them is resolved at trace time.

Running a graph node by node: :class:`NodeTaggingInterpreter` (an error names the node it came
from) and :func:`values_at` (one run, the values of the nodes asked for).
"""
from __future__ import annotations

import inspect
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from tokenopt.errors import AnalysisError


def _timm_notrace() -> tuple[set[type], tuple]:
    try:
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    except Exception:  # timm missing or moved: no registries to honour
        return set(), ()
    return set(get_notrace_modules()), tuple(get_notrace_functions())


class ViTTracer(fx.Tracer):
    """fx Tracer that honours timm's notrace registries and user-named leaf modules."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        notrace_modules, notrace_functions = _timm_notrace()
        super().__init__(autowrap_functions=notrace_functions)
        self.leaf_types = tuple(notrace_modules | {m for m in leaf_modules if isinstance(m, type)})
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        if type(m).__name__ in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def concrete_defaults(model: nn.Module, given: Iterable[str] = ()) -> dict:
    """Every forward argument after the input that has a default, fixed to that default, except
    those ``given`` (the example inputs name them: they stay inputs of the graph)."""
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    given = set(given)
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in given:
            continue
        if p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
    return concrete


def trace(model: nn.Module, leaf_modules: Iterable[type | str] = (), given: Iterable[str] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule that keeps its submodule paths.

    ``given``: the forward parameters the example inputs provide; the others that have a default
    are fixed to it (a flag such as ``return_dict=True``), so the graph takes what the example gives.

    Raises AnalysisError (exit 2 in the CLI) with the fx message and what to try when the model
    has data-dependent Python control flow fx cannot follow.
    """
    if isinstance(model, fx.GraphModule):
        return model
    tracer = ViTTracer(leaf_modules)
    before = set(vars(model))
    try:
        graph = tracer.trace(model, concrete_args=concrete_defaults(model, given))
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError... all mean the same
        _forget_constants(model, before)
        name = type(model).__name__
        raise AnalysisError(
            f"cannot trace {name} with torch.fx: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            "  The model's forward has Python control flow on tensor values or calls code fx cannot follow. "
            "Name the offending submodule as a leaf (API: leaf_modules=[...]; CLI: --leaf CLASSNAME), "
            "so it is kept whole."
        ) from None
    _drop_concrete_placeholders(graph)
    gm = fx.GraphModule(tracer.root, graph, class_name=f"{type(model).__name__}Traced")
    _forget_constants(model, before)      # the graph module holds its own references now
    gm.meta["tokenopt_source_class"] = f"{type(model).__module__}:{type(model).__qualname__}"
    return gm


def _forget_constants(model: nn.Module, before: set[str]) -> None:
    """Take back the ``_tensor_constantN`` attributes fx's tracer set on the user's module.

    fx stores each tensor a forward creates from no input (``x + torch.ones(3)``) as an attribute of
    the module it traces, numbered on from those already there. Left behind, they change the user's
    model, and a second trace of it names its constants ``_tensor_constant1``... while a fresh model
    rebuilt from a saved artifact's base names them from 0: the artifact would not load."""
    for name in set(vars(model)) - before:
        if name.startswith("_tensor_constant"):
            delattr(model, name)


def _drop_concrete_placeholders(graph: fx.Graph) -> None:
    """Remove the inputs fixed by ``concrete_args`` and the asserts fx adds to check them.

    They can only ever hold their default, so the traced module takes just the image; drawn
    graphs and ``torch.compile`` guards stay free of them.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][1:]
    for p in placeholders:
        chain, stack = [], [p]
        while stack:
            n = stack.pop()
            for u in n.users:
                if u not in chain:
                    chain.append(u)
                    stack.append(u)
        if any(_is_check(u) is False for u in chain):
            continue  # the value is really used (not only asserted): keep the input
        for u in reversed(sorted(chain, key=lambda n: list(graph.nodes).index(n))):
            graph.erase_node(u)
        graph.erase_node(p)


def _is_check(n: fx.Node) -> bool:
    import operator
    name = getattr(n.target, "__name__", "")
    return n.op == "call_function" and (name in ("_assert_is_none", "_assert") or n.target in (operator.eq, operator.ne))


class NodeTaggingInterpreter(fx.Interpreter):
    """An Interpreter whose errors say where they happened: the failing node is attached to the
    exception as ``tokenopt_node``, so callers can name it without tracking the run themselves."""

    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except Exception as e:
            if getattr(e, "tokenopt_node", None) is None:
                e.tokenopt_node = n
            raise


class _KeepValues(NodeTaggingInterpreter):
    """Runs a graph and keeps the values of the nodes named."""

    def __init__(self, gm: fx.GraphModule, names):
        super().__init__(gm)
        self.names, self.values = set(names), {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names and n.op != "output":
            self.values[n.name] = out
        return out


def values_at(gm: fx.GraphModule, names, *inputs, **kwargs) -> dict[str, object]:
    """Run ``gm`` once on ``inputs`` / ``kwargs`` and return ``{name: value}`` of the nodes named,
    in graph order. The output node's value is what ``gm`` returns (the model's own output
    structure, for an exported module).

    Only the values asked for stay alive, so the activations of a whole network are not held at
    once. Train/eval mode and ``torch.no_grad`` are the caller's to set. A name the graph does not
    have is a KeyError: the caller asked for a node that is not there.
    """
    names = set(names)
    nodes = {n.name: n for n in gm.graph.nodes}
    unknown = sorted(names - nodes.keys())
    if unknown:
        raise KeyError(f"no node named {', '.join(unknown)} in the graph")
    if kwargs:
        # an Interpreter fills the placeholders in order, so keywords become positions, as gm's forward binds them
        bound = inspect.signature(gm.forward).bind(*inputs, **kwargs)
        if bound.kwargs:
            raise TypeError(f"values_at cannot pass keyword-only arguments ({', '.join(bound.kwargs)}) to the graph")
        inputs = bound.args
    run = _KeepValues(gm, names)
    out = run.run(*inputs)
    values = run.values
    output = next((n.name for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    if output in names:
        values[output] = out
    return values
