"""Saved optimized models: weights + recipe + manifest in one file, rebuilt by replaying the recipe.

A pickled GraphModule would tie the file to the exact code that wrote it and need
``weights_only=False`` to read. Instead an artifact is a ``torch.save`` of plain data::

    {"format": "tokenopt-artifact", "format_version": 1,
     "state_dict": {...},                 # the optimized module's: base model keys + parameters passes added
     "recipe": {...},                     # Recipe.to_dict(), options in full
     "manifest": {"tokenopt": "0.1.0", "torch": "...", "timm": "...",
                  "base": {"kind": "timm", "name": "...", "kwargs": {...}},   # how to rebuild the base model
                  "example_input_shape": [2, 3, 224, 224], "outputs": "logits",
                  "leaf_modules": [...], "capture": "fx",             # or "export": the front end replayed
                  "dtype": "float32", "report": {...}}}

[`load`][tokenopt.artifact.load] rebuilds the base model (random weights), replays the recipe with
[`tokenopt.pipeline.optimize`][tokenopt.pipeline.optimize] on an input of the saved shape, and loads the saved weights
with ``strict=True``: the same graph with the same weights, so outputs are bit-identical.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from tokenopt import files, sources
from tokenopt.errors import ModelLoadError, TokenoptError
from tokenopt.version import __version__
from tokenopt.record import record_of, update_record

FORMAT = "tokenopt-artifact"
FORMAT_VERSION = 1


def manifest_for(module: nn.Module, base: dict | None = None) -> dict:
    """The manifest of an optimized module (see the module docstring)."""
    import timm

    if base is None:
        base = getattr(record_of(module), "base", None)
    if base is None:
        # No record of how the model was built: its class, rebuilt on load with no arguments.
        source = getattr(module, "meta", {}).get("tokenopt_source_class")
        base = {"kind": "class", "class": source} if source else sources.module_base(module)
    analysis = getattr(record_of(module), "analysis", None)
    shape = list(getattr(analysis, "input_shape", ()) or ())
    example = getattr(analysis, "example", None)
    if not shape:
        raise TokenoptError("the optimized module does not record its example input shape "
                            "(its tokenopt record has no analysis); save the module that tokenopt.optimize returned.")
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    report = getattr(record_of(module), "report", None)
    leaves = [m if isinstance(m, str) else m.__name__ for m in getattr(record_of(module), "leaf_modules", ()) or ()]
    return {
        "tokenopt": str(__version__),
        "torch": str(torch.__version__),
        "timm": str(timm.__version__),
        "base": _plain(dict(base)),
        "example_input_shape": shape,
        # every input the model was captured with (several for a denoiser); artifacts without it
        # (older ones) rebuild from example_input_shape, one image batch
        "example": example.to_manifest() if example is not None else None,
        "outputs": getattr(record_of(module), "outputs", "logits"),
        "leaf_modules": leaves,
        # the capture front end the graph was made with; a rebuild uses the same one, so the
        # replayed graph is the saved one (an artifact without it predates export: fx)
        "capture": str(getattr(record_of(module), "capture", "fx")),
        "dtype": str(param.dtype).removeprefix("torch.") if param is not None else "float32",
        "report": _plain(report.to_dict()) if report is not None and hasattr(report, "to_dict") else None,
        # measurements the plan used (ToFu's linearity profile): replayed, not re-measured, on load
        "context": _plain(dict(getattr(record_of(module), "context", {}) or {})),
    }


def save(module: nn.Module, path: str | os.PathLike, base: dict | None = None, arch: str | None = None) -> Path:
    """Write ``module`` (returned by [`tokenopt.optimize`][tokenopt.optimize]) to ``path`` as one artifact file.

    A base that would rebuild another architecture than the one optimized (other state-dict keys or
    shapes) is refused here, not discovered on load. The file appears only once it is complete; the
    folder must exist.

    Args:
        module: what [`tokenopt.optimize`][tokenopt.optimize] (or [`load`][tokenopt.artifact.load]) returned.
        path: the file to write (``OUT.tokenopt.pt`` by convention).
        base: how to rebuild the unmodified model (the dict ``tokenopt.sources.load_model`` returns);
            default: ``record_of(module).base``, else the model's class with no arguments.
        arch: the base as a spec instead (``timm:<name>?key=value&...``, ``package.module:factory?key=value``).

    Returns:
        The path written.
    """
    recipe = getattr(record_of(module), "recipe", None)
    if recipe is None:
        raise TokenoptError(f"{type(module).__name__} is not an optimized module (it carries no tokenopt record); "
                            "save what tokenopt.optimize(model, recipe) returns.")
    if arch is not None:
        if base is not None:
            raise TokenoptError("give tokenopt.save either base= or arch=, not both.")
        base = sources.parse_arch(arch)
    files.check_output_path(path)
    manifest = manifest_for(module, base)
    _check_rebuilds(module, manifest["base"], path, named=arch is not None)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "recipe": _plain(recipe.to_dict()),
        "manifest": manifest,
    }
    with files.atomic_write(path) as f:
        torch.save(payload, f)
    return Path(path)


def _check_rebuilds(module: nn.Module, base: dict, path, named: bool) -> None:
    """Refuse a base that builds another architecture than the model ``module`` was made from."""
    meta = getattr(module, "meta", None) or {}
    want = meta.get("tokenopt_source_shapes")
    if not want:
        return
    try:
        got = sources.rebuilt_shapes(base)
    except ModelLoadError:
        if named:
            raise
        return    # cannot be built at all: loading asks for arch= (API) / --arch (CLI), as it always has
    difference = sources.shape_difference(want, got) if got is not None else None
    if difference is None:
        return
    what = sources.base_to_spec(base) or f"{base.get('class')} called with no arguments"
    example = meta.get("tokenopt_source_arch", "timm:<name>")
    raise ModelLoadError(
        f"cannot save {path}: its manifest would rebuild the base model as {what}, which is not the model that "
        f"was optimized ({difference}).\n  Name the architecture as it was built: tokenopt.save(module, path, "
        f"arch=\"{example}?img_size=...&depth=...&num_classes=...\") with the keyword arguments it was created with, "
        "or arch=\"package.module:factory?key=value\"; on the command line, pass --arch naming it with the weights "
        "file (a state dict or the pickled model).")


def read(path: str | os.PathLike) -> dict:
    """The validated payload of an artifact file (``weights_only=True``; nothing is rebuilt)."""
    return validate_payload(files.read_checkpoint(path), path)


def validate_payload(payload, path: str | os.PathLike) -> dict:
    """``payload`` if it is an artifact this tokenopt can read, else a ModelLoadError naming ``path``."""
    if not is_artifact(payload):
        raise ModelLoadError(f"{path} is not a tokenopt artifact (no 'format: {FORMAT}' inside).\n"
                             "  Artifacts are written by `tokenopt apply ... -o FILE` or tokenopt.save(); "
                             "to load a plain model use tokenopt.sources.load_model.")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelLoadError(f"{path} is a tokenopt artifact of format version {version!r}; this tokenopt "
                             f"({__version__}) reads version {FORMAT_VERSION} and older. Upgrade tokenopt.")
    for key in ("state_dict", "recipe", "manifest"):
        if not isinstance(payload.get(key), dict):
            raise ModelLoadError(f"{path}: the artifact has no valid {key!r}; the file is damaged. Save it again.")
    return payload


def is_artifact(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load(path: str | os.PathLike, arch: str | dict | nn.Module | None = None) -> torch.fx.GraphModule:
    """Rebuild a saved optimized module: the base model, the recipe replayed on it, the saved weights.

    Args:
        path: a file written by [`save`][tokenopt.artifact.save] (or ``tokenopt apply``/``train``).
        arch: how to build the base model when the manifest cannot (``timm:<name>?kw``,
            ``package.module:factory?kw``, or a freshly built nn.Module of the right class).

    Returns:
        The optimized module, as [`tokenopt.optimize`][tokenopt.optimize] returned it when it was saved.
    """
    return rebuild(read(path), arch, source=str(path))


def rebuild(payload: dict, arch: str | dict | nn.Module | None = None, source: str = "<artifact>"):
    from tokenopt.pipeline import optimize
    from tokenopt.plan import TokenoptWarning

    manifest = payload["manifest"]
    base = manifest.get("base") or {}
    model, base = _base_model(base, arch, source)
    dtype = getattr(torch, str(manifest.get("dtype", "float32")), torch.float32)
    model = model.float().eval()
    if manifest.get("example"):
        from tokenopt.analysis import Example
        example = Example.from_manifest(manifest["example"])
    else:
        shape = tuple(manifest["example_input_shape"])
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        # shortfalls were reported when the artifact was made; replaying them again is noise
        warnings.simplefilter("ignore", TokenoptWarning)
        try:
            gm = optimize(model, payload["recipe"], example, leaf_modules=manifest.get("leaf_modules") or (),
                          outputs=manifest.get("outputs"), context=manifest.get("context") or None, report=False,
                          capture=manifest.get("capture", "fx"))
        except TokenoptError as e:
            # the usual cause is a base rebuilt otherwise than it was built; the error's own hint (an
            # --input-size that load and export do not have) does not apply to a saved model
            reason = str(e).splitlines()[0]
            fix = ("check arch= (CLI: --arch): it must build the base model exactly as it was built"
                   if arch is not None else
                   f"the base model rebuilt from the manifest ({sources.base_to_spec(base) or base.get('class')}) "
                   "is probably not the one that was optimized: pass arch= (CLI: --arch) naming its architecture "
                   "exactly as it was built")
            raise type(e)(f"replaying the recipe saved in {source} failed: {reason}\n  {fix}.") from None
    if dtype != torch.float32:
        gm = gm.to(dtype)
    hint = "arch= (CLI: --arch) naming the base model's architecture"
    files.load_weights(gm, payload["state_dict"], source, arch_hint=hint, model_name=type(model).__name__)
    gm.eval()
    update_record(gm, base=base, manifest=manifest, leaf_modules=tuple(manifest.get("leaf_modules") or ()))
    report = report_from_dict(manifest.get("report"))
    if report is not None:
        update_record(gm, report=report)
    return gm


def _base_model(base: dict, arch, source: str) -> tuple[nn.Module, dict]:
    if isinstance(arch, nn.Module):
        return arch, sources.module_base(arch) if base.get("kind") == "class" else dict(base)
    if arch is not None:
        return sources.build_arch(arch)
    try:
        return sources.build_base(base), dict(base)
    except ModelLoadError as e:
        what = sources.base_to_spec(base) or base.get("class") or repr(base)
        reason = str(e).splitlines()[0]  # its own hint is about CLI specs; the one below fits here
        raise ModelLoadError(f"cannot rebuild the base model of {source} ({what}): {reason}\n"
                             "  Pass arch= (CLI: --arch) naming the architecture: timm:<name>?key=value or "
                             "package.module:factory?key=value, built exactly as the original model.") from None


def report_from_dict(d: dict | None):
    """The Report stored in a manifest, or None when there is none (or it is from another version)."""
    if not d:
        return None
    from tokenopt.report import LayerRow, Report

    try:
        d = dict(d)
        rows = [LayerRow(**r) for r in d.pop("rows")]
        for key in ("skipped", "unmatched"):
            if key in d:
                d[key] = [tuple(x) for x in d[key]]
        return Report(rows, **d)
    except Exception:
        return None


def _plain(obj):
    """Tuples, lists and dicts of str/int/float/bool/None only: what weights_only can read back."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool):
        return obj
    for t in (str, int, float):  # exact types: torch.__version__ is a str subclass weights_only refuses
        if isinstance(obj, t):
            return t(obj)
    return str(obj)

