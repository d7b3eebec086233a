"""``torchvision:<name>[?key=value&...]``: ``torchvision.models.get_model(name, weights=None, **kwargs)``,
random init, never downloads; trained weights come from ``--weights FILE`` (read ``weights_only``)."""
from __future__ import annotations

import difflib

from tokenopt.errors import ModelLoadError
from tokenopt.sources.registry import NamedSource, register_source
from tokenopt.sources.spec import first_line


@register_source
class TorchvisionSource(NamedSource):
    kind, prefix = "torchvision", "torchvision:"
    help = "torchvision:<name>[?key=value&...] (random weights)"

    def build_named(self, name: str, kwargs: dict):
        return build_torchvision(name, kwargs)


def build_torchvision(name: str, kwargs: dict):
    """``torchvision.models.get_model(name, weights=None, **kwargs)``: random init, never downloads."""
    import torchvision

    if not name:
        raise ModelLoadError("torchvision: needs a model name, e.g. torchvision:vit_b_16")
    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown torchvision model {name!r}.{hint}\n  Its ViTs: "
                             f"{', '.join(n for n in names if n.startswith('vit_'))}.")
    kwargs = {k: v for k, v in kwargs.items() if k != "weights"}
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs).eval()
    except Exception as e:
        raise ModelLoadError(f"torchvision could not build {name!r} with {kwargs or 'no arguments'}: "
                             f"{type(e).__name__}: {first_line(e)}\n"
                             "  Check the keyword arguments after '?' (e.g. image_size=64&num_classes=10).") from None
