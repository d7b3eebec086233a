"""``timm:<name>[?key=value&...]``: a timm architecture with random weights (never downloads).

    timm:vit_small_patch16_224?img_size=64&depth=4   ->   {"kind": "timm", "name": "vit_small_patch16_224",
                                                           "kwargs": {"img_size": 64, "depth": 4}}
"""
from __future__ import annotations

import difflib

from tokenopt.errors import ModelLoadError
from tokenopt.sources.registry import NamedSource, register_source
from tokenopt.sources.spec import first_line


@register_source
class TimmSource(NamedSource):
    kind, prefix = "timm", "timm:"
    help = "timm:<name>[?key=value&...] (random weights)"

    def build_named(self, name: str, kwargs: dict):
        return build_timm(name, kwargs)


def build_timm(name: str, kwargs: dict):
    """``timm.create_model(name, pretrained=False, **kwargs)``, its errors as one message."""
    import timm

    if not name:
        raise ModelLoadError("timm: needs a model name, e.g. timm:vit_small_patch16_224")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown timm model {name!r}.{hint}\n"
                             "  List the names with `python -c \"import timm; print(timm.list_models('vit*'))\"`.")
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # bad kwargs raise TypeError/AssertionError/ValueError from the model's __init__
        raise ModelLoadError(f"timm could not build {name!r} with {kwargs or 'no arguments'}: "
                             f"{type(e).__name__}: {first_line(e)}\n"
                             "  Check the keyword arguments after '?' (e.g. img_size=64&depth=4).") from None
    return model
