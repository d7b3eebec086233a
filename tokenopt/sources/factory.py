"""``package.module:factory[?key=value&...]``: any callable that returns an nn.Module, and the
``class`` base an already-built module falls back to (its class, called with no arguments).

    mypkg.models:make_vit?dim=256   ->  {"kind": "factory", "factory": "mypkg.models:make_vit", "kwargs": {"dim": 256}}
    (a module of class MyViT)       ->  {"kind": "class", "class": "mypkg.models:MyViT"}

The working directory is importable, as with ``python -m``, so a user's own module next to
their data works without installing it.
"""
from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import Any, Callable

from tokenopt.errors import ModelLoadError
from tokenopt.sources.registry import Source, register_source
from tokenopt.sources.spec import first_line, is_factory_spec, parse_query, with_query


@register_source
class FactorySource(Source):
    kind = "factory"
    help = "package.module:factory[?key=value&...]"
    names_arch = True
    file_wins = True    # "a:b" could also be a file name

    def matches(self, spec: str) -> bool:
        return is_factory_spec(spec)

    def parse(self, spec: str) -> dict:
        path, kwargs = parse_query(spec)
        return {"kind": self.kind, "factory": path, "kwargs": kwargs}

    def build(self, base: dict):
        return build_factory(base["factory"], dict(base.get("kwargs") or {}))

    def to_spec(self, base: dict) -> str:
        return with_query(base["factory"], base.get("kwargs"))


@register_source
class ClassSource(Source):
    """No spec names it: the base of a module built in Python, when nothing better is known."""
    kind = "class"

    def matches(self, spec: str) -> bool:
        return False

    def build(self, base: dict):
        return build_factory(base["class"], {}, what="class")


def module_base(module) -> dict:
    """The best description we have of an already-built module: the base it was loaded from
    (``module.tokenopt_base``), else its class (rebuilt with no arguments)."""
    base = getattr(module, "tokenopt_base", None)
    if isinstance(base, dict):
        return dict(base)
    return {"kind": "class", "class": f"{type(module).__module__}:{type(module).__qualname__}"}


def resolve_callable(path: str, what: str = "factory") -> Callable:
    """``package.module:qual.name`` -> the object. The working directory is importable, as with ``python -m``."""
    mod_name, _, qual = path.partition(":")
    if not mod_name or not qual:
        raise ModelLoadError(f"bad {what} path {path!r}: write it as package.module:name.")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelLoadError(f"cannot import module {mod_name!r} for the {what} {path!r}: {first_line(e)}\n"
                             "  Check the spelling, install the package, or run from the folder that contains it "
                             "(or add that folder to PYTHONPATH).") from None
    except Exception as e:
        raise ModelLoadError(f"importing module {mod_name!r} for the {what} {path!r} failed: "
                             f"{type(e).__name__}: {first_line(e)}") from None
    for part in qual.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelLoadError(f"{mod_name!r} has no {part!r} (looking up the {what} {path!r}).{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"{path!r} is a {type(obj).__name__}, not a callable that builds a model.")
    return obj


def build_factory(path: str, kwargs: dict, what: str = "factory"):
    """``path(**kwargs)``, checked to be an nn.Module; its errors as one message."""
    from torch import nn

    fn = resolve_callable(path, what)
    try:
        model = fn(**kwargs)
    except Exception as e:
        args = f"with {kwargs}" if kwargs else "with no arguments"
        raise ModelLoadError(f"calling the {what} {path!r} {args} failed: {type(e).__name__}: {first_line(e)}\n"
                             "  Give the arguments it needs after '?' (e.g. "
                             f"{path}?dim=256&depth=12), or name a factory that needs none.") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"the {what} {path!r} returned a {type(model).__name__}, not an nn.Module.")
    return model
