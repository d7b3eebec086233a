"""The optimized module is called as the original was: the same keyword arguments, the same sizes,
or one clear message naming the argument, the limit and what to do.

A captured graph takes only the inputs the example gave (``pixel_values``); a Hugging Face model
also takes flags (``return_dict``, ``output_hidden_states``, ``labels``, ...) and an exported graph
guards on the sizes it was captured with. :func:`install` puts a forward pre-hook on the module:

    return_dict=False            the model's output object becomes its tuple, as the original does
    a flag at its default        (None, False, or the signature's default) dropped: it asks nothing
    output_hidden_states=True,   refused, naming the argument: the graph returns what the original
    labels=..., other values     returned for the example's call, and its reduced layers have
                                 fewer tokens than the original's hidden states
    another input size           taken on the axes the capture made dynamic (the image's height and
                                 width, where the original runs at another size and the capture
                                 follows it) as long as the plan can serve it: every layer's step
                                 either follows the tokens it gets with at least its ``min_tokens``,
                                 or is tied to the planned count (``fixed_grid``: then refused,
                                 naming the layer and the size the graph was built for); any other
                                 size refused, naming the size the graph was built for
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenopt.analysis.capture import one_patch_bigger, spatial_axes
from tokenopt.errors import TokenoptError
from tokenopt.tokens import TokenCount


class CallError(TokenoptError, TypeError):
    """The optimized module was called with an argument or a size it cannot honour."""


@dataclass
class _Layer:
    """What another input size asks of one planned layer."""
    path: str
    describe: str
    block_tokens: int                   # the block's tokens in the original at the planned size
    reduced_before: int                 # tokens earlier layers took away (planned, per image at most)
    min_tokens: int                     # the step's LayerStep.min_tokens
    fixed_grid: str                     # the step's LayerStep.fixed_grid


@dataclass
class _Convention:
    name: str                           # the original's class, for messages
    takes: frozenset                    # the graph's own inputs (parameter names)
    signature: inspect.Signature | None
    sizes: dict | None                  # input name -> (batch axis, shape) where sizes are checked
    dynamic: dict                       # input name -> {axis: (multiple, smallest, largest)} that may change
                                        # (largest None: any size, the multiple only counts the patches)
    layers: list                        # [_Layer] of the plan's steps
    prefix: int = 0
    capture: str = "export"
    flags: dict = field(default_factory=dict)       # the example's keyword inputs that are not tensors
    positions: dict = field(default_factory=dict)   # input name -> its position among the example's inputs
    as_tuple: bool = False              # set by the pre-hook for the forward hook of the same call


def install(gm: nn.Module, model: nn.Module, example, analysis, plan=None) -> dict:
    """Make ``gm`` accept what ``model`` accepts (see the module docstring). Returns the input axes
    that may change size: input (pytree position) -> {axis: (multiple, smallest, largest)}, largest
    None for an fx graph, which takes any size its model takes (the multiple is the patch)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None
    names = example.names(model)
    capture = analysis.capture
    dynamic = dict(analysis.graph.meta.get("tokenopt_dynamic_axes") or {}) if capture == "export" else {}
    layers = _layers(analysis, plan)
    checked = capture == "export"
    if capture == "fx":
        # an fx graph follows the sizes it is given where the model's code does; where the original
        # runs at another size, the optimized one is asked to as well, or other sizes are refused
        spatial = spatial_axes(model, example)
        if spatial is not None:
            checked = True
            if _runs_bigger(gm, example, spatial):     # the traced code takes any size the model's does
                dynamic = {0: {a: (spatial[0], 1, None) for a in spatial[1]}}
    sizes = None
    if checked and signature is not None:
        batch_dim = {id(t): d for t, d in zip(example.tensors(), example.batch_dims)}
        bound = signature.bind_partial(*example.args, **example.kwargs).arguments
        sizes = {name: (batch_dim[id(v)], tuple(v.shape)) for name, v in bound.items() if isinstance(v, torch.Tensor)}
    position = {id(t): i for i, t in enumerate(example.tensors())}
    by_name = {}
    if sizes is not None:
        bound = signature.bind_partial(*example.args, **example.kwargs).arguments
        by_name = {name: dynamic[position[id(v)]] for name, v in bound.items()
                   if isinstance(v, torch.Tensor) and position[id(v)] in dynamic}
    conv = _Convention(type(model).__name__, frozenset(names), signature, sizes, by_name, layers,
                       analysis.prefix_tokens, capture,
                       {k: v for k, v in example.kwargs.items() if not isinstance(v, torch.Tensor)},
                       {k: i for i, k in enumerate(names)})
    gm.register_forward_pre_hook(lambda m, args, kwargs: _before(conv, args, kwargs), with_kwargs=True)
    gm.register_forward_hook(lambda m, args, kwargs, out: _after(conv, out), with_kwargs=True)
    return dynamic if by_name else {}


