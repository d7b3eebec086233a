"""Spec strings: ``name?key=value&...`` read into a name and typed keyword arguments, and back.

    parse_query("vit_small_patch16_224?img_size=64&depth=4")  ->  ("vit_small_patch16_224", {"img_size": 64, "depth": 4})
    format_kwargs({"img_size": (64, 48), "class_token": False}) ->  "img_size=64,48&class_token=false"
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from tokenopt.errors import ModelLoadError

_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def parse_value(text: str) -> Any:
    """``64`` -> 64, ``0.1`` -> 0.1, ``true`` -> True, ``none`` -> None, ``64,64`` -> (64, 64), else the string."""
    text = unquote(text.strip())
    if "," in text:
        return tuple(parse_value(p) for p in text.split(",") if p.strip() != "")
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_query(spec: str) -> tuple[str, dict[str, Any]]:
    """``name?a=1&b=x`` -> ``("name", {"a": 1, "b": "x"})``."""
    name, _, query = spec.partition("?")
    kwargs: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        key = unquote(key.strip())
        if not eq or not key.isidentifier():
            raise ModelLoadError(f"bad keyword argument {part!r} in {spec!r}: write key=value pairs joined by &, "
                                 "e.g. timm:vit_small_patch16_224?img_size=64&depth=4")
        if key in kwargs:
            raise ModelLoadError(f"keyword argument {key!r} is given twice in {spec!r}; keep only one.")
        kwargs[key] = parse_value(value)
    return name.strip(), kwargs


def format_kwargs(kwargs: dict) -> str:
    """The query :func:`parse_query` reads back into ``kwargs``."""
    def fmt(v):
        if isinstance(v, (tuple, list)):
            return ",".join(map(fmt, v))
        return str(v).lower() if isinstance(v, bool) else str(v)  # parse_value reads true/false back
    return "&".join(f"{k}={fmt(v)}" for k, v in kwargs.items())


def with_query(name: str, kwargs: dict | None) -> str:
    """``name`` followed by ``?query`` when there are keyword arguments."""
    q = format_kwargs(kwargs or {})
    return name + (f"?{q}" if q else "")


def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` reads as ``package.module:callable[?query]``."""
    return bool(_FACTORY.match(spec.partition("?")[0].strip()))


def first_line(e: BaseException) -> str:
    """An exception's first line, for one-line messages (its type when it says nothing)."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
