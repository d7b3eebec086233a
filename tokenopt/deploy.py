"""Export out: an optimized model as a ``torch.export`` program (``.pt2``) or an ONNX file.

    tokenopt export model.tokenopt.pt -o model.pt2                 # torch.export.save
    tokenopt export model.tokenopt.pt -o model.onnx --format onnx  # torch.onnx.export(..., dynamo=True)

Exported graphs have static shapes, so only models whose token counts are fixed by the recipe
export: ToMe, ToFu, ToSA (every image keeps the same number of tokens) and SPA's padded mode
(a static capacity). A model whose tokens vary per image (a gate's ``TokenCount(max, expected)``,
a packed layout of data-dependent length) is refused with the layer that varies, before any work.

The batch axis is dynamic (``torch.export.Dim``) when the graph allows it, else fixed at the
example's size (said in the result). The ToMe/ToFu steps export through their PyTorch operators:
the native C step (ops/native) is an opaque call no exporter can see into, so it is switched off
while exporting. Every export is checked: the exported program (and the ONNX model, when
onnxruntime is installed) runs on a batch of another size than the example and must equal eager.

A model of several inputs (a diffusers denoiser: ``sample, timestep, encoder_hidden_states``) is
exported with the example call its analysis recorded (:class:`tokenopt.analysis.Example`): the
program takes the same arguments, by name, as the original, and every batch axis is one ``Dim``
(capped where the model caps its batch). The ONNX file's inputs are those tensors in that order.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from tokenopt import files
from tokenopt.analysis.example import Example
from tokenopt.errors import TokenoptError
from tokenopt.ops import native
from tokenopt.ops.gates import sorting_for_onnx
from tokenopt.record import record_of

FORMATS = ("pt2", "onnx")
TOLERANCE = 1e-4   # max abs difference accepted between exported and eager (tests hold 1e-5)


class ExportError(TokenoptError):
    """The model cannot be exported (token counts vary per image, a missing exporter, a failed check)."""


@dataclass
class ExportResult:
    path: Path
    format: str
    dynamic_batch: bool
    checked_batch: int            # batch size of the check run
    max_abs_diff: float | None    # exported vs eager on that batch; None when not checked (no onnxruntime)
    note: str = ""


def export_problem(gm: nn.Module) -> str | None:
    """None when ``gm`` (returned by :func:`tokenopt.optimize` or :func:`tokenopt.load`) has static
    shapes, else why not, naming the layer."""
    plan = getattr(record_of(gm), "plan", None)
    if plan is None:
        return None
    for lp in plan.layers:
        step = lp.step
        if step is not None and step.dynamic:
            return f"{lp.path} (layer {lp.block}) {step.dynamic}"
        if lp.tokens_out.varies and not (step is not None and step.padded):
            by = f", {lp.acted}" if lp.rule is not None else ""
            return (f"{lp.path} (layer {lp.block}) keeps a different number of tokens per image "
                    f"({lp.tokens_out}{by})")
    return None


def check_exportable(gm: nn.Module, source: str = "the model") -> None:
    why = export_problem(gm)
    if why is not None:
        raise ExportError(f"cannot export {source}: {why}.\n  torch.export and ONNX need static shapes: export a "
                          "recipe whose token counts the recipe fixes (ToMe, ToFu, ToSA), or SPA in its padded "
                          "mode (a fixed capacity); keep this model in PyTorch.")


# diffusers' Upsample2D takes another path from a batch of 64 on; a multi-input model's batch stays below it
MULTI_INPUT_MAX_BATCH = 63


def _dynamic(gm: nn.Module, ex: Example):
    """The dynamic shapes of ``ex``'s call: one batch Dim on every tensor's batch axis."""
    if not ex.kwargs and len(ex.args) == 1:
        return ({0: torch.export.Dim("batch", min=1, max=4096)},)
    import inspect

    batch = torch.export.Dim("batch", min=1, max=MULTI_INPUT_MAX_BATCH)
    dims = iter(ex.batch_dims)
    bound = inspect.signature(gm.forward).bind_partial(*ex.args, **ex.kwargs).arguments
    return {name: tree_map(lambda leaf: ({} if (d := next(dims)) is None else {d: batch})
                           if isinstance(leaf, torch.Tensor) else None, value)
            for name, value in bound.items()}


def export_program(gm: nn.Module, example, dynamic_batch: bool = True):
    """``(torch.export.ExportedProgram, dynamic)`` of ``gm`` on ``example`` (a tensor or an
    Example), PyTorch ops only."""
    ex = Example.of(example)
    gm.eval()
    with native.disabled(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamic_batch:
            try:
                return torch.export.export(gm, ex.args, ex.kwargs, dynamic_shapes=_dynamic(gm, ex), strict=False), True
            except Exception:   # the graph fixes the batch somewhere (a reshape to a constant): export it as is
                pass
        return torch.export.export(gm, ex.args, ex.kwargs, strict=False), False


def export_onnx(gm: nn.Module, example, dynamic_batch: bool = True):
    """``(torch.onnx.ONNXProgram, dynamic)`` of ``gm`` through torch's dynamo exporter."""
    ex = Example.of(example)
    for module, extra in (("onnx", "export"), ("onnxscript", "export")):
        try:
            __import__(module)
        except ImportError:
            raise ExportError(f"ONNX export needs the Python package {module!r}, which is not installed.\n"
                              f"  Install it with: pip install 'tokenopt[{extra}]'") from None
    gm.eval()
    with native.disabled(), sorting_for_onnx(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import contextlib
        import io as _io

        quiet = contextlib.redirect_stdout(_io.StringIO())   # the exporter prints its progress
        if dynamic_batch:
            try:
                with quiet:
                    return torch.onnx.export(gm, ex.args, kwargs=ex.kwargs, dynamo=True,
                                             dynamic_shapes=_dynamic(gm, ex), verbose=False), True
            except Exception:
                pass
        with contextlib.redirect_stdout(_io.StringIO()):
            return torch.onnx.export(gm, ex.args, kwargs=ex.kwargs, dynamo=True, verbose=False), False


def eager_outputs(gm: nn.Module, x) -> list[torch.Tensor]:
    """The flat tensors ``gm(x)`` returns (a ModelOutput, tuple or tensor), as the exporters order them;
    ``x`` a tensor or an Example."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [t for t in tree_leaves(Example.of(x).call(gm)) if isinstance(t, torch.Tensor)]


def max_diff(a: list[torch.Tensor], b: list) -> float:
    if len(a) != len(b):
        raise ExportError(f"the exported model returns {len(b)} tensors, the eager model {len(a)}")
    return max((torch.as_tensor(y).float() - x.float()).abs().max().item() for x, y in zip(a, b))


def run_onnx(path: str | os.PathLike, x) -> list | None:
    """Outputs of the ONNX file on ``x`` (a tensor or an Example: its tensors in order) through
    onnxruntime; None when it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensors = Example.of(x).tensors()
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ExportError(f"the ONNX model takes {len(names)} inputs, the model {len(tensors)}; please report the model")
    return [torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, tensors)})]


