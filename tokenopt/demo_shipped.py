"""The demo weights that ship inside the package: read, checked against their sha256, and written.

``tokenopt/demo_weights/`` holds what ``tokenopt demo`` would otherwise train for minutes: each demo
ViT's weights and, per demo method, the learned parts (ToSA selectors, SPA gates) with the exact
recipe they were trained with. ``manifest.json`` lists every file with its sha256 and what it is::

    {"format_version": 1,
     "files": {"digits.safetensors": "<sha256>", ...},
     "models": {"digits": {"file": "digits.safetensors", "spec_digest": "...", "info": {...}}},
     "methods": {"digits-clutter": {"tosa-keep50": {"file": "...safetensors", "recipe": "....yaml",
                                                    "spec_digest": "...", "info": {...}}}}}

Tensors are stored in float16 (half the size; the demo's top-1 is the same, checked when they are
written) and read back as float32. A file whose digest differs from the manifest's is damaged:
loading refuses it with one message rather than running a model with wrong weights. An entry whose
``spec_digest`` is not the current spec's is stale and not used (the cache, or training, serves).

Writing is the maintainers' step (``tools/ship_demo_weights.py`` after ``tokenopt demo --retrain``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from tokenopt.errors import ModelLoadError

SHIPPED_DIR = Path(__file__).resolve().parent / "demo_weights"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STORED_DTYPE = torch.float16


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short sha256 of a state dict's names and values: which backbone weights learned parts were trained on."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def read_manifest(folder: str | os.PathLike | None = None) -> dict:
    """The manifest of the shipped demo weights; empty entries when none ship (a trimmed install)."""
    path = Path(folder or SHIPPED_DIR) / MANIFEST
    if not path.is_file():
        return {"format_version": FORMAT_VERSION, "files": {}, "models": {}, "methods": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} cannot be read ({e}): the installed tokenopt is damaged. "
                             "Reinstall it, or run `tokenopt demo --retrain` to train the demo models instead.") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        return {"format_version": FORMAT_VERSION, "files": {}, "models": {}, "methods": {}}
    return manifest


RETRAIN = "`tokenopt demo --retrain` to train the demo models into the cache"


def verified(filename: str, folder: str | os.PathLike | None = None, retrain: str = RETRAIN) -> Path:
    """The path of shipped file ``filename`` once its sha256 matches the manifest's; else a ModelLoadError.

    ``retrain`` completes the message's "or run ...": what trains these weights instead."""
    folder = Path(folder or SHIPPED_DIR)
    path = folder / filename
    want = read_manifest(folder).get("files", {}).get(filename)
    got = sha256_of(path) if path.is_file() else None
    if want is None or got != want:
        what = "is missing" if got is None else (
            "is not listed in the manifest" if want is None else f"has sha256 {got[:16]}..., not {want[:16]}...")
        raise ModelLoadError(
            f"shipped demo file {path} {what}: the installed tokenopt is damaged or was changed.\n"
            f"  Reinstall tokenopt, or run {retrain} instead.")
    return path


def read_state(filename: str, folder: str | os.PathLike | None = None,
               retrain: str = RETRAIN) -> dict[str, torch.Tensor]:
    """A shipped state dict (digest checked), floating tensors back in float32."""
    from safetensors.torch import load_file

    state = load_file(str(verified(filename, folder, retrain)))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_text(filename: str, folder: str | os.PathLike | None = None) -> str:
    """A shipped text file (a recipe), digest checked."""
    return verified(filename, folder).read_text()


def model_entry(name: str, spec_digest: str, folder: str | os.PathLike | None = None) -> dict | None:
    """The manifest entry of demo model ``name`` if it was trained from the spec with ``spec_digest``."""
    entry = read_manifest(folder).get("models", {}).get(name)
    return entry if entry and entry.get("spec_digest") == spec_digest else None


def method_entry(name: str, method: str, spec_digest: str, folder: str | os.PathLike | None = None) -> dict | None:
    """The manifest entry of ``method``'s learned parts on demo model ``name``, if trained from ``spec_digest``."""
    entry = read_manifest(folder).get("methods", {}).get(name, {}).get(method)
    return entry if entry and entry.get("spec_digest") == spec_digest else None


def store_state(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` as safetensors with floating tensors in :data:`STORED_DTYPE`."""
    from safetensors.torch import save_file

    small = {k: (v.to(STORED_DTYPE) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(small, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)     # package data: readable by whoever installs it, not only its writer
    os.replace(tmp, path)


def store_model(name: str, state: dict[str, torch.Tensor], info: dict, folder: Path) -> dict:
    """Write a cached model's ``state`` as ``folder/NAME.safetensors``; its manifest entry (the cache-only
    keys of ``info`` left out)."""
    file = f"{name}.safetensors"
    store_state(state, folder / file, metadata={"spec_digest": info["spec_digest"]})
    return {"file": file, "spec_digest": info["spec_digest"],
            "info": {k: v for k, v in info.items() if k not in ("weights", "shipped")}}


def write_manifest(folder: Path, models: dict, methods: dict) -> dict:
    """Write ``manifest.json`` over the files ``models`` and ``methods`` name, with their sha256."""
    names = [e["file"] for e in models.values()]
    names += [f for per in methods.values() for e in per.values() for f in (e["file"], e["recipe"])]
    manifest = {"format_version": FORMAT_VERSION,
                "files": {n: sha256_of(folder / n) for n in sorted(names)},
                "models": models, "methods": methods}
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return manifest
