"""The example batch and the shapes it gives every node.

Patterns read shapes (tokens on axis 1, heads on axis 1 of q), so before matching, the traced
graph runs once on an example batch and each tensor node gets ``meta["tensor_meta"]``::

    %linear : [#users=1] = call_module[target=blocks.0.attn.qkv](args = (%norm,))
        meta["tensor_meta"].shape == (2, 197, 2304)

The run uses fake tensors (shapes and dtypes, no arithmetic: a ViT-B batch costs a fraction of a
second instead of seconds). Graphs fake tensors cannot run (an op without a shape rule, a shape
that depends on values) run for real instead, so the result and the error messages are the same.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from tokenopt.errors import AnalysisError


@dataclass(frozen=True)
class Example:
    """The example inputs a model is captured, checked and measured with: ``model(*args, **kwargs)``.

    An image classifier takes one batch, ``Example((x,))``; a denoiser takes several,
    ``Example((sample, t), {"encoder_hidden_states": text})``. ``batch_dims`` gives, for every tensor
    among the inputs (in pytree order of ``(args, kwargs)``), its batch axis, or None for an input
    without one (a scalar timestep); by default axis 0 of every tensor whose first size is the
    first tensor's. Shapes: the first tensor is the one reports call "the input" (the image).
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    batch_dims: tuple = None    # type: ignore[assignment]   (filled in by __post_init__)

    def __post_init__(self):
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        tensors = self.tensors()
        if not tensors:
            raise AnalysisError("the example inputs hold no tensor: pass at least the image batch")
        if self.batch_dims is None:
            b = tensors[0].shape[0] if tensors[0].dim() else None
            dims = tuple(0 if t.dim() and t.shape[0] == b else None for t in tensors)
            object.__setattr__(self, "batch_dims", dims)
        elif len(self.batch_dims) != len(tensors):
            raise AnalysisError(f"batch_dims has {len(self.batch_dims)} entries but the example inputs hold "
                                f"{len(tensors)} tensors; give one per tensor (None for no batch axis)")

    @classmethod
    def of(cls, value: Any) -> "Example":
        """An Example from what callers pass: an Example, one tensor, or a tuple of positional inputs."""
        if isinstance(value, Example):
            return value
        if isinstance(value, torch.Tensor):
            return cls((value,))
        if isinstance(value, (tuple, list)):
            return cls(tuple(value))
        raise AnalysisError(f"example inputs must be a tensor, a tuple of inputs or tokenopt.Example, got "
                            f"{type(value).__name__}")

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(t, torch.Tensor)]

    @property
    def image(self) -> torch.Tensor:
        """The first tensor input (an image model's batch)."""
        return self.tensors()[0]

    @property
    def batch(self) -> int:
        return next((t.shape[d] for t, d in zip(self.tensors(), self.batch_dims) if d is not None), 1)

    def first(self, n: int) -> "Example":
        """The same inputs with only the first ``n`` of the batch (inputs without a batch axis as they are)."""
        dims = iter(self.batch_dims)

        def cut(leaf):
            if not isinstance(leaf, torch.Tensor):
                return leaf
            d = next(dims)
            return leaf if d is None else leaf.narrow(d, 0, min(n, leaf.shape[d]))

        args, kwargs = pytree.tree_map(cut, (self.args, self.kwargs))
        return Example(args, kwargs, self.batch_dims)

    def call(self, module: nn.Module):
        return module(*self.args, **self.kwargs)

    def names(self, model: nn.Module) -> list[str]:
        """The forward parameters of ``model`` these inputs bind to, in order."""
        try:
            return list(inspect.signature(model.forward).bind_partial(*self.args, **self.kwargs).arguments)
        except TypeError as e:
            raise AnalysisError(f"the example inputs do not fit {type(model).__name__}.forward: {e}") from None

    def positional(self, gm: fx.GraphModule) -> list:
        """The inputs in the order of ``gm``'s placeholders: flattened by the graph's input spec for a
        torch.export graph; by parameter name (defaults filled in) for an fx graph."""
        spec = getattr(gm, "_in_spec", None)
        if spec is not None:
            from torch.fx._pytree import tree_flatten_spec
            return list(tree_flatten_spec((self.args, self.kwargs), spec))
        values = []
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for i, p in enumerate(placeholders):
            if i < len(self.args):
                values.append(self.args[i])
            elif p.target in self.kwargs:
                values.append(self.kwargs[p.target])
            elif p.args:
                values.append(p.args[0])      # the parameter's default, as fx recorded it
            else:
                raise AnalysisError(f"the example inputs give no value for the model's input {p.target!r}")
        return values

    def dynamic_shapes(self, model: nn.Module, batch, image_axes: dict | None = None) -> dict | tuple:
        """torch.export's ``dynamic_shapes`` for these inputs: ``batch`` (a Dim) on every batch axis,
        keyed by the forward parameter each input binds to; ``image_axes`` (axis -> Dim) adds dynamic
        axes to the first tensor (the image's height and width)."""
        dims = iter(enumerate(self.batch_dims))

        def spec(leaf):
            if not isinstance(leaf, torch.Tensor):
                return None
            i, d = next(dims)
            axes = {} if d is None else {d: batch}
            if i == 0 and image_axes:
                axes.update(image_axes)
            return axes or None

        args_spec, kwargs_spec = pytree.tree_map(spec, (self.args, self.kwargs))
        if not self.kwargs:
            return tuple(args_spec)
        bound = inspect.signature(model.forward).bind(*args_spec, **kwargs_spec)
        return dict(bound.arguments)

    def shapes(self) -> list[list[int]]:
        return [list(t.shape) for t in self.tensors()]

    def to_manifest(self) -> dict:
        """Plain data an artifact keeps to rebuild these inputs (random values of the same shapes)."""
        names = [str(i) for i in range(len(self.args))] + list(self.kwargs)

        def describe(v):
            if isinstance(v, torch.Tensor):
                return {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            return {"value": v}

        return {"args": [describe(a) for a in self.args], "kwargs": {k: describe(v) for k, v in self.kwargs.items()},
                "batch_dims": list(self.batch_dims), "names": names}

    @classmethod
    def from_manifest(cls, d: dict, seed: int = 0) -> "Example":
        gen = torch.Generator().manual_seed(seed)

        def make(item):
            if "shape" not in item:
                return item.get("value")
            dtype = getattr(torch, item.get("dtype", "float32"), torch.float32)
            shape = tuple(item["shape"])
            if dtype.is_floating_point:
                return torch.randn(shape, generator=gen).to(dtype)
            return torch.randint(0, 2, shape, generator=gen).to(dtype)

        return cls(tuple(make(a) for a in d.get("args", ())), {k: make(v) for k, v in d.get("kwargs", {}).items()},
                   tuple(d["batch_dims"]) if d.get("batch_dims") is not None else None)


def example_input_for(model: nn.Module, batch: int = 2, size: tuple[int, int] | None = None) -> torch.Tensor | Example:
    """An input batch of the size the model expects; the same rule for the API, the CLI and artifacts.

    A model of several inputs that its loader gave a ``tokenopt_example`` (a callable
    ``(batch, size) -> (args, kwargs, batch_dims)``, e.g. a diffusers denoiser's
    `DenoiserInputs`) gets the [`Example`][tokenopt.analysis.example.Example] it makes;
    ``size`` (H, W) overrides its spatial size.

    The model's own word first: the preprocessing its loader attached (a Hugging Face folder's image
    processor, open_clip's transform: ``tokenopt_data_config["input_size"]``), then a Hugging Face
    config's ``image_size`` and ``num_channels``, then ``patch_embed.img_size``; otherwise timm's
    pretrained_cfg, the sizes a plain ViT implies (its first conv's stride times the side of a
    square position-embedding grid) and common sizes, each tried with one forward pass until one runs.
    """
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else "cpu"
    make = getattr(model, "tokenopt_example", None)
    if callable(make):
        args, kwargs, dims = make(batch, size)
        args, kwargs = pytree.tree_map(lambda t: _like(t, device, dtype), (args, kwargs))
        return Example(args, kwargs, dims)
    gen = torch.Generator().manual_seed(0)
    own = (getattr(model, "tokenopt_data_config", None) or {}).get("input_size")
    if own:
        return torch.randn(batch, *own, generator=gen).to(device, dtype)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    config = getattr(model, "config", None)
    hf_size = getattr(config, "image_size", None) if type(model).__module__.startswith("transformers") else None
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = conv.in_channels if conv is not None else 3
    if hf_size is not None:
        chans = int(getattr(config, "num_channels", chans) or chans)
        img = hf_size
    candidates = []
    if img is not None:
        img = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
        candidates.append((chans, *img))
    else:
        # timm leaves pretrained_cfg at the default size when a model is built with another
        # img_size (LeViT, Hiera, GC ViT ...): the config is the first guess, not the answer
        if "input_size" in cfg:
            candidates.append(tuple(cfg["input_size"]))
        stride = conv.stride[0] if conv is not None else 16
        for name, t in model.named_parameters():
            if t.dim() == 3 and t.shape[0] == 1 and "pos" in name.lower():
                for prefix in range(0, 9):
                    side = math.isqrt(max(t.shape[1] - prefix, 0))
                    if side and side * side == t.shape[1] - prefix:
                        candidates.append((chans, side * stride, side * stride))
        candidates += [(chans, s, s) for s in (224, 32, 64, 96, 128, 256, 384)]
    if len(candidates) > 1:
        for size in dict.fromkeys(candidates):
            try:
                with torch.no_grad():
                    model(torch.randn(1, *size, generator=gen).to(device, dtype))
            except Exception:
                continue
            return torch.randn(batch, *size, generator=gen).to(device, dtype)
    return torch.randn(batch, *candidates[0], generator=gen).to(device, dtype)


def _like(value, device, dtype):
    """A made input on the model's device; floating tensors in its dtype (integer ones, timesteps and labels, kept)."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


class ShapeRecorder(fx.Interpreter):
    """Records each tensor node's shape and dtype in ``node.meta["tensor_meta"]`` (like ShapeProp,
    which also prints a traceback on failure; here the caller turns failures into one message)."""

    def run_node(self, n):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        return result


def record_shapes(gm: fx.GraphModule, example_input, model_name: str = "the model") -> None:
    """Run ``gm`` on ``example_input`` (an [`Example`][tokenopt.analysis.example.Example] or one tensor; fake tensors first) and
    record every node's shape.

    Raises AnalysisError, naming the input shape and how to pass another, when the graph cannot run.
    """
    example = Example.of(example_input)
    inputs = example.positional(gm)
    with torch.no_grad():
        if _record_fake(gm, inputs):
            return
        try:
            ShapeRecorder(gm).run(*inputs, enable_io_processing=False)
        except Exception as e:
            cause = e.__cause__ or e
            raise AnalysisError(
                f"running {model_name} on an example batch of shape {tuple(example.image.shape)} failed: "
                f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}\n"
                "  Pass an input of the size the model expects (API: example_input=...; CLI: --input-size C,H,W).") from None


def _record_fake(gm: fx.GraphModule, inputs: list) -> bool:
    """Shapes from fake tensors; False (and no shapes kept) when the graph needs real values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # parameters and buffers stay real (the mode converts them to fake on first use); what a
    # leaf module stores on itself during the run (a cache, a last attention map) would be fake
    # and is put back as it was
    saved = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers)) for m in gm.modules()]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in inputs]
            ShapeRecorder(gm).run(*fake, enable_io_processing=False)
        return True
    except Exception:
        for n in gm.graph.nodes:
            n.meta.pop("tensor_meta", None)
        return False
    finally:
        for m, attrs, params, buffers in saved:
            _restore(vars(m), attrs)
            _restore(m._parameters, params)
            _restore(m._buffers, buffers)


def _restore(now: dict, before: dict) -> None:
    for key in [k for k in now if k not in before]:
        del now[key]
    for key, value in before.items():
        if now.get(key, now) is not value:
            now[key] = value
