"""Training checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors and Python scalars (no pickled classes), so loading one
can never run code. It is written to a temporary file in the same directory and moved over the
old one with ``os.replace`` (atomic on POSIX and Windows): a run killed mid-write keeps its last
good checkpoint.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from tokenopt.errors import ModelLoadError

FORMAT = "tokenopt-train-checkpoint"
VERSION = 1


class ResumeError(ModelLoadError):
    """A checkpoint cannot be resumed: unreadable, from another recipe, or from other settings."""


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave a stray temp file
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"cannot resume: no checkpoint at '{path}'")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ResumeError(f"cannot resume: '{path}' is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ResumeError(f"cannot resume: '{path}' is not a tokenopt training checkpoint")
    if ckpt.get("version") != VERSION:
        raise ResumeError(f"cannot resume: '{path}' has checkpoint version {ckpt.get('version')}, "
                          f"this tokenopt reads version {VERSION}")
    return ckpt


def capture_rng() -> dict:
    """Every RNG a training step may draw from (dropout, shuffles, augmentations)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
