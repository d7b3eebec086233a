"""Write the trained demo generators as package data (``tokenopt/generation/weights/``), checked by their samples.

The maintainers' step after ``python -m tokenopt.generation.train --retrain``: each cached generator is
stored in float16 (:mod:`tokenopt.demo_shipped`, as the demo ViTs) with a manifest of sha256 digests,
then read back the way ``demo:NAME`` reads it and sampled beside the cached float32 model from the
same seeded noise. Rounding must not change what the samples show: if demo:digits reads a different
class on more than ``tolerance`` of them, nothing is written.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tokenopt import demo_shipped
from tokenopt.errors import TokenoptError
from tokenopt.sources import generator_specs as specs

__all__ = ["ship_generators"]


def ship_generators(cache_dir: str | os.PathLike | None = None, folder: str | os.PathLike | None = None,
                    names=None, samples: int = 100, steps: int = 25, tolerance: float = 0.0) -> list[dict]:
    """Ship the cached generators ``names`` (default: all) into ``folder`` (default: the package's); the
    others already shipped there stay. Returns one row per generator: {"name", "cached", "shipped"} (class
    accuracy of ``samples`` samples), "changed" (fraction of samples whose class changed), "max_abs" (pixels)."""
    import torch

    from tokenopt.generation import fid, quality

    folder = Path(folder or specs.SHIPPED_DIR)
    names = list(names or specs.GENERATORS)
    unknown = [n for n in names if n not in specs.GENERATORS]
    if unknown:
        raise TokenoptError(f"unknown demo generator '{unknown[0]}': choose from {', '.join(specs.GENERATORS)}")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".weights.", dir=folder.parent))
    try:
        kept = demo_shipped.read_manifest(folder).get("models", {})
        models = {n: e for n, e in kept.items() if n not in names and n in specs.GENERATORS}
        for entry in models.values():       # verified before it is carried over
            shutil.copy2(demo_shipped.verified(entry["file"], folder), staging / entry["file"])
        cached = {}
        for name in names:
            found = specs.cached_generator(name, cache_dir)
            if found is None:
                raise TokenoptError(f"demo:{name} is not in the cache (trained from its current spec): run "
                                    f"`python -m tokenopt.generation.train --retrain {name}` first")
            model, info = found
            cached[name] = model
            models[name] = demo_shipped.store_model(name, model.state_dict(), info, staging)
        demo_shipped.write_manifest(staging, models, {})
        classifier = fid.digits_classifier()
        rows = []
        for name in names:
            shipped, _ = specs.shipped_generator(name, staging)
            gen = quality.generator_of(cached[name])
            labels = quality.balanced_labels(samples, gen.classes)
            a = quality.sample(cached[name], gen, labels, steps=steps, seed=0)
            b = quality.sample(shipped, gen, labels, steps=steps, seed=0)
            _, ca = fid.features_and_classes(classifier, a)
            _, cb = fid.features_and_classes(classifier, b)
            want = labels.numpy()
            rows.append({"name": name, "cached": float((ca == want).mean()), "shipped": float((cb == want).mean()),
                         "changed": float((ca != cb).mean()), "max_abs": float((a - b).abs().max())})
            models[name]["info"]["samples"] = {"n": samples, "steps": steps, "class_acc": rows[-1]["shipped"]}
        worse = [r for r in rows if r["changed"] > tolerance]
        if worse:
            r = worse[0]
            raise TokenoptError(f"float16 storage changes the class demo:digits reads on {100 * r['changed']:.1f}% of "
                                f"demo:{r['name']}'s samples (tolerance {100 * tolerance:g}%); nothing was written")
        demo_shipped.write_manifest(staging, models, {})
        for old in folder.iterdir():
            if old.is_file() and (old.suffix == ".safetensors" or old.name == demo_shipped.MANIFEST):
                old.unlink()
        for new in sorted(staging.iterdir(), key=lambda p: p.name == demo_shipped.MANIFEST):   # manifest last
            os.replace(new, folder / new.name)
        return rows
    finally:
        shutil.rmtree(staging, ignore_errors=True)
