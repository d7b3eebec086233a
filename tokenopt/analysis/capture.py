"""Capture: turn a model into the fx graph the analysis reads, by one of two front ends.

    fx      torch.fx symbolic tracing (tokenopt.trace): module calls stay in the graph, which reads
            best (``blocks.3.attn.qkv``); fails on Python control flow over values, as in Hugging
            Face transformers 5 (no fx tracer of its own any more).
    export  torch.export.export(model, (x,), strict=False) with the batch axis dynamic (and the
            image's height and width, as multiples of the patch, where the model itself runs on an
            image one patch larger and the capture reproduces it there; else the example's size), to
            an ATen graph (``ep.module()``; the axes made dynamic in ``meta["tokenopt_dynamic_axes"]``); rewritten into fx's op vocabulary (analysis.aten_vocabulary),
            sizes it fixed on the token axis freed (analysis.token_axis), constant all-True masks
            removed (analysis.constant_masks).
    auto    fx, and export when fx cannot trace the model (the default).

Both give an ``fx.GraphModule`` that takes what the model took and returns what it returned: an
exported module keeps the model's output pytree (a Hugging Face ``ModelOutput`` stays one). Its
parameters are the model's own tensors, under the same state-dict keys.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx
import torch.utils._python_dispatch
from torch import nn

from tokenopt.analysis.aten_vocabulary import canonical_ops
from tokenopt.analysis.constant_masks import drop_constant_masks
from tokenopt.analysis.example import Example, record_shapes
from tokenopt.analysis.token_axis import free_token_axis
from tokenopt.errors import AnalysisError
from tokenopt.trace import trace

CAPTURE_MODES = ("auto", "fx", "export")


@dataclass
class Captured:
    graph: fx.GraphModule
    mode: str                      # "fx" | "export": the front end that made the graph
    note: str = ""                 # auto: why fx was not used


def family_of(model: nn.Module) -> str:
    """How messages name a model's family: its library and architecture, e.g. "Hugging Face
    transformers ResNetModel (resnet)", "timm resnet18", "torchvision ResNet"."""
    cls = type(model)
    parts = cls.__module__.split(".")
    if parts[0] == "transformers":
        kind = getattr(getattr(model, "config", None), "model_type", None) or \
            (parts[2] if len(parts) > 2 and parts[1] == "models" else "")
        return f"Hugging Face transformers {cls.__name__}" + (f" ({kind})" if kind else "")
    if parts[0] == "timm":
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        return f"timm {arch or cls.__name__}"
    if parts[0] in ("torchvision", "open_clip"):
        return f"{parts[0]} {cls.__name__}"
    return cls.__name__          # a user's own class: its name is the family


def check_mode(mode: str) -> str:
    if mode not in CAPTURE_MODES:
        raise AnalysisError(f"capture must be one of {', '.join(CAPTURE_MODES)}, got {mode!r}")
    return mode


def capture(model: nn.Module, example_input, mode: str = "auto",
            leaf_modules: Iterable[type | str] = ()) -> Captured:
    """The model's graph, by the front end ``mode`` asks for (see the module docstring).

    ``example_input``: an :class:`Example` (or one tensor). Shapes on it are recorded on the result
    (``node.meta["tensor_meta"]``). Raises AnalysisError naming the model and what to try when no
    front end can capture it.
    """
    check_mode(mode)
    example_input = Example.of(example_input)
    name = type(model).__name__
    if mode in ("auto", "fx"):
        try:
            gm = trace(model, leaf_modules, given=example_input.names(model))
        except AnalysisError as e:
            if mode == "fx":
                raise
            fx_error = str(e).splitlines()[0]
        else:
            record_shapes(gm, example_input, name)
            return Captured(_remember_source(gm, model), "fx")
    else:
        fx_error = ""
    try:
        gm = export_graph(model, example_input)
    except AnalysisError as e:
        if fx_error:
            raise AnalysisError(f"{fx_error}\n  torch.export failed too: {str(e).splitlines()[0]}") from None
        raise
    return Captured(_remember_source(gm, model), "export", note=fx_error)


