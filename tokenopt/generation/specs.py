"""The demo generators as data: which diffusers model, how it is trained, where its cache lives.

Like the demo ViTs (:mod:`tokenopt.demo_specs`): weights are cached as
``<cache>/demos/NAME.safetensors`` beside ``NAME.json``, whose ``spec_digest`` ties them to the spec
here; a changed spec makes the cache stale (loading refuses it, training replaces it). Loading
(``demo:NAME`` through :mod:`tokenopt.sources.demo`) reads the cache and never trains; training is
:mod:`tokenopt.generation.train`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from tokenopt.demo_specs import demo_files
from tokenopt.errors import ModelLoadError
from tokenopt.generation.models import DIT, UNET, build

FORMAT_VERSION = 1


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
    # 23 steps an epoch (1,437 digits, batch 64). Measured on the 2 shared cores they were developed
    # on (1 thread, load ~19): the DiT 40 epochs in about 35 min; the UNet about 11 min an epoch
    # there, so its 15 epochs were not trained there (an estimate of ~10 min on 2 free cores)
    "digits-dit": GeneratorSpec("DiTTransformer2DModel", DIT, epochs=40, lr=1e-3),
    "digits-unet": GeneratorSpec("UNet2DConditionModel", UNET, epochs=15, lr=2e-3),
}


def cached_generator(name: str, cache_dir: str | os.PathLike | None = None):
    """The cached demo generator ``name`` (eval mode) and its info, if trained from its current spec, else None."""
    spec = GENERATORS[name]
    weights, meta = demo_files(name, cache_dir)
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("spec_digest") != spec.digest():
            return None
        from safetensors.torch import load_file

        model = build(spec.class_name, spec.config)
        model.load_state_dict(load_file(weights))
    except Exception:
        return None
    info["weights"] = str(weights)
    return model.eval(), info


def load_generator(name: str):
    """The trained demo generator ``name`` from the cache, or a message saying how to train it."""
    found = cached_generator(name)
    if found is None:
        weights, _ = demo_files(name)
        raise ModelLoadError(
            f"demo:{name} is not trained yet (no up-to-date weights at {weights}).\n"
            f"  Run `python -m tokenopt.generation.train {name}` first: it trains the demo generator once "
            "(CPU minutes) and caches it under $TOKENOPT_CACHE (default ~/.cache/tokenopt).")
    return found[0]
