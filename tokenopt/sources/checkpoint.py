"""Weights from files: a checkpoint with the architecture named beside it (``--arch``), a pickled
module (only when trusted), or an architecture spec with ``--weights FILE``.

The base dict is the architecture's, plus ``"weights": <path>`` for the record (the weights
travel in the artifact, not by path). Reading the files themselves is :mod:`tokenopt.files`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokenopt.errors import ModelLoadError
from tokenopt.sources.factory import module_base
from tokenopt.sources.registry import arch_help, build_arch, source_for_spec


def model_from_checkpoint(obj: Any, path: str | os.PathLike, arch=None) -> tuple[Any, dict]:
    """The model in an object :func:`tokenopt.files.read_checkpoint` returned (see :func:`load_model`)."""
    from torch import nn

    from tokenopt.files import WRAPPER_KEYS, extract_state_dict, load_weights

    path = Path(path)
    if isinstance(obj, dict) and obj.get("format") == "tokenopt-artifact":
        raise ModelLoadError(f"{path} is a tokenopt artifact (an already optimized model), not a base model.\n"
                             "  Load it with tokenopt.load(path) or look at it with `tokenopt inspect`; to apply "
                             "another recipe, start from the original model.")
    # a pickled module, possibly inside a checkpoint dict ({"model": <nn.Module>})
    module = obj if isinstance(obj, nn.Module) else None
    if module is None and isinstance(obj, dict):
        module = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), nn.Module)), None)
    if module is not None and arch is None:
        base = module_base(module)
        base["weights"] = str(path)
        return module.eval(), base
    # the user named an architecture: a pickled module only provides its weights
    state = extract_state_dict(module.state_dict() if module is not None else obj, path)
    if arch is None:
        raise ModelLoadError(f"{path} holds only weights (a state dict of {len(state)} tensors), not an architecture.\n"
                             "  Pass --arch (API: arch=) naming it: timm:<name>[?key=value&...] or "
                             "package.module:factory[?key=value&...].")
    if isinstance(arch, nn.Module):
        model, base = arch, module_base(arch)
    else:
        model, base = build_arch(arch)
    load_weights(model, state, str(path))
    base = dict(base)
    base["weights"] = str(path)
    return model.eval(), base


def arch_with_weights(spec: str, arch, weights: str | os.PathLike, trust_pickle: bool) -> tuple[Any, dict]:
    """``spec`` names an architecture, ``weights`` the file that fills it."""
    from torch import nn

    from tokenopt.files import extract_state_dict, load_weights, read_checkpoint

    if arch is not None:
        raise ModelLoadError(f"give either --weights (with MODEL naming the architecture) or --arch (with MODEL "
                             f"naming the weight file), not both: got MODEL {spec!r}, --arch {arch!r}.")
    src = source_for_spec(spec)
    if src is None or not src.names_arch:
        raise ModelLoadError(f"--weights {weights}: MODEL must name an architecture ({arch_help()}), "
                             f"not {spec!r}.")
    model, base = build_arch(spec)
    path = Path(weights)
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    module = obj if isinstance(obj, nn.Module) else None
    state = src.weights_for(extract_state_dict(module.state_dict() if module is not None else obj, path))
    load_weights(model, state, str(path), arch_hint="MODEL")
    base = dict(base)
    base["weights"] = str(path)
    return model.eval(), base
