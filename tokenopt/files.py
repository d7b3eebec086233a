"""Files: reading checkpoints (weights only unless trusted) and writing outputs without ever
leaving half of one.

Checkpoints are read with ``torch.load(weights_only=True)``: a file that needs arbitrary Python
objects to load is refused with the names of the classes it would import, unless the caller
says it trusts the file. Safetensors files are read with safetensors. Training checkpoints are
unwrapped to a flat state dict (``{"state_dict": ...}``, ``module.`` and ``_orig_mod.`` prefixes).

Outputs are written to a temporary file beside the target and renamed when complete, so a
reader never sees a half-written file and a failed run leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import csv
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from tokenopt.errors import ModelLoadError, TokenoptError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
SAFETENSORS_SUFFIX = ".safetensors"
# Keys under which training scripts commonly nest the weights ({"state_dict": ...}, {"model": ...}).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "state_dict_ema", "model_ema")
# Prefixes added by DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------------------------
# reading

def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """The object stored in ``path`` (state dict, checkpoint dict, or with trust a pickled module).

    Reads safetensors files and torch files with ``weights_only=True``; only ``trust_pickle``
    allows a file that imports Python classes.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}\n  Check the path.")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a model file.\n"
                             "  Name the checkpoint file inside it (.pt/.pth/.bin/.safetensors).")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Only "Unsupported global" means a well-formed pickle that wants to import code; anything
        # else the weights-only unpickler trips on ("Unsupported operand ...") is a damaged file.
        if "Unsupported global" not in str(e):
            raise _corrupt(path, e) from None
        if not trust_pickle:
            raise _untrusted(path, e) from None
    except Exception as e:  # truncated zip (RuntimeError), empty (EOFError), not a torch file (KeyError...)
        raise _corrupt(path, e) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"loading {path} as a pickle (--trust-pickle) failed: {type(e).__name__}: "
                             f"{_first_line(e)}\n  The classes it was saved with must be importable: install their "
                             "package or run from the folder that contains their module.") from None


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: not a valid safetensors file ({_first_line(e)}).\n"
                             "  The file is probably truncated or corrupt: copy or save it again.") from None


def _corrupt(path: Path, e: BaseException) -> ModelLoadError:
    size = path.stat().st_size
    text = str(e)
    if "WeightsUnpickler error:" in text:  # skip torch's paragraph about weights_only defaults
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    detail = f"{type(e).__name__}: {text.strip().splitlines()[0]}" if text.strip() else type(e).__name__
    if len(detail) > 160:
        detail = detail[:157] + "..."
    what = "the file is empty" if size == 0 else "it is truncated, corrupt, or not a PyTorch checkpoint"
    return ModelLoadError(f"cannot read checkpoint {path} ({size} bytes): {what} ({detail}).\n"
                          "  Copy or save it again (torch.save(model.state_dict(), path) or safetensors).")


def unsafe_globals(path: Path, error: BaseException | None = None) -> list[str]:
    """The classes/functions a pickle would import: the one torch tripped on first (for a whole
    pickled model, its class), then user code, then torch's own."""
    first = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(error)) if error is not None else []
    names: list[str] = []
    getter = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if getter is not None:
        try:
            names = list(getter(str(path)))
        except Exception:
            names = []
    rest = sorted(set(names) - set(first), key=lambda n: (n.startswith(("torch.", "collections.", "builtins.")), n))
    return first + rest


def _untrusted(path: Path, e: BaseException) -> ModelLoadError:
    names = unsafe_globals(path, e)
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return ModelLoadError(
        f"{path} is a pickled Python object (a whole model, or a checkpoint holding Python objects), not plain "
        f"weights; loading it would import and run code from: {shown or 'unknown classes'}.\n"
        "  If you trust this file, pass --trust-pickle (API: trust_pickle=True). Safer: save "
        "model.state_dict() (torch.save or safetensors) and pass it with --arch naming the architecture.")


def extract_state_dict(obj: Any, path: Path | str = "") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a state dict or a training checkpoint, wrapper prefixes removed."""
    where = f" in {path}" if path else ""
    for _ in range(3):  # {"state_dict": {"model": {...}}} is not unheard of
        if isinstance(obj, dict) and not _all_tensors(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ModelLoadError(f"no weights found{where}: expected a state dict (name -> tensor), got "
                             f"{'an empty dict' if isinstance(obj, dict) else type(obj).__name__}.")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(repr, list(obj)[:6]))
        raise ModelLoadError(f"no weights found{where}: its top-level keys are {keys}, none holding tensors.\n"
                             f"  Save model.state_dict() itself, or nest it under one of "
                             f"{', '.join(WRAPPER_KEYS[:3])}.")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _all_tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch_hint: str = "--arch",
                 model_name: str | None = None) -> None:
    """``model.load_state_dict(state)`` with a readable error for missing, unexpected and misshapen keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", wrong)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
        raise ModelLoadError(f"the weights in {source} do not fit the architecture {model_name or type(model).__name__}: "
                             f"{'; '.join(parts)}.\n  Check {arch_hint}: same model name and the same keyword "
                             "arguments (depth, embed_dim, img_size, num_classes...) as when it was trained.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"loading the weights in {source} failed: {_first_line(e)}") from None


# ----------------------------------------------------------------------------------------------
# writing

def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before any heavy work) when ``path`` cannot be written: its folder must exist."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise TokenoptError(f"output path {path} is a directory; name a file inside it.")
    if not folder.exists():
        raise TokenoptError(f"output folder does not exist: {folder}\n  Create it first (mkdir -p {folder}) "
                            "or choose another path.")
    if not folder.is_dir():
        raise TokenoptError(f"output folder {folder} is not a directory.")
    if not os.access(folder, os.W_OK):
        raise TokenoptError(f"output folder {folder} is not writable.")
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on any error it is removed.

    Readers never see a half-written file, and a failed run leaves no file behind.
    """
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name, not a file object
    (ONNX): renamed to ``path`` on success, removed on any error."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def write_csv_rows(rows: list[dict], path: str | os.PathLike) -> None:
    """``rows`` (dicts with the same keys, in column order) as a CSV file with a header, written atomically."""
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