def _layers(analysis, plan) -> list:
    if plan is None:
        return []
    tokens = {b.index: b.tokens for b in analysis.blocks}
    out = []
    for lp in plan.layers:
        step = lp.step
        if step is None:
            continue
        block = int(tokens.get(lp.block, TokenCount.of(lp.tokens_in).max))
        out.append(_Layer(lp.path, step.describe, block, block - TokenCount.of(lp.tokens_in).max,
                          step.min_tokens, step.fixed_grid))
    return out


def _runs_bigger(gm: nn.Module, example, spatial) -> bool:
    """Whether the rewritten graph runs on an image one patch taller and wider than the example's."""
    was_training = gm.training
    try:
        gm.eval()
        with torch.no_grad():
            one_patch_bigger(example, spatial).call(gm)
        return True
    except Exception:
        return False
    finally:
        gm.train(was_training)


def _asks_nothing(value, default) -> bool:
    if value is None or value is False:
        return True
    try:
        return default is not inspect.Parameter.empty and bool(value == default)
    except Exception:
        return False


def _before(conv: _Convention, args: tuple, kwargs: dict):
    conv.as_tuple = False
    if conv.sizes is not None:
        _check_sizes(conv, args, kwargs)
    extra = [k for k in kwargs if k not in conv.takes]
    # a flag the example set (interpolate_pos_encoding=True) is an input of the captured graph:
    # a call that leaves it out gets the example's value, not a TypeError about a missing argument
    missing = {k: v for k, v in conv.flags.items() if k not in kwargs and conv.positions[k] >= len(args)}
    if not extra and not missing:
        return None
    params = conv.signature.parameters if conv.signature is not None else {}
    for k in extra:
        p = params.get(k)
        if p is None and not any(q.kind is q.VAR_KEYWORD for q in params.values()):
            raise CallError(f"{conv.name}.forward() got an unexpected keyword argument {k!r}")
        v = kwargs[k]
        if k == "return_dict":          # the graph returns the output object; a tuple is made from it
            conv.as_tuple = v is False
            continue
        if _asks_nothing(v, p.default if p is not None else inspect.Parameter.empty):
            continue
        raise CallError(_refusal(conv, k, v, in_signature=p is not None))
    return args, {**missing, **{k: v for k, v in kwargs.items() if k in conv.takes}}


def _after(conv: _Convention, out):
    if conv.as_tuple and hasattr(out, "to_tuple"):
        conv.as_tuple = False
        return out.to_tuple()
    return None


def _refusal(conv: _Convention, k: str, v, in_signature: bool = True) -> str:
    if k == "labels":
        return (f"labels= is not taken by the optimized {conv.name}: the loss is not part of its graph. Compute "
                "it from the output, e.g. F.cross_entropy(model(pixel_values).logits, labels).")
    if k.startswith("output_"):
        return (f"{k}={v!r} is not available on the optimized {conv.name}: its graph returns what the original "
                f"returned for the example call, and layers after a reduction hold fewer tokens than the "
                f"original's. Optimize with outputs='tokens' for every patch token, or call the original model for "
                f"{k.removeprefix('output_')}.")
    how = f"with {k} at its default, which the graph keeps" if in_signature else f"without {k}"
    return (f"{k}={v!r} is not available on the optimized {conv.name}: it was captured {how}. Optimize again "
            f"with that argument in the example inputs (tokenopt.Example(args, {{{k!r}: ...}})).")


