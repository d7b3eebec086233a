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
    another input size           refused (export captures), naming the size the graph was built for
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from tokenopt.errors import TokenoptError


class CallError(TokenoptError, TypeError):
    """The optimized module was called with an argument or a size it cannot honour."""


@dataclass
class _Convention:
    name: str                           # the original's class, for messages
    takes: frozenset                    # the graph's own inputs (parameter names)
    signature: inspect.Signature | None
    sizes: dict | None                  # input name -> its shape without the batch axis (export captures)
    as_tuple: bool = False              # set by the pre-hook for the forward hook of the same call


def install(gm: nn.Module, model: nn.Module, example, capture: str) -> None:
    """Make ``gm`` accept what ``model`` accepts (see the module docstring)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None
    names = example.names(model)
    sizes = None
    if capture == "export" and signature is not None:
        batch_dim = {id(t): d for t, d in zip(example.tensors(), example.batch_dims)}
        bound = signature.bind_partial(*example.args, **example.kwargs).arguments
        sizes = {name: (batch_dim[id(v)], tuple(s for i, s in enumerate(v.shape) if i != batch_dim[id(v)]))
                 for name, v in bound.items() if isinstance(v, torch.Tensor)}
    conv = _Convention(type(model).__name__, frozenset(names), signature, sizes)
    gm.register_forward_pre_hook(lambda m, args, kwargs: _before(conv, args, kwargs), with_kwargs=True)
    gm.register_forward_hook(lambda m, args, kwargs, out: _after(conv, out), with_kwargs=True)


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
    if not extra:
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
    return args, {k: v for k, v in kwargs.items() if k in conv.takes}


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
        got = tuple(s for i, s in enumerate(value.shape) if i != d)
        if got != want:
            built = "x".join(map(str, want))
            raise CallError(
                f"the optimized {conv.name} was built for {name} of size {built} (besides the batch), got "
                f"{'x'.join(map(str, got))}: a graph captured by torch.export keeps the sizes it was captured with, "
                f"and its recipe planned the tokens of each layer for that grid. Optimize again with an example "
                f"of the new size (API: example_input=...; CLI: --input-size).")
