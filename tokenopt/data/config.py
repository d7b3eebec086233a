"""Input preprocessing settings (image size, mean/std, resize policy) for a model.

Explicit arguments win (the CLI's ``--input-size``, ``--mean``, ``--std``, ``--interpolation``,
``--crop-pct``, as in timm's validate.py); otherwise the model's own config: ``tokenopt_data_config``
when its loader set one (a Hugging Face folder's preprocessor_config.json, open_clip's mean/std),
else its timm data config; otherwise timm's defaults (224 px, ImageNet mean/std). The result is a plain dict that ``timm.data.create_transform``
accepts, so an ImageFolder is preprocessed exactly as the model expects.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn


def _patch_embed_size(model: nn.Module | None) -> int | None:
    # timm keeps the *pretrained* input size in pretrained_cfg even when the model was built with
    # img_size=64; the patch embedding knows the size the position table was made for.
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None and isinstance(getattr(model, "image_size", None), int):   # torchvision's ViT
        img_size = model.image_size
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
    """Preprocessing dict for ``timm.data.create_transform``: input_size, mean, std, interpolation, crop_pct, crop_mode.

    ``overrides`` may hold any of those keys (None: keep the model's); ``input_size`` is (C, H, W).
    """
    from timm.data import resolve_data_config

    if model is not None:
        cfg = dict(resolve_data_config({}, model=model))
    else:  # timm's defaults, spelled out (resolve_data_config insists on a model or args)
        from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
               "std": IMAGENET_DEFAULT_STD, "crop_pct": DEFAULT_CROP_PCT, "crop_mode": "center"}
    own = dict(getattr(model, "tokenopt_data_config", None) or {})
    cfg.update(own)
    size = image_size or (None if "input_size" in own else _patch_embed_size(model))
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
    if n is None and hasattr(model, "classifier"):   # a Hugging Face *ForImageClassification
        n = getattr(getattr(model, "config", None), "num_labels", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_channels(values, name: str, channels: int) -> None:
    """``values`` (a --mean or --std) must give one number per input channel."""
    from tokenopt.errors import DataError

    if values is not None and len(values) != channels:
        raise DataError(f"{name}: {len(values)} value{'s' if len(values) != 1 else ''} given "
                        f"({','.join(f'{v:g}' for v in values)}), but the input has {channels} channels: "
                        f"give {channels}, one per channel, e.g. {name} " + ",".join(["0.5"] * channels) + ".")
