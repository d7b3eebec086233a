"""``open_clip:<arch>[?key=value&...]``: an open_clip architecture's visual tower, random init.

open_clip is optional (``pip install 'tokenopt[openclip]'``); nothing is downloaded
(``pretrained=None``): trained weights come from ``--weights FILE`` (read ``weights_only``), whose
``visual.`` keys are the tower's when the checkpoint holds the whole CLIP model. The tower carries
``tokenopt_data_config``: open_clip's own preprocessing (size, mean, std, interpolation).
"""
from __future__ import annotations

import difflib
import logging

from tokenopt.errors import ModelLoadError
from tokenopt.sources.registry import NamedSource, register_source, require
from tokenopt.sources.spec import first_line

# the text tower is thrown away: build a tiny one instead of the real one (fast, and it never
# asks for a Hugging Face tokenizer or text model)
_TINY_TEXT = {"context_length": 4, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1}
_OPEN_CLIP_TOP = ("embed_dim", "quick_gelu", "force_image_size", "force_patch_dropout")


@register_source
class OpenClipSource(NamedSource):
    kind, prefix = "open_clip", "open_clip:"
    help = "open_clip:<arch>[?key=value&...] (its visual tower, random weights)"

    def build_named(self, name: str, kwargs: dict):
        return build_open_clip(name, kwargs)

    def weights_for(self, state: dict) -> dict:
        return open_clip_visual_state(state)


def build_open_clip(name: str, kwargs: dict):
    """open_clip's ``<name>`` visual tower, random init. Keyword arguments change the vision config
    (``image_size``, ``patch_size``, ``width``, ``layers``, ``head_width``...), except ``embed_dim``
    and ``quick_gelu``, which are the model's."""
    open_clip = require("open_clip", f"open_clip:{name}")
    if not name:
        raise ModelLoadError("open_clip: needs an architecture name, e.g. open_clip:ViT-B-32")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown open_clip architecture {name!r}.{hint}\n"
                             "  List them with `python -c \"import open_clip; print(open_clip.list_models())\"`.")
    top = {k: v for k, v in kwargs.items() if k in _OPEN_CLIP_TOP}
    vision = {**cfg["vision_cfg"], **{k: v for k, v in kwargs.items() if k not in _OPEN_CLIP_TOP}}
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)   # "no pretrained weights loaded": that is the point
    try:
        model = open_clip.create_model(name, pretrained=None, vision_cfg=vision, text_cfg=dict(_TINY_TEXT), **top)
    except Exception as e:
        raise ModelLoadError(f"open_clip could not build {name!r} with {kwargs or 'no arguments'}: "
                             f"{type(e).__name__}: {first_line(e)}") from None
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
