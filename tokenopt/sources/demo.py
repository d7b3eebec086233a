"""``demo:NAME``: a trained demo ViT, read from the cache or the package's shipped weights; loading never trains.

The cache (what ``tokenopt demo --retrain`` wrote) comes first, then the weights shipped in the
package (:mod:`tokenopt.demo_shipped`, sha256-checked). Training is ``tokenopt demo`` (or
:func:`tokenopt.demo.demo_model`): loading a model must not start minutes of work, and a model
that is missing or stale is a user error that says so. The registry of demo models is
:mod:`tokenopt.demo_specs`; weights trained from another spec are stale and not used.
"""
from __future__ import annotations

import os

from tokenopt import demo_shipped
from tokenopt.demo_specs import DEMOS, demo_files, describe, read_cached
from tokenopt.errors import ModelLoadError
from tokenopt.sources.generator_specs import GENERATORS, load_generator
from tokenopt.sources.registry import Source, build_arch, register_source


@register_source
class DemoSource(Source):
    kind, prefix = "demo", "demo:"
    help = (" | ".join(f"demo:{name}" for name in DEMOS) + " (demo ViTs trained by `tokenopt demo`) | "
            + " | ".join(f"demo:{name}" for name in GENERATORS) + " (demo generators)")
    file_wins = True

    def load(self, spec: str):
        name = spec[len(self.prefix):]
        return load_demo(name), {"kind": self.kind, "name": name}

    def build(self, base: dict):
        return load_demo(base["name"])

    def to_spec(self, base: dict) -> str:
        return f"{self.prefix}{base['name']}"

    def arch_conflict(self, spec: str) -> str:
        return f"{spec} is a trained demo model; --arch is only for weight files."


def load_demo(name: str):
    """The trained demo model ``name`` (eval mode) from the cache or the package, or a message saying how to train it."""
    if name in GENERATORS:   # the demo diffusion models: their own registry and cache entries
        return load_generator(name)
    if name not in DEMOS:
        raise ModelLoadError(f"unknown demo model '{name}': choose one of {', '.join([*DEMOS, *GENERATORS])}")
    found = find_demo(name)
    if found is None:
        weights, _ = demo_files(name)
        raise ModelLoadError(
            f"demo:{name} is not trained yet (no up-to-date weights at {weights}).\n"
            f"  Run `tokenopt demo --model {name}` first: it trains the demo model once (a few CPU minutes) "
            "and caches it under $TOKENOPT_CACHE (default ~/.cache/tokenopt).")
    return found[0]


def find_demo(name: str, cache_dir: str | os.PathLike | None = None):
    """The demo model ``name`` and its info dict from the cache, else from the shipped weights; None if neither
    was trained from its current spec."""
    return cached_demo(name, cache_dir) or shipped_demo(name)


def shipped_demo(name: str):
    """The demo model ``name`` (eval mode) and its info dict from the package data, if it ships for the current
    spec. A shipped file that fails its sha256 check is a ModelLoadError: the install is damaged."""
    spec = DEMOS[name]
    entry = demo_shipped.model_entry(name, spec.digest())
    if entry is None:
        return None
    info = dict(entry["info"])
    model = build_arch(info["arch"])[0]
    model.load_state_dict(demo_shipped.read_state(entry["file"]))
    describe(model, spec)
    info["weights"] = str(demo_shipped.SHIPPED_DIR / entry["file"])
    info["shipped"] = True
    return model.eval(), info


def cached_demo(name: str, cache_dir: str | os.PathLike | None = None):
    """The cached demo model ``name`` (eval mode) and its info dict, if it was trained from its current spec.

    None when there is no cache entry, when it was trained from another spec, or when it cannot
    be read: a damaged or foreign entry is retrained (by ``tokenopt demo``) rather than trusted.
    """
    spec = DEMOS[name]
    found = read_cached(name, spec.digest(), lambda info: build_arch(info["arch"])[0], cache_dir)
    if found is not None:
        describe(found[0], spec)
    return found
