"""Where tokenopt keeps files: one cache root for everything it builds or trains, and the shipped recipes.

    cache_root()          $TOKENOPT_CACHE, else $XDG_CACHE_HOME/tokenopt, else ~/.cache/tokenopt
    native_build_dir()    <cache>/native   compiled merge steps (tokenopt.ops.native)
    demo_models_dir()     <cache>/demos    retrained demo ViTs and parts (tokenopt.demo trains, tokenopt.sources loads)

The environment is read at every call, so a test or a script can point the cache elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

#: The recipes that ship inside the package (``tokenopt demo`` applies them by stem).
SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"


def cache_root() -> Path:
    if os.environ.get("TOKENOPT_CACHE"):
        return Path(os.environ["TOKENOPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tokenopt"


def native_build_dir() -> Path:
    return cache_root() / "native"


def demo_models_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/demos``, under ``cache_dir`` when one is given (``tokenopt demo --cache-dir``)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "demos"
