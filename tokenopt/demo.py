"""Demo models: small timm ViTs trained on the built-in digits data, so tokenopt can be tried offline.

    model, info = demo_model("digits-clutter")   # the shipped weights; else trains once (minutes), then cached
    info["arch"]   # 'timm:vit_small_patch16_224?img_size=64&patch_size=8&...' rebuilds the architecture
    info["test"]   # {'top1': ..., 'top5': ..., 'n': 360}

``digits``: the 8x8 scans filling a 32 px image, one token per scan pixel (4 px patches, 64 tokens).
``digits-clutter``: a 32 px digit somewhere on a 64 px cluttered canvas, 8 px patches, 64 tokens
of which 39-48 show only clutter: the case token reduction is for.

What each model is (architecture, data, training recipe) is data in :mod:`tokenopt.demo_specs`;
this module trains them. Weights are cached as safetensors beside a json of what they are
(``$TOKENOPT_CACHE``, else ``$XDG_CACHE_HOME/tokenopt``, else ``~/.cache/tokenopt``, see
:mod:`tokenopt.paths`). The json records a hash of the spec that trained them, so changing a spec
retrains rather than reusing stale weights. The package ships weights trained from the current specs
(:mod:`tokenopt.demo_shipped`): without a cache entry those serve, and nothing trains. Loading
``demo:NAME`` (:mod:`tokenopt.sources.demo`) only reads the cache and the shipped weights: training
happens here, through ``tokenopt demo`` (``--retrain``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tokenopt import sources
from tokenopt.demo_specs import (DEMOS, FORMAT_VERSION, MEAN, STD, DemoSpec, demo_files, demo_names, describe,
                                 write_cached)
from tokenopt.errors import ModelLoadError, TokenoptError
from tokenopt.paths import cache_root as default_cache_dir

__all__ = ["DEMOS", "FORMAT_VERSION", "MEAN", "STD", "DemoSpec", "build_arch", "default_cache_dir", "demo_model",
           "demo_names", "format_arch", "parse_arch"]


def format_arch(timm_name: str, kwargs: dict) -> str:
    """``timm:NAME?k=v&...``: the model spec (as ``tokenopt.sources`` reads it) that rebuilds a demo architecture."""
    return sources.base_to_spec({"kind": "timm", "name": timm_name, "kwargs": kwargs})


def parse_arch(arch: str) -> tuple[str, dict]:
    """Inverse of :func:`format_arch`: (timm model name, create_model kwargs)."""
    if not arch.startswith("timm:"):
        raise ModelLoadError(f"architecture '{arch}' is not of the form timm:NAME?key=value&...")
    return sources.parse_query(arch[len("timm:"):])


def build_arch(arch: str) -> nn.Module:
    """An untrained model of architecture ``arch`` (``timm:...``), never downloading weights."""
    return sources.build_arch(arch)[0]


def demo_model(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False,
               quiet: bool = False) -> tuple[nn.Module, dict]:
    """The trained demo model ``name`` (in eval mode) and its info dict: cached, else shipped, else trained now.

    ``force`` retrains even if a cached or shipped copy exists. Training is deterministic for a given
    torch build and thread count, and takes a few minutes on 2 CPU cores. (Loading ``demo:NAME``
    through :func:`tokenopt.sources.load_model` only reads the cache this fills.)
    """
    if name not in DEMOS:
        raise TokenoptError(f"unknown demo model '{name}': choose one of {', '.join(DEMOS)}")
    spec = DEMOS[name]
    if not force:
        cached = sources.find_demo(name, cache_dir)
        if cached is not None:
            return cached
    weights, meta = demo_files(name, cache_dir)
    model, info = _train_demo(name, spec, quiet)
    _save(model, info, weights, meta)
    info["weights"] = str(weights)
    return model, info


def _train_demo(name: str, spec: DemoSpec, quiet: bool) -> tuple[nn.Module, dict]:
    from tokenopt.data import get_dataset, get_loader
    from tokenopt.train import evaluate, train

    torch.manual_seed(spec.seed)  # the initial weights are part of what the spec determines
    model = build_arch(format_arch(spec.timm_name, spec.timm_kwargs))
    size = spec.image_size
    train_set = get_dataset(spec.dataset, "train", size, MEAN, STD, **spec.train_options)
    test_set = get_dataset(spec.dataset, "test", size, MEAN, STD)
    result = train(model, train_set, epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
                   weight_decay=spec.weight_decay, warmup_epochs=spec.warmup_epochs, seed=spec.seed,
                   train_all=True, quiet=quiet)
    test = evaluate(model, get_loader(test_set, 256, train=False))
    describe(model, spec)
    info = {
        "name": name,
        "arch": format_arch(spec.timm_name, spec.timm_kwargs),
        "timm_name": spec.timm_name,
        "timm_kwargs": dict(spec.timm_kwargs),
        "dataset": spec.dataset,
        "image_size": size,
        "mean": list(MEAN),
        "std": list(STD),
        "num_classes": int(spec.timm_kwargs["num_classes"]),
        "test": test,
        "train": {"epochs": result.epochs, "steps": result.steps, "seconds": round(result.seconds, 1),
                  "final_loss": result.epoch_losses[-1], "threads": torch.get_num_threads(),
                  "options": dict(spec.train_options)},
        "spec_digest": spec.digest(),
        "torch": torch.__version__,
        "timm": _timm_version(),
    }
    model.eval()
    return model, info


def _save(model: nn.Module, info: dict, weights: Path, meta: Path) -> None:
    write_cached(model.state_dict(), info, weights, meta,
                 metadata={"arch": info["arch"], "spec_digest": info["spec_digest"]})


def _timm_version() -> str:
    import timm

    return timm.__version__