def check_batch(example, dynamic: bool):
    """The check batch: another size than the example when the batch axis is dynamic. A tensor
    gives a tensor; an Example of several inputs gives one with new noise in its float inputs and
    its other inputs (timesteps, labels) repeated from the first image."""
    if isinstance(example, torch.Tensor):
        n = example.shape[0] + 1 if dynamic else example.shape[0]
        return torch.randn(n, *example.shape[1:], generator=torch.Generator().manual_seed(1)).to(example.dtype)
    gen = torch.Generator().manual_seed(1)
    dims = iter(example.batch_dims)

    def grow(leaf):
        if not isinstance(leaf, torch.Tensor):
            return leaf
        d = next(dims)
        if d is not None and dynamic:
            leaf = torch.cat([leaf, leaf.narrow(d, 0, 1)], d)
        if leaf.is_floating_point():
            return torch.randn(leaf.shape, generator=gen).to(leaf.dtype)
        return leaf

    args, kwargs = tree_map(grow, (example.args, example.kwargs))
    return Example(args, kwargs, example.batch_dims)


def _batch_of(x) -> int:
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else x.batch


def _recorded_example(gm: nn.Module):
    """The example call the analysis recorded, when the model takes more than one tensor (else None:
    an image model is exported with a fresh random batch of its input shape)."""
    ex = getattr(getattr(record_of(gm), "analysis", None), "example", None)
    if isinstance(ex, Example) and (ex.kwargs or len(ex.args) > 1):
        return ex
    return None


def export(gm: nn.Module, out: str | os.PathLike, fmt: str = "pt2", example: torch.Tensor | Example | None = None,
           dynamic_batch: bool = True, source: str = "the model") -> ExportResult:
    """Write ``gm`` to ``out`` as ``fmt`` (pt2 | onnx), checked against eager; nothing written on error."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose {' or '.join(FORMATS)}")
    check_exportable(gm, source)
    files.check_output_path(out)
    if example is None:
        example = _recorded_example(gm)
    if example is None:
        shape = tuple(getattr(getattr(record_of(gm), "analysis", None), "input_shape", ()) or ())
        if not shape:
            raise ExportError(f"{source} does not record its input shape; pass example=...")
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    p = next(iter(gm.parameters()), None)
    if isinstance(example, torch.Tensor) and p is not None and p.is_floating_point():
        example = example.to(p.dtype)
    try:
        if fmt == "pt2":
            ep, dynamic = export_program(gm, example, dynamic_batch)
            x = check_batch(example, dynamic)
            diff = max_diff(eager_outputs(gm, x), [t for t in tree_leaves(Example.of(x).call(ep.module()))])
            _check(diff, source, fmt)
            with files.atomic_write(out) as f:
                torch.export.save(ep, f)
        else:
            prog, dynamic = export_onnx(gm, example, dynamic_batch)
            x = check_batch(example, dynamic)
            with files.atomic_path(out) as tmp:
                prog.save(str(tmp))
                got = run_onnx(tmp, x)
                diff = None if got is None else max_diff(eager_outputs(gm, x), got)
                if diff is not None:
                    _check(diff, source, fmt)
    except TokenoptError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ExportError(f"exporting {source} as {fmt} failed: {type(e).__name__}: {first[:300]}") from None
    note = "" if dynamic else f"the batch size is fixed at {_batch_of(example)} (the graph does not allow another)"
    if fmt == "onnx" and diff is None:
        note = (note + "; " if note else "") + "not checked: onnxruntime is not installed"
    return ExportResult(Path(out), fmt, dynamic, _batch_of(x), diff, note)


def _check(diff: float, source: str, fmt: str) -> None:
    if not diff <= TOLERANCE:
        raise ExportError(f"the {fmt} export of {source} differs from the eager model by {diff:.3g} "
                          f"(more than {TOLERANCE:g}); nothing was written. Please report the model.")


def export_artifact(path: str | os.PathLike, out: str | os.PathLike, fmt: str = "pt2", arch=None,
                    dynamic_batch: bool = True) -> ExportResult:
    """Rebuild a saved optimized model (``tokenopt.load``) and export it (see :func:`export`)."""
    from tokenopt import artifact

    payload = artifact.read(path)
    files.check_output_path(out)
    gm = artifact.rebuild(payload, arch, source=str(path))
    return export(gm, out, fmt, dynamic_batch=dynamic_batch, source=str(path))
