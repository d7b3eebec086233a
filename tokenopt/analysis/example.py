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

import math

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from tokenopt.errors import AnalysisError


def example_input_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """An input batch of the size the model expects.

    From ``patch_embed.img_size`` when the model has one; otherwise timm's pretrained_cfg, the
    sizes a plain ViT implies (its first conv's stride times the side of a square
    position-embedding grid) and common sizes, each tried with one forward pass until one runs.
    """
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else "cpu"
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = conv.in_channels if conv is not None else 3
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
    gen = torch.Generator().manual_seed(0)
    if len(candidates) > 1:
        for size in dict.fromkeys(candidates):
            try:
                with torch.no_grad():
                    model(torch.randn(1, *size, generator=gen).to(device, dtype))
            except Exception:
                continue
            return torch.randn(batch, *size, generator=gen).to(device, dtype)
    return torch.randn(batch, *candidates[0], generator=gen).to(device, dtype)


class ShapeRecorder(fx.Interpreter):
    """Records each tensor node's shape and dtype in ``node.meta["tensor_meta"]`` (like ShapeProp,
    which also prints a traceback on failure; here the caller turns failures into one message)."""

    def run_node(self, n):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        return result


def record_shapes(gm: fx.GraphModule, example_input: torch.Tensor, model_name: str = "the model") -> None:
    """Run ``gm`` on ``example_input`` (fake tensors first) and record every node's shape.

    Raises AnalysisError, naming the input shape and how to pass another, when the graph cannot run.
    """
    with torch.no_grad():
        if _record_fake(gm, example_input):
            return
        try:
            ShapeRecorder(gm).run(example_input)
        except Exception as e:
            cause = e.__cause__ or e
            raise AnalysisError(
                f"running {model_name} on an example batch of shape {tuple(example_input.shape)} failed: "
                f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}\n"
                "  Pass an input of the size the model expects (API: example_input=...; CLI: --input-size C,H,W).") from None


def _record_fake(gm: fx.GraphModule, example_input: torch.Tensor) -> bool:
    """Shapes from fake tensors; False (and no shapes kept) when the graph needs real values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # parameters and buffers stay real (the mode converts them to fake on first use); what a
    # leaf module stores on itself during the run (a cache, a last attention map) would be fake
    # and is put back as it was
    saved = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers)) for m in gm.modules()]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            ShapeRecorder(gm).run(mode.from_tensor(example_input))
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