def _check_sizes(conv: _Convention, args: tuple, kwargs: dict) -> None:
    names = list(conv.sizes)
    given = dict(zip(names, args))
    given.update({k: v for k, v in kwargs.items() if k in conv.sizes})
    for name, value in given.items():
        if not isinstance(value, torch.Tensor) or name not in conv.sizes:
            continue
        d, want = conv.sizes[name]
        got = tuple(value.shape)
        if len(got) == len(want) and all(i == d or g == w for i, (g, w) in enumerate(zip(got, want))):
            continue
        free = conv.dynamic.get(name, {})
        built = _size_text(want, d)
        if len(got) != len(want) or any(i != d and i not in free and g != w
                                        for i, (g, w) in enumerate(zip(got, want))):
            raise CallError(_fixed_size(conv, name, built, _size_text(got, d) if len(got) == len(want) else
                                        "x".join(map(str, got)), free))
        for i, (multiple, lo, hi) in free.items():
            if hi is not None and (got[i] % multiple or not lo <= got[i] <= hi):
                raise CallError(
                    f"the optimized {conv.name} takes {name} of {_axes_text(free)} that are multiples of {multiple} "
                    f"from {lo} to {hi} (it was built for {built}), got {_size_text(got, d)}: its graph was captured "
                    f"by torch.export for that range. Resize the input, or optimize again with an example of that "
                    f"size (API: example_input=...; CLI: --input-size).")
        _check_plan(conv, name, built, got, want, free)


def _axes_text(free: dict) -> str:
    """How messages name the axes that may change: an image's height and width, else their numbers."""
    return "height and width" if sorted(free) == [2, 3] else "axes " + ", ".join(map(str, free))


def _size_text(shape: tuple, batch_dim) -> str:
    return "x".join(str(s) for i, s in enumerate(shape) if i != batch_dim)


def _fixed_size(conv: _Convention, name: str, built: str, got: str, free: dict) -> str:
    if free:
        return (f"the optimized {conv.name} was built for {name} of size {built} (besides the batch), got {got}: "
                f"only its {_axes_text(free)} may change. Optimize again with an example of the new size (API: example_input=...; "
                f"CLI: --input-size).")
    why = ("a graph captured by torch.export keeps the sizes it was captured with" if conv.capture == "export" else
           "the original runs at other sizes, but its graph traced by torch.fx does not after the rewrite")
    return (f"the optimized {conv.name} was built for {name} of size {built} (besides the batch), got {got}: "
            f"{why}, and its recipe planned the tokens of each layer for that grid. Optimize again with an "
            f"example of the new size (API: example_input=...; CLI: --input-size).")


def _check_plan(conv: _Convention, name: str, built: str, got: tuple, want: tuple, free: dict) -> None:
    """Refuse a size the recipe cannot serve: a step tied to the planned token count, or one that
    needs more tokens than the new size gives."""
    size = "x".join(str(got[i]) for i in free)
    for layer in conv.layers:
        if layer.fixed_grid:
            raise CallError(
                f"the optimized {conv.name} was built for {name} of size {built}; at {size} its recipe cannot run: "
                f"{layer.path} ({layer.describe}) {layer.fixed_grid}, so it needs that grid. Resize the input to "
                f"{built}, or optimize again with an example of the new size (API: example_input=...; "
                f"CLI: --input-size).")
    ratio = 1.0
    for i, (multiple, _, _) in free.items():
        ratio *= (got[i] // multiple) / (want[i] // multiple)
    for layer in conv.layers:
        tokens = conv.prefix + int((layer.block_tokens - conv.prefix) * ratio) - layer.reduced_before
        if tokens < layer.min_tokens:
            raise CallError(
                f"the optimized {conv.name} was built for {name} of size {built}; at {size} {layer.path} would get "
                f"{tokens} tokens, but its step ({layer.describe}) needs at least {layer.min_tokens}. Use a larger "
                f"input, or optimize again with an example of that size (API: example_input=...; CLI: --input-size).")
