"""``hf:<dir>``: a Hugging Face ``save_pretrained`` folder (config.json + weights), float32, eval mode.

Nothing is downloaded (``local_files_only=True``). transformers is optional (``pip install
'tokenopt[hf]'``): a missing install is one message naming the command. Multimodal folders
(CLIP, SigLIP) give their vision tower.

The base dict carries the whole config, so an artifact rebuilds the model without the folder::

    {"kind": "hf", "spec": "hf:DIR", "class": "ViTModel", "config": {...}, "data_config": {...}}

The model carries ``tokenopt_data_config``: its own preprocessing, from the folder's
``preprocessor_config.json``, in timm's data-config keys, which
:func:`tokenopt.data.config.data_config` uses instead of timm's defaults.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenopt.errors import ModelLoadError
from tokenopt.sources.registry import FolderSource, SourceWarning, register_source, require
from tokenopt.sources.spec import first_line

if TYPE_CHECKING:
    from torch import nn

# architectures (config.json) -> the class tokenopt builds. Multimodal models give their vision
# tower (its weights sit under the same ``vision_model.`` keys in both).
HF_CLASSES = {
    "ViTForImageClassification": "ViTForImageClassification", "ViTModel": "ViTModel",
    "DeiTForImageClassification": "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher": "DeiTForImageClassificationWithTeacher", "DeiTModel": "DeiTModel",
    "BeitForImageClassification": "BeitForImageClassification", "BeitModel": "BeitModel",
    "CLIPVisionModel": "CLIPVisionModel", "CLIPVisionModelWithProjection": "CLIPVisionModelWithProjection",
    "CLIPModel": "CLIPVisionModelWithProjection",
    "SiglipVisionModel": "SiglipVisionModel", "SiglipForImageClassification": "SiglipForImageClassification",
    "SiglipModel": "SiglipVisionModel",
    "Dinov2Model": "Dinov2Model", "Dinov2ForImageClassification": "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel": "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification": "Dinov2WithRegistersForImageClassification",
    "SwinModel": "SwinModel", "SwinForImageClassification": "SwinForImageClassification",
}
# config.json without "architectures": the model_type's bare backbone
HF_MODEL_TYPES = {
    "vit": "ViTModel", "deit": "DeiTModel", "beit": "BeitModel", "clip": "CLIPVisionModelWithProjection",
    "clip_vision_model": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel",
    "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel", "swin": "SwinModel",
}
# model_type -> why tokenopt refuses the family: ones people reach for that no rewrite can serve (yet)
# Swin V2 differs from Swin (supported) where a reduction inside windows needs to read it: its logits are a
# cosine similarity times a learned per-head scale, and its relative bias comes from a small MLP over log-spaced
# coordinates (continuous position bias) rather than a gathered table
_WINDOWED = ("its attention runs within windows with cosine attention and a continuous position bias (an MLP over "
             "relative coordinates) that tokenopt does not read yet; Swin (v1) is supported.")
HF_UNSUPPORTED = {
    "swinv2": f"a Swin V2 model, not yet supported: {_WINDOWED}",
    "vit_mae": ("a ViTMAE (masked autoencoder), not supported: its forward masks a random subset of the patches "
                "and shuffles the rest on every call (in eval mode too, and with mask_ratio=0), so its outputs "
                "change from one call to the next and no graph rewrite can be checked against it."),
}
# PIL resample codes in preprocessor_config.json -> timm's interpolation names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
PREPROCESSOR_FILE = "preprocessor_config.json"


@contextlib.contextmanager
def _quiet_transformers(transformers):
    """No progress bars or load reports: tokenopt reports missing weights itself, as an error."""
    log = transformers.utils.logging
    level = log.get_verbosity()
    log.set_verbosity_error()
    bars = getattr(log, "is_progress_bar_enabled", lambda: True)()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()


@register_source
class HFSource(FolderSource):
    kind, prefix = "hf", "hf:"
    help = "hf:<folder> (a save_pretrained folder)"
    library = "Hugging Face"

    def load_folder(self, folder: str):
        return load_hf(folder)

    def build(self, base: dict):
        return build_hf(base)


def hf_class_name(config: dict, where: str) -> str:
    """The class tokenopt builds for a config.json: from ``architectures``, else ``model_type``."""
    for arch in config.get("architectures") or ():
        if arch in HF_CLASSES:
            return HF_CLASSES[arch]
    model_type = config.get("model_type")
    if model_type in HF_MODEL_TYPES and not config.get("architectures"):
        return HF_MODEL_TYPES[model_type]
    if model_type in HF_UNSUPPORTED:
        named = ", ".join(config.get("architectures") or ()) or f"model_type {model_type!r}"
        raise ModelLoadError(f"{where}: {named} is {HF_UNSUPPORTED[model_type]}")
    named = ", ".join(config.get("architectures") or ()) or f"model_type {model_type!r}"
    raise ModelLoadError(f"{where}: tokenopt does not know how to build {named} as a vision model.\n"
                         "  Supported: ViT, DeiT, BEiT, Swin, CLIP and SigLIP vision towers, DINOv2 (with and without "
                         "registers). For another class, pass a factory instead: package.module:build_model.")


def load_hf(directory: str) -> tuple[nn.Module, dict]:
    """``hf:<dir>``: the model a ``save_pretrained`` folder holds, float32, eval mode.

    A folder with config.json but no weights file builds the architecture with random weights
    (as ``timm:`` names do); weights that do not cover the model are an error, not a silent
    random init.
    """
    root = Path(directory).expanduser()
    spec = f"hf:{directory}"
    if not root.is_dir():
        raise ModelLoadError(f"{spec}: no such directory: {root}\n"
                             "  Name a folder written by save_pretrained (it holds config.json and the weights).")
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{spec}: {root} has no config.json, so it is not a Hugging Face model folder.\n"
                             "  Name the folder written by model.save_pretrained(...) (it holds config.json "
                             "and model.safetensors), or save the model there first.")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{spec}: cannot read {cfg_file}: {e}\n  The file is damaged: save the model again.") from None
    class_name = hf_class_name(config, spec)
    transformers = require("transformers", spec)
    import torch

    cls = getattr(transformers, class_name)
    has_weights = any(f for pattern in _WEIGHT_FILES for f in root.glob(pattern))
    with _quiet_transformers(transformers):
        try:
            conf = cls.config_class.from_pretrained(str(root), local_files_only=True)
            if "vision_config" in config and "projection_dim" in config:
                # a whole CLIP folder: the projection's width is the model's, not the tower's
                conf.projection_dim = config["projection_dim"]
            if has_weights:
                model, info = cls.from_pretrained(str(root), config=conf, local_files_only=True,
                                                  dtype=torch.float32, output_loading_info=True)
            else:
                model, info = cls(conf), {}
        except Exception as e:
            raise ModelLoadError(f"{spec}: transformers could not load {class_name}: {type(e).__name__}: "
                                 f"{first_line(e)}") from None
    missing = list((info or {}).get("missing_keys") or ())
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{spec}: the weights in {root} do not cover {class_name}: {len(missing)} missing, "
                             f"e.g. {', '.join(sorted(missing)[:5])}{more}.\n  The folder holds another "
                             "architecture than config.json names: save the model again with save_pretrained.")
    model = model.float().eval()
    data_cfg = hf_data_config(root)
    side = getattr(conf, "image_size", None)
    if "input_size" not in data_cfg and isinstance(side, int):   # no image processor saved: the model's own size
        data_cfg["input_size"] = (3, side, side)
    if data_cfg:
        model.tokenopt_data_config = data_cfg
    if not (root / PREPROCESSOR_FILE).is_file():
        warnings.warn(_default_preprocessing_note(spec, model), SourceWarning, stacklevel=2)
    base = {"kind": "hf", "spec": spec, "class": class_name, "config": conf.to_dict(), "data_config": data_cfg}
    return model, base


def build_hf(base: dict) -> nn.Module:
    """Rebuild a Hugging Face base (random weights) from the config an artifact stored."""
    transformers = require("transformers", base.get("spec") or "a Hugging Face model")
    cls = getattr(transformers, base["class"])
    with _quiet_transformers(transformers):
        config = cls.config_class.from_dict(dict(base["config"]))
        model = cls(config).float().eval()
    if base.get("data_config"):
        model.tokenopt_data_config = dict(base["data_config"])
    return model


def _default_preprocessing_note(spec: str, model) -> str:
    """What preprocessing a folder without an image processor gets (timm's defaults at the config's size)."""
    from timm.data import resolve_data_config

    cfg = {**resolve_data_config({}, model=model), **(getattr(model, "tokenopt_data_config", None) or {})}
    _, h, w = cfg["input_size"]
    size = "the config's image_size" if getattr(model.config, "image_size", None) else "the default size"
    return (f"{spec}: the folder has no {PREPROCESSOR_FILE}, so images will be preprocessed with defaults: "
            f"{h}x{w} ({size}), "
            f"{cfg['interpolation']} resize, crop_pct {cfg['crop_pct']:g}, mean {_numbers(cfg['mean'])}, "
            f"std {_numbers(cfg['std'])}.\n  If the model was trained with other preprocessing, save its image "
            "processor into the folder (processor.save_pretrained(folder)) or pass --mean, --std, "
            "--interpolation and --crop-pct.")


def _numbers(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def hf_data_config(root: Path) -> dict:
    """preprocessor_config.json as timm data-config keys (input_size, interpolation, mean, std,
    crop_pct, crop_mode); {} when the folder has none.

    Hugging Face resizes either the shortest edge (then centre-crops: timm's ``center`` mode with
    ``crop_pct = crop / shortest_edge``) or straight to height x width (timm's ``squash`` mode).
    """
    path = root / PREPROCESSOR_FILE
    if not path.is_file():
        return {}
    try:
        p = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}\n  The file is damaged: save the image processor again.") from None
    size = p.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = p.get("crop_size") if p.get("do_center_crop") else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    cfg: dict[str, Any] = {}
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        h, w = (int(crop["height"]), int(crop["width"])) if crop else (edge, edge)
        cfg.update(input_size=(3, h, w), crop_pct=min(h, w) / edge, crop_mode="center")
    elif "height" in size:
        h, w = int(size["height"]), int(size["width"])
        if crop:   # resize to h x w, then crop: the crop is the input
            ch, cw = int(crop["height"]), int(crop["width"])
            cfg.update(input_size=(3, ch, cw), crop_pct=ch / h, crop_mode="squash")
        else:
            cfg.update(input_size=(3, h, w), crop_pct=1.0, crop_mode="squash")
    if "resample" in p:
        cfg["interpolation"] = _RESAMPLE.get(int(p["resample"]), "bilinear")
    if p.get("do_normalize", True) and p.get("image_mean") is not None:
        cfg["mean"], cfg["std"] = tuple(map(float, p["image_mean"])), tuple(map(float, p["image_std"]))
    elif not p.get("do_normalize", True):
        cfg["mean"], cfg["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return cfg
