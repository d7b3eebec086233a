"""The front door: :func:`load_model` reads any MODEL spec, by the source registered for it or as a file."""
from __future__ import annotations

import os
from pathlib import Path

from tokenopt.errors import ModelLoadError
from tokenopt.sources.checkpoint import arch_with_weights, model_from_checkpoint
from tokenopt.sources.factory import module_base
from tokenopt.sources.registry import model_help, source_for_spec


def how_to_name() -> str:
    return f"  Name a model as {model_help()}"


def load_model(spec, arch=None, trust_pickle: bool = False, weights: str | os.PathLike | None = None):
    """Load ``spec`` (see :mod:`tokenopt.sources`); returns ``(model.eval(), base)``.

    ``arch`` builds the architecture for a state dict: ``timm:<name>?kw``, ``package.module:factory?kw``,
    a base dict, or an already-built nn.Module (its weights are replaced). ``weights`` is the other
    way round: ``spec`` names the architecture (``open_clip:ViT-B-32``, ``timm:...``) and ``weights``
    a local state dict or checkpoint for it (read ``weights_only``; an open_clip checkpoint of a
    whole CLIP model gives its ``visual.`` weights).

    The model carries its base as ``model.tokenopt_base``, so ``tokenopt.save(tokenopt.optimize(model,
    ...))`` records how to rebuild it.
    """
    from torch import nn

    from tokenopt.files import CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX, read_checkpoint

    if isinstance(spec, nn.Module):
        return spec.eval(), module_base(spec)
    spec_str = os.fspath(spec).strip()
    if not spec_str:
        raise ModelLoadError("no model given.\n" + how_to_name())
    path = Path(spec_str)
    src = source_for_spec(spec_str)
    if weights is not None:
        model, base = arch_with_weights(spec_str, arch, weights, trust_pickle)
    elif src is not None and not (src.file_wins and path.exists()):
        if arch is not None:
            raise ModelLoadError(src.arch_conflict(spec_str))
        model, base = src.load(spec_str)
    elif not path.exists():
        raise ModelLoadError(f"model file not found: {path}\n  Check the path."
                             + ("" if path.suffix in CHECKPOINT_SUFFIXES + (SAFETENSORS_SUFFIX,) else "\n" + how_to_name()))
    else:
        model, base = model_from_checkpoint(read_checkpoint(path, trust_pickle=trust_pickle), path, arch)
    model.tokenopt_base = base   # tokenopt.save(optimize(model, ...)) rebuilds it from this
    return model.eval(), base
