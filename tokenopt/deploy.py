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
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from tokenopt import files
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


def _dynamic(example: torch.Tensor):
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def export_program(gm: nn.Module, example: torch.Tensor, dynamic_batch: bool = True):
    """``(torch.export.ExportedProgram, dynamic)`` of ``gm`` on ``example``, PyTorch ops only."""
    gm.eval()
    with native.disabled(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamic_batch:
            try:
                return torch.export.export(gm, (example,), dynamic_shapes=_dynamic(example), strict=False), True
            except Exception:   # the graph fixes the batch somewhere (a reshape to a constant): export it as is
                pass
        return torch.export.export(gm, (example,), strict=False), False


def export_onnx(gm: nn.Module, example: torch.Tensor, dynamic_batch: bool = True):
    """``(torch.onnx.ONNXProgram, dynamic)`` of ``gm`` through torch's dynamo exporter."""
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
                    return torch.onnx.export(gm, (example,), dynamo=True, dynamic_shapes=_dynamic(example),
                                             verbose=False), True
            except Exception:
                pass
        with contextlib.redirect_stdout(_io.StringIO()):
            return torch.onnx.export(gm, (example,), dynamo=True, verbose=False), False


def eager_outputs(gm: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The flat tensors ``gm(x)`` returns (a ModelOutput, tuple or tensor), as the exporters order them."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [t for t in tree_leaves(gm(x)) if isinstance(t, torch.Tensor)]


def max_diff(a: list[torch.Tensor], b: list) -> float:
    if len(a) != len(b):
        raise ExportError(f"the exported model returns {len(b)} tensors, the eager model {len(a)}")
    return max((torch.as_tensor(y).float() - x.float()).abs().max().item() for x, y in zip(a, b))


def run_onnx(path: str | os.PathLike, x: torch.Tensor) -> list | None:
    """Outputs of the ONNX file on ``x`` through onnxruntime; None when it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: x.numpy()})]


def check_batch(example: torch.Tensor, dynamic: bool) -> torch.Tensor:
    """The check batch: another size than the example when the batch axis is dynamic."""
    n = example.shape[0] + 1 if dynamic else example.shape[0]
    return torch.randn(n, *example.shape[1:], generator=torch.Generator().manual_seed(1)).to(example.dtype)


def export(gm: nn.Module, out: str | os.PathLike, fmt: str = "pt2", example: torch.Tensor | None = None,
           dynamic_batch: bool = True, source: str = "the model") -> ExportResult:
    """Write ``gm`` to ``out`` as ``fmt`` (pt2 | onnx), checked against eager; nothing written on error."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose {' or '.join(FORMATS)}")
    check_exportable(gm, source)
    files.check_output_path(out)
    if example is None:
        shape = tuple(getattr(getattr(record_of(gm), "analysis", None), "input_shape", ()) or ())
        if not shape:
            raise ExportError(f"{source} does not record its input shape; pass example=...")
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    p = next(iter(gm.parameters()), None)
    if p is not None and p.is_floating_point():
        example = example.to(p.dtype)
    try:
        if fmt == "pt2":
            ep, dynamic = export_program(gm, example, dynamic_batch)
            x = check_batch(example, dynamic)
            diff = max_diff(eager_outputs(gm, x), [t for t in tree_leaves(ep.module()(x))])
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
    note = "" if dynamic else f"the batch size is fixed at {example.shape[0]} (the graph does not allow another)"
    if fmt == "onnx" and diff is None:
        note = (note + "; " if note else "") + "not checked: onnxruntime is not installed"
    return ExportResult(Path(out), fmt, dynamic, int(x.shape[0]), diff, note)


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
