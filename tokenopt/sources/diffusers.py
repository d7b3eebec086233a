"""``diffusers:<dir>``: a diffusers denoiser (UNet or DiT) from a ``save_pretrained`` folder, float32, eval mode.

The folder is a model's own (config.json with ``_class_name``) or a whole pipeline's
(model_index.json; its ``unet/`` or ``transformer/`` is taken). diffusers is optional
(``pip install 'tokenopt[diffusion]'``). Nothing is downloaded.

A denoiser takes several inputs, so the model carries ``tokenopt_example``: a
:class:`DenoiserInputs` that makes its example call from the config (latent of ``sample_size``
and ``in_channels``, a timestep per image, text states of ``cross_attention_dim`` /
``caption_channels``, class labels); :func:`tokenopt.analysis.example.example_input_for` calls it.
The base dict carries the class and the config, so an artifact rebuilds the model without the folder::

    {"kind": "diffusers", "spec": "diffusers:DIR", "class": "UNet2DConditionModel", "config": {...}}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tokenopt.errors import ModelLoadError
from tokenopt.sources.registry import FolderSource, register_source, require
from tokenopt.sources.spec import first_line

if TYPE_CHECKING:
    from torch import nn

# the classes tokenopt serves -> the inputs they take (see DenoiserInputs)
DIFFUSERS_CLASSES = ("UNet2DConditionModel", "UNet2DModel", "DiTTransformer2DModel", "PixArtTransformer2DModel")
# diffusers' Upsample2D takes another path from a batch of 64 on, so torch.export captures batches below it
MAX_BATCH = 63
TEXT_TOKENS = 77          # a CLIP text encoder's sequence length (SD's and PixArt's prompt states)
_WEIGHT_FILES = ("*.safetensors", "*.bin")


@register_source
class DiffusersSource(FolderSource):
    kind, prefix = "diffusers", "diffusers:"
    help = "diffusers:<folder> (a diffusers UNet/DiT or pipeline folder)"
    library = "diffusers"

    def load_folder(self, folder: str):
        return load_diffusers(folder)

    def build(self, base: dict):
        return build_diffusers(base)


class DenoiserInputs:
    """The example call of a diffusers denoiser, from its config: ``(args, kwargs, batch_dims)``.

    ``size`` (H, W) overrides the latent size (the CLI's ``--input-size``). Every input has its batch
    on axis 0 (the timestep and the class labels are one per image). Picklable, so a model that
    carries it can be saved whole.
    """

    def __init__(self, class_name: str, config: dict):
        self.class_name = class_name
        self.config = dict(config)

    def latent_size(self) -> tuple[int, int]:
        side = self.config.get("sample_size") or 32
        return tuple(side) if isinstance(side, (list, tuple)) else (int(side), int(side))   # type: ignore[return-value]

    def __call__(self, batch: int = 2, size: tuple[int, int] | None = None, seed: int = 0):
        import torch

        gen = torch.Generator().manual_seed(seed)
        c = self.config
        h, w = size or self.latent_size()
        latent = torch.randn(batch, int(c.get("in_channels") or 4), h, w, generator=gen)
        steps = int(c.get("num_train_timesteps") or 1000)
        t = torch.randint(0, steps, (batch,), generator=gen)
        if self.class_name == "UNet2DConditionModel":
            dim = c.get("cross_attention_dim") or 768
            dim = dim[0] if isinstance(dim, (list, tuple)) else dim
            text = torch.randn(batch, TEXT_TOKENS, int(dim), generator=gen)
            return (latent, t), {"encoder_hidden_states": text, **self._class_labels(batch, gen)}, (0, 0, 0) + \
                (0,) * bool(c.get("num_class_embeds"))
        if self.class_name == "UNet2DModel":
            return (latent, t), self._class_labels(batch, gen), (0, 0) + (0,) * bool(c.get("num_class_embeds"))
        if self.class_name == "DiTTransformer2DModel":
            classes = int(c.get("num_embeds_ada_norm") or 1000)
            labels = torch.randint(0, classes, (batch,), generator=gen)
            return (latent,), {"timestep": t, "class_labels": labels}, (0, 0, 0)
        # PixArtTransformer2DModel: prompt states of caption_channels; no resolution/aspect inputs
        text = torch.randn(batch, TEXT_TOKENS, int(c.get("caption_channels") or 4096), generator=gen)
        return (latent,), {"encoder_hidden_states": text, "timestep": t}, (0, 0, 0)


    def _class_labels(self, batch: int, gen) -> dict:
        """A class-conditional UNet (``num_class_embeds``) refuses a call without its labels."""
        import torch

        classes = self.config.get("num_class_embeds")
        return {"class_labels": torch.randint(0, int(classes), (batch,), generator=gen)} if classes else {}


def diffusers_folder(directory: str) -> tuple[Path, str, dict]:
    """``(model folder, class name, config)`` of a model or pipeline folder; ModelLoadError naming what is wrong."""
    root = Path(directory).expanduser()
    spec = f"diffusers:{directory}"
    if not root.is_dir():
        raise ModelLoadError(f"{spec}: no such directory: {root}\n"
                             "  Name a folder written by save_pretrained (a UNet's or DiT's, or a whole pipeline's).")
    if not (root / "config.json").is_file() and (root / "model_index.json").is_file():
        parts = [p for p in ("unet", "transformer") if (root / p / "config.json").is_file()]
        if not parts:
            raise ModelLoadError(f"{spec}: the pipeline folder {root} has neither unet/ nor transformer/ "
                                 "(with a config.json), so it holds no denoiser tokenopt can read.\n"
                                 "  Name a pipeline folder with its unet/ or transformer/, or the denoiser's own folder.")
        root = root / parts[0]
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{spec}: {root} has no config.json (nor model_index.json), so it is not a diffusers "
                             "folder.\n  Name the folder written by model.save_pretrained(...) or "
                             "pipeline.save_pretrained(...).")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{spec}: cannot read {cfg_file}: {e}\n  The file is damaged: save the model again.") from None
    class_name = config.get("_class_name")
    if class_name not in DIFFUSERS_CLASSES:
        raise ModelLoadError(f"{spec}: {root} holds a {class_name or 'model with no _class_name'}, which tokenopt "
                             f"does not support.\n  Supported diffusers classes: {', '.join(DIFFUSERS_CLASSES)}.")
    return root, class_name, config


def load_diffusers(directory: str) -> tuple[nn.Module, dict]:
    """``diffusers:<dir>``: the denoiser a folder holds, float32, eval mode, with its example inputs attached.

    A folder without a weights file builds the architecture with random weights (as ``hf:`` does).
    """
    spec = f"diffusers:{directory}"
    root, class_name, _ = diffusers_folder(directory)
    diffusers = require("diffusers", spec)
    import torch

    cls = getattr(diffusers, class_name)
    try:
        if any(f for pattern in _WEIGHT_FILES for f in root.glob(pattern)):
            model = cls.from_pretrained(str(root), local_files_only=True, torch_dtype=torch.float32,
                                        low_cpu_mem_usage=False)   # no note about accelerate
        else:
            model = cls.from_config(cls.load_config(str(root)))
    except Exception as e:
        raise ModelLoadError(f"{spec}: diffusers could not load {class_name}: {type(e).__name__}: "
                             f"{first_line(e)}") from None
    config = dict(model.config)
    if class_name == "UNet2DModel" and not _has_attention(model):
        raise ModelLoadError(f"{spec}: this UNet2DModel has no attention blocks, so there are no tokens to reduce.\n"
                             "  Use a UNet2DModel with attention down/up blocks (AttnDownBlock2D, AttnUpBlock2D).")
    model = model.float().eval()
    _attach(model, class_name)
    base = {"kind": "diffusers", "spec": spec, "class": class_name, "config": _plain(config)}
    return model, base


def build_diffusers(base: dict) -> nn.Module:
    """Rebuild a diffusers base (random weights) from the config an artifact stored."""
    diffusers = require("diffusers", base.get("spec") or "a diffusers model")
    cls = getattr(diffusers, base["class"])
    model = cls.from_config(dict(base["config"])).float().eval()
    _attach(model, base["class"])
    return model


def _attach(model, class_name: str) -> None:
    """What the analysis reads from a denoiser: its example call and its batch limit."""
    model.tokenopt_example = DenoiserInputs(class_name, dict(model.config))
    model.tokenopt_max_batch = MAX_BATCH


def _has_attention(model) -> bool:
    from diffusers.models.attention_processor import Attention

    return any(isinstance(m, Attention) for m in model.modules())


def _plain(config: dict) -> dict:
    """The config as JSON-able data (diffusers' FrozenDict holds tuples and lists)."""
    return json.loads(json.dumps(dict(config), default=list))
