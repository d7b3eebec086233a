"""Model families beyond timm: Hugging Face ``save_pretrained`` folders, open_clip and torchvision ViTs.

    hf:<dir>                        a folder written by ``save_pretrained`` (config.json + weights)
    open_clip:<arch>[?key=value]    an open_clip architecture, its visual tower, random init
    torchvision:<name>[?key=value]  a torchvision model (``torchvision.models.get_model``), random init

Nothing is downloaded: Hugging Face loads with ``local_files_only=True``, open_clip with
``pretrained=None``, torchvision with ``weights=None``; trained weights come from local files
(the folder itself for ``hf:``, ``--weights FILE`` for the others, read ``weights_only``).

transformers and open_clip are optional (``pip install 'tokenopt[hf]'``, ``'tokenopt[openclip]'``):
the core install stays lean and a missing one is one message naming the command.

Each builder returns ``(model, base)``; ``base`` is what an artifact stores to rebuild the model
without the original folder (a Hugging Face base carries its whole config) plus ``"spec"``, the
string the user gave. A model may carry ``tokenopt_data_config``: its own preprocessing (from the
folder's ``preprocessor_config.json``, or open_clip's mean/std), in timm's data-config keys, which
:func:`tokenopt.data.config.data_config` uses instead of timm's defaults.
"""
from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from tokenopt.errors import ModelLoadError

EXTRAS = {"transformers": "hf", "open_clip": "openclip"}

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
}
# config.json without "architectures": the model_type's bare backbone
HF_MODEL_TYPES = {
    "vit": "ViTModel", "deit": "DeiTModel", "beit": "BeitModel", "clip": "CLIPVisionModelWithProjection",
    "clip_vision_model": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel",
    "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
}
# PIL resample codes in preprocessor_config.json -> timm's interpolation names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def require(module: str, what: str):
    """Import an optional dependency, or one message naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module]
        raise ModelLoadError(f"{what} needs the Python package {module!r}, which is not installed.\n"
                             f"  Install it with: pip install 'tokenopt[{extra}]'") from None


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


# ----------------------------------------------------------------------------------------------
# Hugging Face

def hf_class_name(config: dict, where: str) -> str:
    """The class tokenopt builds for a config.json: from ``architectures``, else ``model_type``."""
    for arch in config.get("architectures") or ():
        if arch in HF_CLASSES:
            return HF_CLASSES[arch]
    model_type = config.get("model_type")
    if model_type in HF_MODEL_TYPES and not config.get("architectures"):
        return HF_MODEL_TYPES[model_type]
    named = ", ".join(config.get("architectures") or ()) or f"model_type {model_type!r}"
    raise ModelLoadError(f"{where}: tokenopt does not know how to build {named} as a vision model.\n"
                         "  Supported: ViT, DeiT, BEiT, CLIP and SigLIP vision towers, DINOv2 (with and without "
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
                                 f"{_first_line(e)}") from None
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


def hf_data_config(root: Path) -> dict:
    """preprocessor_config.json as timm data-config keys (input_size, interpolation, mean, std,
    crop_pct, crop_mode); {} when the folder has none.

    Hugging Face resizes either the shortest edge (then centre-crops: timm's ``center`` mode with
    ``crop_pct = crop / shortest_edge``) or straight to height x width (timm's ``squash`` mode).
    """
    path = root / "preprocessor_config.json"
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


# ----------------------------------------------------------------------------------------------
# open_clip

# the text tower is thrown away: build a tiny one instead of the real one (fast, and it never
# asks for a Hugging Face tokenizer or text model)
_TINY_TEXT = {"context_length": 4, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1}
_OPEN_CLIP_TOP = ("embed_dim", "quick_gelu", "force_image_size", "force_patch_dropout")


def build_open_clip(name: str, kwargs: dict) -> nn.Module:
    """open_clip's ``<name>`` visual tower, random init. Keyword arguments change the vision config
    (``image_size``, ``patch_size``, ``width``, ``layers``, ``head_width``...), except ``embed_dim``
    and ``quick_gelu``, which are the model's."""
    open_clip = require("open_clip", f"open_clip:{name}")
    if not name:
        raise ModelLoadError("open_clip: needs an architecture name, e.g. open_clip:ViT-B-32")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown open_clip architecture {name!r}.{hint}\n"
                             "  List them with `python -c \"import open_clip; print(open_clip.list_models())\"`.")
    top = {k: v for k, v in kwargs.items() if k in _OPEN_CLIP_TOP}
    vision = {**cfg["vision_cfg"], **{k: v for k, v in kwargs.items() if k not in _OPEN_CLIP_TOP}}
    import logging

    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)   # "no pretrained weights loaded": that is the point
    try:
        model = open_clip.create_model(name, pretrained=None, vision_cfg=vision, text_cfg=dict(_TINY_TEXT), **top)
    except Exception as e:
        raise ModelLoadError(f"open_clip could not build {name!r} with {kwargs or 'no arguments'}: "
                             f"{type(e).__name__}: {_first_line(e)}") from None
    finally:
        logger.setLevel(level)
    visual = model.visual.float().eval()
    pre = getattr(visual, "preprocess_cfg", None) or {}
    size = pre.get("size") or getattr(visual, "image_size", None)
    if isinstance(size, int):
        size = (size, size)
    data_cfg = {"interpolation": pre.get("interpolation", "bicubic"), "crop_pct": 1.0, "crop_mode": "center"}
    if size:
        data_cfg["input_size"] = (3, int(size[0]), int(size[1]))
    if pre.get("mean") is not None:
        data_cfg["mean"], data_cfg["std"] = tuple(map(float, pre["mean"])), tuple(map(float, pre["std"]))
    visual.tokenopt_data_config = data_cfg
    return visual


def open_clip_visual_state(state: dict) -> dict:
    """The visual tower's weights from an open_clip checkpoint: the ``visual.`` keys of a whole
    CLIP state dict (prefix removed), or the state dict itself when it is the tower's alone."""
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


# ----------------------------------------------------------------------------------------------
# torchvision

def build_torchvision(name: str, kwargs: dict) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, **kwargs)``: random init, never downloads."""
    import torchvision

    if not name:
        raise ModelLoadError("torchvision: needs a model name, e.g. torchvision:vit_b_16")
    names = torchvision.models.list_models()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown torchvision model {name!r}.{hint}\n  Its ViTs: "
                             f"{', '.join(n for n in names if n.startswith('vit_'))}.")
    kwargs = {k: v for k, v in kwargs.items() if k != "weights"}
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs).eval()
    except Exception as e:
        raise ModelLoadError(f"torchvision could not build {name!r} with {kwargs or 'no arguments'}: "
                             f"{type(e).__name__}: {_first_line(e)}\n"
                             "  Check the keyword arguments after '?' (e.g. image_size=64&num_classes=10).") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
