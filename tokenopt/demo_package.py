"""The maintainers' step that turns the demo cache into package data (``tools/ship_demo_weights.py``).

    tokenopt demo --retrain                       # trains every demo model and method into the cache
    python tools/ship_demo_weights.py             # -> tokenopt/demo_weights/ + manifest.json (sha256)

Every demo model and each of its methods must be in the cache, trained from the current specs.
Weights are written in float16 (:mod:`tokenopt.demo_shipped`), then read back the way ``tokenopt
demo`` reads them and evaluated on the test split: a top-1 that differs from the cached float32
one by more than ``tolerance`` is refused, and nothing is left half-written.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tokenopt import demo_shipped, sources
from tokenopt.demo_methods import assemble, cached_method, methods_of
from tokenopt.demo_specs import DEMOS
from tokenopt.errors import TokenoptError

__all__ = ["ship_demo_weights"]


def ship_demo_weights(cache_dir: str | os.PathLike | None = None, folder: str | os.PathLike | None = None,
                      names=None, tolerance: float = 0.0) -> list[dict]:
    """Write the cached demo models and methods as package data into ``folder`` (default: the package's).

    Returns one row per model and method: {"name", "method", "cached", "shipped"} (test top-1).
    """
    from tokenopt.data import get_dataset, get_loader
    from tokenopt.train import evaluate

    folder = Path(folder or demo_shipped.SHIPPED_DIR)
    names = list(names or DEMOS)
    staging = Path(tempfile.mkdtemp(prefix=".demo_weights.", dir=folder.parent))
    try:
        models, methods = {}, {}
        for name in names:
            found = sources.cached_demo(name, cache_dir)
            if found is None:
                raise TokenoptError(f"demo:{name} is not in the cache (trained from its current spec): run "
                                    f"`tokenopt demo --retrain --model {name}` first")
            model, info = found
            models[name] = demo_shipped.store_model(name, model.state_dict(), info, staging)
            methods[name] = {}
            for spec in methods_of(name):
                got = cached_method(name, spec, spec.digest(DEMOS[name]), cache_dir)
                if got is None or got[2].get("base") != demo_shipped.weights_fingerprint(model.state_dict()):
                    raise TokenoptError(f"{spec.recipe} on demo:{name} is not in the cache (trained from its current "
                                        f"spec, on the cached model): run `tokenopt demo --retrain --model {name}` first")
                text, state, minfo = got
                stem = f"{name}.{spec.recipe}"
                demo_shipped.store_state(state, staging / f"{stem}.safetensors",
                                         metadata={"spec_digest": minfo["spec_digest"]})
                (staging / f"{stem}.yaml").write_text(text)
                methods[name][spec.recipe] = {"file": f"{stem}.safetensors", "recipe": f"{stem}.yaml",
                                              "spec_digest": minfo["spec_digest"],
                                              "info": {k: v for k, v in minfo.items() if k != "weights"}}
        # the methods' parts were trained on the float32 backbone; they serve the shipped (rounded) one
        demo_shipped.write_manifest(staging, models, methods)
        rows = []
        for name in names:
            model = _read_back(name, staging)
            shipped_fp = demo_shipped.weights_fingerprint(model.state_dict())
            test = get_dataset(DEMOS[name].dataset, "test", model=model)
            loader = get_loader(test, 256, train=False)
            example = next(iter(loader))[0][:2]
            rows.append({"name": name, "method": "", "cached": models[name]["info"]["test"]["top1"],
                         "shipped": evaluate(model, loader)["top1"]})
            for method, entry in methods[name].items():
                state = demo_shipped.read_state(entry["file"], staging)
                gm = assemble(model, demo_shipped.read_text(entry["recipe"], staging), state, example)
                entry["info"]["base"] = shipped_fp
                rows.append({"name": name, "method": method, "cached": entry["info"]["test"]["top1"],
                             "shipped": evaluate(gm, loader)["top1"]})
        worse = [r for r in rows if abs(r["shipped"] - r["cached"]) > tolerance]
        if worse:
            r = worse[0]
            raise TokenoptError(f"float16 storage changes the test top-1 of {r['method'] or 'the model'} on demo:{r['name']} "
                                f"({r['cached']:.4f} -> {r['shipped']:.4f}); nothing was written")
        demo_shipped.write_manifest(staging, models, methods)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if old.name != "__init__.py":
                old.unlink()
        for new in sorted(staging.iterdir(), key=lambda p: p.name == demo_shipped.MANIFEST):   # manifest last
            os.replace(new, folder / new.name)
        return rows
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_back(name: str, folder: Path):
    """Demo model ``name`` as ``tokenopt demo`` reads it from package data in ``folder``."""
    from tokenopt.demo_specs import describe

    entry = demo_shipped.model_entry(name, DEMOS[name].digest(), folder)
    model = sources.build_arch(entry["info"]["arch"])[0]
    model.load_state_dict(demo_shipped.read_state(entry["file"], folder))
    describe(model, DEMOS[name])
    return model.eval()
