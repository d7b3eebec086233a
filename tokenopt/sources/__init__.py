"""Model sources: where a model comes from (the CLI's ``MODEL``), and how to rebuild it.

A model is named by a *spec*; each kind is one :class:`~tokenopt.sources.registry.Source`,
registered by prefix in its own module::

    timm:vit_small_patch16_224?img_size=64&depth=4     timm.py         a timm architecture, random init (never downloads)
    open_clip:ViT-B-32[?key=value]                     open_clip.py    open_clip's visual tower, random init
    torchvision:vit_b_16[?key=value]                   torchvision.py  a torchvision model, random init
    hf:path/to/folder                                  hf.py           a Hugging Face save_pretrained folder
    diffusers:path/to/folder                           diffusers.py    a diffusers UNet/DiT (or pipeline) folder
    demo:digits-clutter                                demo.py         a trained demo ViT (cache, else shipped)
    mypkg.models:make_vit?dim=256                      factory.py      a factory (any callable returning an nn.Module)
    model.pt / .pth / .bin / .safetensors + arch       checkpoint.py   a state dict or checkpoint, plus ``arch``
    whole_model.pt                                     checkpoint.py   a pickled nn.Module, only with ``trust_pickle``

:func:`load_model` returns the model in eval mode and a *base* dict that says how to rebuild the
architecture (artifacts store it; the weights travel separately)::

    {"kind": "timm", "name": "vit_small_patch16_224", "kwargs": {"img_size": 64}}
    {"kind": "factory", "factory": "mypkg.models:make_vit", "kwargs": {"dim": 256}}
    {"kind": "class", "class": "mypkg.models:MyViT"}          # rebuilt by calling MyViT()
    {"kind": "demo", "name": "digits-clutter"}                # tokenopt's embedded demo models
    {"kind": "hf", "spec": "hf:DIR", "class": "ViTModel", "config": {...}}   # rebuilt from the config alone
    {"kind": "diffusers", "spec": "diffusers:DIR", "class": "UNet2DConditionModel", "config": {...}}
    {"kind": "open_clip" | "torchvision", "name": "...", "kwargs": {...}}

plus ``"weights": <path>`` when the model came from a file (for the record only). Reading and
writing files is :mod:`tokenopt.files`.
"""
from tokenopt.sources.registry import (Source, SourceWarning, arch_help, base_to_spec, build_arch,  # noqa: I001
                                       build_base, model_help, parse_arch, register_source, registered, require,
                                       source_for_spec)
# each module registers its source when imported; the order is the MODEL help's
from tokenopt.sources import timm, open_clip, torchvision, hf, diffusers, demo, factory  # noqa: F401
from tokenopt.sources.checkpoint import arch_with_weights, model_from_checkpoint
from tokenopt.sources.demo import cached_demo, find_demo, load_demo
from tokenopt.sources.factory import build_factory, module_base, resolve_callable
from tokenopt.sources.load import load_model
from tokenopt.sources.rebuild import rebuilt_shapes, shape_difference, state_shapes
from tokenopt.sources.spec import format_kwargs, is_factory_spec, parse_query, parse_value

__all__ = ["Source", "SourceWarning", "arch_help", "arch_with_weights", "base_to_spec", "build_arch", "build_base", "build_factory",
           "cached_demo", "find_demo", "format_kwargs", "is_factory_spec", "load_demo", "load_model", "model_from_checkpoint",
           "model_help", "module_base", "parse_arch", "parse_query", "parse_value", "rebuilt_shapes",
           "register_source", "registered", "require", "resolve_callable", "shape_difference", "source_for_spec",
           "state_shapes"]
