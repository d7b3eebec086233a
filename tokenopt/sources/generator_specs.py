"""The demo generators as data: which diffusers model, how it is trained, where its cache lives.

Like the demo ViTs (:mod:`tokenopt.demo_specs`): weights are cached as
``<cache>/demos/NAME.safetensors`` beside ``NAME.json``, whose ``spec_digest`` ties them to the spec
here; a changed spec makes the cache stale (loading refuses it, training replaces it). Trained
weights also ship in the package (``tokenopt/generation/weights/``, float16, sha256-checked through
:mod:`tokenopt.demo_shipped` as the demo ViTs'), so a clean install draws digits without training.
Loading (``demo:NAME`` through :mod:`tokenopt.sources.demo`) reads the cache, else the shipped
weights of the same spec, and never trains; training is :mod:`tokenopt.generation.train`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenopt import demo_shipped
from tokenopt.demo_specs import demo_files, read_cached
from tokenopt.errors import ModelLoadError
from tokenopt.sources.generator_models import DIT, UNET, build

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "generation" / "weights"     # package data: tools/ship_generator_weights.py


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything that determines a demo generator's weights."""

    class_name: str
    config: dict
    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    ema: float = 0.995          # the cached weights are an exponential moving average of the trained ones
    seed: int = 0

    def digest(self) -> str:
        text = json.dumps({"v": FORMAT_VERSION, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


GENERATORS: dict[str, GeneratorSpec] = {
    # 45 steps an epoch (1,437 digits, batch 32). Trained with 1 thread on 2 cores shared with other
    # jobs (load ~5; 2 threads were 5x slower there): see docs/generation.md for the times and figures
    "digits-dit": GeneratorSpec("DiTTransformer2DModel", DIT, epochs=60, batch_size=32, lr=2e-3),
    "digits-unet": GeneratorSpec("UNet2DConditionModel", UNET, epochs=40, batch_size=32, lr=2e-3),
}


def cached_generator(name: str, cache_dir: str | os.PathLike | None = None):
    """The cached demo generator ``name`` (eval mode) and its info, if trained from its current spec, else None."""
    spec = GENERATORS[name]
    return read_cached(name, spec.digest(), lambda info: build(spec.class_name, spec.config), cache_dir)


def shipped_generator(name: str, folder: str | os.PathLike | None = None):
    """The demo generator ``name`` (eval mode) and its info from the package data, if shipped for its current
    spec, else None; a ModelLoadError if the shipped file is damaged (its sha256 is not the manifest's)."""
    folder = Path(folder or SHIPPED_DIR)
    spec = GENERATORS[name]
    entry = demo_shipped.model_entry(name, spec.digest(), folder)
    if entry is None:
        return None
    state = demo_shipped.read_state(entry["file"], folder,
                                    retrain=f"`python -m tokenopt.generation.train {name}` to train it into the cache")
    model = build(spec.class_name, spec.config)
    model.load_state_dict(state)
    return model.eval(), {**entry["info"], "weights": str(folder / entry["file"]), "shipped": True}


def load_generator(name: str):
    """The trained demo generator ``name``: cached, else shipped, else a message saying how to train it."""
    found = cached_generator(name) or shipped_generator(name)
    if found is None:
        weights, _ = demo_files(name)
        raise ModelLoadError(
            f"demo:{name} is not trained yet (no up-to-date weights at {weights}, none shipped for its spec).\n"
            f"  Run `python -m tokenopt.generation.train {name}` first: it trains the demo generator once "
            "(CPU minutes) and caches it under $TOKENOPT_CACHE (default ~/.cache/tokenopt).")
    return found[0]
