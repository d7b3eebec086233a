"""The two demo generators' architectures, and how any class-conditional denoiser is called.

Both are diffusers classes, so the diffusers analysis applies to them unchanged:

- ``DiTTransformer2DModel`` with ``num_embeds_ada_norm=10``: 1 x 32 x 32 images, 4 x 4 patches
  (an 8 x 8 grid of 64 tokens), adaLN-Zero conditioning on the timestep and the class.
- ``UNet2DConditionModel`` with ``num_class_embeds=10``: the class is added to the timestep
  embedding; its spatial transformers (self-attention, cross-attention, GEGLU feed-forward, the
  blocks tomesd merges in) see a 16 x 16 grid. It is the SD-shaped UNet, so it also takes text
  states; the demo gives it zeros (keys of zero attend uniformly to nothing: the class is the only
  condition).

A "generator" here is any diffusers denoiser with class labels (``num_embeds_ada_norm`` on a DiT,
``num_class_embeds`` on a UNet): :func:`class_count` says how many, :func:`call_inputs` makes its call.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tokenopt.errors import ModelLoadError

if TYPE_CHECKING:
    from tokenopt.sources.diffusers import DenoiserInputs

# imported late below: the demo source (tokenopt.sources.demo) imports this module while
# tokenopt.sources is still being set up

DIT = dict(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=4,
           sample_size=32, patch_size=4, num_embeds_ada_norm=10, norm_num_groups=1)
UNET = dict(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
            norm_num_groups=8, num_class_embeds=10)


def build(class_name: str, config: dict) -> nn.Module:
    """A random-init generator of a diffusers class (float32, eval mode) carrying its example inputs."""
    from tokenopt.sources.diffusers import build_diffusers

    return build_diffusers({"kind": "diffusers", "spec": f"a {class_name}", "class": class_name, "config": config})


def example_of(model: nn.Module) -> DenoiserInputs | None:
    """The denoiser's example-call maker (``tokenopt_example``) of a diffusers model, else None."""
    from tokenopt.sources.diffusers import DenoiserInputs

    found = getattr(model, "tokenopt_example", None)
    return found if isinstance(found, DenoiserInputs) else None


def class_count(example: "DenoiserInputs | None") -> int | None:
    """How many classes the denoiser is conditioned on, None when it is not class-conditional."""
    if example is None:
        return None
    key = {"DiTTransformer2DModel": "num_embeds_ada_norm", "UNet2DConditionModel": "num_class_embeds",
           "UNet2DModel": "num_class_embeds"}.get(example.class_name)
    n = example.config.get(key) if key else None
    return int(n) if n else None


def image_shape(example: "DenoiserInputs") -> tuple[int, int, int]:
    """(C, H, W) of the images (latents) the denoiser draws."""
    h, w = example.latent_size()
    return int(example.config.get("in_channels") or 4), h, w


def call_inputs(example: "DenoiserInputs", x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one denoising call on images ``x`` at steps ``t`` for classes ``labels``,
    in the form the example call (and so a captured graph) has."""
    if example.class_name == "DiTTransformer2DModel":
        return (x,), {"timestep": t, "class_labels": labels}
    if example.class_name == "UNet2DConditionModel":
        from tokenopt.sources.diffusers import TEXT_TOKENS

        dim = example.config.get("cross_attention_dim") or 768
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        return (x, t), {"encoder_hidden_states": x.new_zeros(len(x), TEXT_TOKENS, int(dim)), "class_labels": labels}
    if example.class_name == "UNet2DModel":
        return (x, t), {"class_labels": labels}
    raise ModelLoadError(f"a {example.class_name} takes no class labels, so it cannot generate a chosen digit")


def predicted_noise(output) -> torch.Tensor:
    """The tensor a denoiser's output holds (a diffusers output object, a tuple or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]