def _remember_source(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Record what the model was: its state-dict shapes (saving checks that the recorded base rebuilds
    exactly this) and, for timm, its architecture name (the ``arch=`` a message suggests)."""
    gm.meta["tokenopt_source_shapes"] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if type(model).__module__.startswith("timm.") and isinstance(arch, str):
        gm.meta["tokenopt_source_arch"] = f"timm:{arch}"
    return gm


def export_graph(model: nn.Module, example_input) -> fx.GraphModule:
    """``model`` captured by torch.export (non-strict, any batch size), in fx's op vocabulary.

    ``example_input``: an :class:`Example` (several inputs, keyword ones too) or one tensor; every
    input's batch axis is dynamic, and the image's height and width where :func:`spatial_axes` finds
    the model runs at another size and the dynamic capture reproduces it at both sizes (silently
    static otherwise).

    The result is checked once against the model on ``example_input``: the same outputs, bit for
    bit as a rule; where torch.export itself orders floating-point work differently from eager
    (BEiT's bias sums) within float rounding, the largest difference is kept in
    ``gm.meta["tokenopt_capture_max_diff"]``; beyond that, an AnalysisError says so.
    """
    name = type(model).__name__
    example_input = Example.of(example_input)
    spatial = spatial_axes(model, example_input)
    if spatial is not None:
        try:
            return _finish(model, _export(model, example_input, spatial), example_input, spatial)
        except Exception:
            pass    # the model's code fixes its grid somewhere export sees (a guard, a branch): static capture
    try:
        ep = _export(model, example_input, None)
    except Exception as e:   # export raises many types (UserError, GuardOnDataDependent...); one message
        first = (str(e).strip().splitlines() or [""])[0]
        raise AnalysisError(
            f"cannot capture {name} with torch.export: {type(e).__name__}: {first}\n"
            "  Check that the model runs on a batch of the example's shape "
            f"{tuple(example_input.image.shape)} (CLI: --input-size C,H,W).") from None
    return _finish(model, ep, example_input, None)


def _export(model: nn.Module, example_input: Example, spatial: tuple | None):
    """torch.export of ``model``: the batch axes dynamic, and with ``spatial`` (patch, (h, w) axes of
    the image) the image's height and width too, as multiples of the patch."""
    was_training = model.training
    # a model may cap its batch (diffusers' Upsample2D branches on batch >= 64): the loader says so
    batch = torch.export.Dim("batch", min=1, max=getattr(model, "tokenopt_max_batch", None))
    axes = None
    if spatial is not None:
        patch, (h, w) = spatial
        grid = example_input.image.shape[h] // patch, example_input.image.shape[w] // patch
        (lo, hi_h), (_, hi_w) = _grid_range(grid[0]), _grid_range(grid[1])
        axes = {h: patch * torch.export.Dim("grid_h", min=lo, max=hi_h),
                w: patch * torch.export.Dim("grid_w", min=lo, max=hi_w)}
    try:
        # Hugging Face models interpolate their position embeddings "always when tracing, so the
        # exported model works for dynamic input shapes" (at the native grid that interpolation is
        # exact); without it, export would keep the branch of the example's size only
        with torch.no_grad(), _tracing(spatial is not None), _torch_quiet():
            return torch.export.export(model, example_input.args, example_input.kwargs or None, strict=False,
                                       dynamic_shapes=example_input.dynamic_shapes(model, batch, axes))
    finally:
        model.train(was_training)


def _grid_range(grid: int) -> tuple[int, int]:
    """The patches per side a dynamic capture takes: from 2 (1 would be specialised by export) to 8
    times the example's, at least 64."""
    return 2, max(64, 8 * grid)


def dynamic_axes_of(spatial: tuple | None, example: Example) -> dict:
    """What the graph's meta records of a dynamic capture: input (pytree position) -> {axis: (the
    multiple the size must be, smallest, largest)}; empty for a static one."""
    if spatial is None:
        return {}
    patch, axes = spatial
    out = {}
    for a in axes:
        lo, hi = _grid_range(example.image.shape[a] // patch)
        out[a] = (patch, patch * lo, patch * hi)
    return {0: out}


@contextlib.contextmanager
def _torch_quiet():
    """Hold back what torch.export prints while it runs: on a model it cannot capture it dumps the
    partial ATen graph (with its own file paths) once or twice, and logs warnings, ahead of the
    one-line message tokenopt gives; a successful capture prints nothing a user acts on."""
    log = logging.getLogger("torch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _tracing(on: bool):
    if not on:
        yield
        return
    saved = torch.jit.is_tracing
    torch.jit.is_tracing = lambda: True
    try:
        yield
    finally:
        torch.jit.is_tracing = saved


def spatial_axes(model: nn.Module, example: Example) -> tuple | None:
    """(patch, (h, w)) when the model itself runs on an image one patch taller and wider than the
    example's, resampling its position embeddings to it (DINOv2, timm's dynamic_img_size, Hugging
    Face's interpolate_pos_encoding=True): then export tries those axes dynamic too.
    None when it does not, or the first input is not an image batch (N, C, H, W)."""
    x = example.image
    if x.dim() != 4 or example.batch_dims[0] != 0 or not x.is_floating_point():
        return None
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    patch = conv.stride[0] if conv is not None and conv.stride[0] == conv.stride[1] else 16
    if x.shape[2] % patch or x.shape[3] % patch:
        return None
    if not example.args or example.args[0] is not x or len(example.tensors()) > 1:
        return None      # several tensor inputs: which of their axes follow the image is not known
    bigger = one_patch_bigger(example, (patch, (2, 3)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), _Resamples() as seen:
            bigger.call(model)
    except Exception:
        return None
    finally:
        model.train(was_training)
    # only a model that resamples something (its position embeddings) to the new grid: one that takes
    # another size otherwise (Swin pads to its windows, a ConvNeXt has no grid) can take minutes for
    # torch.export to make dynamic, and then guards on the size anyway
    return (patch, (2, 3)) if seen.found else None


class _Resamples(torch.utils._python_dispatch.TorchDispatchMode):
    """Notes whether an upsampling op runs (position embeddings resampled to the image's grid)."""

    found = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "upsample" in func.__name__ or "grid_sampler" in func.__name__:
            self.found = True
        return func(*args, **(kwargs or {}))


def one_patch_bigger(example: Example, spatial: tuple) -> Example:
    """The example's first image, one patch taller and wider (random values), with its other inputs."""
    patch, (h, w) = spatial
    x = example.image[:1]
    shape = list(x.shape)
    shape[h] += patch
    shape[w] += patch
    big = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(x)
    return Example((big, *example.args[1:]), example.first(1).kwargs)


def _finish(model: nn.Module, ep, example_input: Example, spatial: tuple | None) -> fx.GraphModule:
    name = type(model).__name__
    gm = _plain_graph_module(ep.module(), name)
    gm.meta["tokenopt_source_class"] = f"{type(model).__module__}:{type(model).__qualname__}"
    gm.meta["tokenopt_capture"] = "export"
    record_shapes(gm, example_input, name)
    canonical_ops(gm)
    drop_constant_masks(gm, example_input.positional(gm))
    record_shapes(gm, example_input, name)
    free_token_axis(gm)
    record_shapes(gm, example_input, name)
    _check_same(model, gm, example_input, name)
    gm.meta["tokenopt_dynamic_axes"] = dynamic_axes_of(spatial, example_input)
    if spatial is not None:      # the second size must run too, and agree with the model, or no dynamic sizes
        bigger = one_patch_bigger(example_input, spatial)
        worst = gm.meta["tokenopt_capture_max_diff"]
        _check_same(model, gm, bigger, name)
        gm.meta["tokenopt_capture_max_diff"] = max(worst, gm.meta["tokenopt_capture_max_diff"])
    return gm


def _plain_graph_module(ep_module: fx.GraphModule, name: str) -> fx.GraphModule:
    """An ordinary GraphModule over the exported graph: ``ep.module()`` refuses ``.eval()`` and
    ``.train()``, which training and the pipeline call. The graph keeps its pytree code generator
    (inputs flattened, outputs rebuilt into the model's own types)."""
    graph = ep_module.graph
    gm = fx.GraphModule(ep_module, graph, class_name=f"{name}Exported")
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(ep_module, attr):
            setattr(gm, attr, getattr(ep_module, attr))
    gm.recompile()
    return gm


def _check_same(model: nn.Module, gm: fx.GraphModule, x: Example, name: str) -> None:
    if model.training:
        return     # dropout draws differ between two runs; the graph was captured in training mode
    # with grad enabled: under no_grad nn.MultiheadAttention takes a fused inference kernel
    # (open_clip, torchvision) whose last bits differ from the ops export records
    with torch.enable_grad():
        want, got = x.call(model), x.call(gm)
    a = torch.utils._pytree.tree_leaves(want)
    b = torch.utils._pytree.tree_leaves(got)
    same, worst = len(a) == len(b), 0.0
    for u, v in zip(a, b) if same else ():
        if not isinstance(u, torch.Tensor):
            same = same and u == v
        elif not isinstance(v, torch.Tensor) or u.shape != v.shape:
            same = False
        elif not torch.equal(u, v):
            diff = (u.detach().double() - v.detach().double()).abs().max().item()
            worst = max(worst, diff)
            same = same and diff <= 1e-5 * (1 + u.detach().abs().max().item())
    gm.meta["tokenopt_capture_max_diff"] = worst
    if not same:
        if _differs_from_itself(model, x, a):
            raise AnalysisError(
                f"{name} gives different outputs on two calls with the same input, even in eval mode (its forward "
                "draws random numbers, e.g. ViTMAE's random masking of patches), so no captured or rewritten graph "
                "can be checked against it.\n  tokenopt needs a model whose eval-mode forward is deterministic.")
        # the hint goes on a line of its own: capture() keeps only the first line when fx failed already
        raise AnalysisError(f"the graph torch.export captured from {name} does not reproduce the model's outputs "
                            "on the example batch.\n  Try --capture fx (API: capture='fx'), or report the model.")


def _differs_from_itself(model: nn.Module, x: Example, first: list) -> bool:
    """Whether a second call of ``model`` on ``x`` gives other outputs than ``first`` (random in its forward)."""
    with torch.enable_grad():
        again = torch.utils._pytree.tree_leaves(x.call(model))
    return len(again) != len(first) or any(
        isinstance(u, torch.Tensor) and (not isinstance(v, torch.Tensor) or u.shape != v.shape or not torch.equal(u, v))
        for u, v in zip(first, again))
