"""Input preprocessing settings (image size, mean/std, resize policy) for a model.

Explicit arguments win; otherwise the model's own timm data config; otherwise timm's defaults
(224 px, ImageNet mean/std). The result is a plain dict that ``timm.data.create_transform``
accepts, so an ImageFolder is preprocessed exactly as the model expects.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn


def _patch_embed_size(model: nn.Module | None) -> int | None:
    # timm keeps the *pretrained* input size in pretrained_cfg even when the model was built with
    # img_size=64; the patch embedding knows the size the position table was made for.
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None:
        return None
    if isinstance(img_size, (tuple, list)):
        return int(img_size[0]) if img_size[0] == img_size[-1] else None
    return int(img_size)


def data_config(
    model: nn.Module | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **overrides,
) -> dict:
    """Preprocessing dict for ``timm.data.create_transform``: input_size, mean, std, interpolation, crop_pct, crop_mode."""
    from timm.data import resolve_data_config

    if model is not None:
        cfg = dict(resolve_data_config({}, model=model))
    else:  # timm's defaults, spelled out (resolve_data_config insists on a model or args)
        from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
               "std": IMAGENET_DEFAULT_STD, "crop_pct": DEFAULT_CROP_PCT, "crop_mode": "center"}
    size = image_size or _patch_embed_size(model)
    if size is not None:
        cfg["input_size"] = (3, int(size), int(size))
    if mean is not None:
        cfg["mean"] = tuple(float(m) for m in mean)
    if std is not None:
        cfg["std"] = tuple(float(s) for s in std)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def model_num_classes(model: nn.Module | None) -> int | None:
    """Number of classes the model's head predicts, if it says (timm models do)."""
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None
