"""The demo methods with learned parts: a demo ViT rewritten by a shipped recipe, its selectors or gates trained.

    model, _ = demo_model("digits-clutter")
    gm, info = demo_method("digits-clutter", model, "spa-bypass-second-half", example)
    info["test"]     # {'top1': ..., 'n': 360}: measured when the parts were trained

What each method is (recipe, epochs, labels) is data in :mod:`tokenopt.demo_specs` (``DEMO_METHODS``).
The parts come from the cache (``<cache>/demos/NAME.METHOD.safetensors`` beside the recipe they were
trained with and a json), else from the package (:mod:`tokenopt.demo_shipped`), else they are
trained here and cached (``force``: always). Only the parts are stored, not the backbone: training
them leaves the demo ViT as it was, so the same weights serve every method.

The recipe is stored beside the parts and read from there, never from ``recipes/``: a later edit of
a shipped recipe (a changed default, a new key) must not pair these parts with options they were
not trained for.
"""
from __future__ import annotations

import copy
import json
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from tokenopt import demo_shipped
from tokenopt.demo_specs import DEMO_METHODS, DEMOS, MethodSpec, method_files
from tokenopt.errors import ModelLoadError, TokenoptError
from tokenopt.paths import SHIPPED_RECIPES
from tokenopt.pipeline import optimize
from tokenopt.rewrite.learned import kinds_in

__all__ = ["assemble", "cached_method", "demo_method", "learned_state", "method_spec", "methods_of"]


def methods_of(name: str) -> tuple[MethodSpec, ...]:
    """The learned demo methods of demo model ``name`` (none for a model without an entry)."""
    return DEMO_METHODS.get(name, ())


def method_spec(name: str, method: str) -> MethodSpec | None:
    return next((m for m in methods_of(name) if m.recipe == method), None)


def demo_method(name: str, model: nn.Module, method: str, example: torch.Tensor,
                cache_dir: str | os.PathLike | None = None, force: bool = False,
                quiet: bool = True) -> tuple[torch.fx.GraphModule, dict]:
    """``model`` (demo model ``name``) rewritten by ``method``'s stored recipe with its trained parts loaded.

    From the cache, else the package, else trained now and cached; ``force`` trains again.
    """
    spec = method_spec(name, method)
    if spec is None:
        known = ", ".join(m.recipe for m in methods_of(name)) or "none"
        raise TokenoptError(f"demo:{name} has no trained method '{method}' (it has: {known})")
    digest = spec.digest(DEMOS[name])
    if not force:
        # parts trained on other backbone weights (a retrained demo model, or the shipped one) do not serve
        base = demo_shipped.weights_fingerprint(model.state_dict())
        for find in (lambda: cached_method(name, spec, digest, cache_dir), lambda: _shipped(name, spec, digest)):
            found = find()
            if found is not None and found[2].get("base") == base:
                recipe_text, state, info = found
                return assemble(model, recipe_text, state, example, where=info["weights"]), info
    gm, info = _train(name, model, spec, example, quiet)
    _save(gm, info, *method_files(name, method, cache_dir))
    info["weights"] = str(method_files(name, method, cache_dir)[0])
    return gm, info


def learned_state(gm: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``gm``'s state dict that belong to its learned parts (every kind it holds)."""
    prefixes = {k.prefix for k in kinds_in(gm)}
    return {k: v.detach().clone() for k, v in gm.state_dict().items() if k.split(".", 1)[0] in prefixes}


def assemble(model: nn.Module, recipe_text: str, state: dict[str, torch.Tensor], example: torch.Tensor,
             where: str = "<learned parts>") -> torch.fx.GraphModule:
    """``model`` rewritten by ``recipe_text``, with the learned parts' weights ``state`` (exactly its keys)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the plan's notes were seen when the parts were trained
        gm = optimize(model, recipe_text, example, report=False)
    want = set(learned_state(gm))
    # load first, then compare: a part may fill in what older weights lack (a gate's threshold buffer
    # takes the recipe's value), and only what is still missing after that is a mismatch
    missing, extra = gm.load_state_dict(state, strict=False)
    missing = sorted(k for k in missing if k in want)
    extra = sorted(set(state) - want)
    if missing or extra:
        raise ModelLoadError(f"{where} does not fit the model its recipe builds (missing {missing[:3]}, "
                             f"unexpected {extra[:3]}). Run `tokenopt demo --retrain` to train the parts again.")
    return gm.eval()


def cached_method(name: str, spec: MethodSpec, digest: str, cache_dir) -> tuple[str, dict, dict] | None:
    """(recipe text, state, info) of a method from the cache, if trained from ``digest``; a damaged entry is None (retrained)."""
    weights, recipe, meta = method_files(name, spec.recipe, cache_dir)
    if not (weights.is_file() and recipe.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("spec_digest") != digest:
            return None
        from safetensors.torch import load_file

        state = load_file(str(weights))
        text = recipe.read_text()
    except Exception:
        return None
    info["weights"] = str(weights)
    return text, state, info


def _shipped(name: str, spec: MethodSpec, digest: str) -> tuple[str, dict, dict] | None:
    entry = demo_shipped.method_entry(name, spec.recipe, digest)
    if entry is None:
        return None
    info = {**entry["info"], "weights": str(demo_shipped.SHIPPED_DIR / entry["file"]), "shipped": True}
    return demo_shipped.read_text(entry["recipe"]), demo_shipped.read_state(entry["file"]), info


def _train(name: str, model: nn.Module, spec: MethodSpec, example: torch.Tensor, quiet: bool):
    from tokenopt.data import get_dataset, get_loader
    from tokenopt.recipe import load_recipe
    from tokenopt.train import evaluate
    from tokenopt.train.trainers import trainers_for

    path = SHIPPED_RECIPES / f"{spec.recipe}.yaml"
    # retraining reproduces what ships: the recipe the shipped parts were trained with, when the package
    # has them for this spec (recipes/ may have moved on since, e.g. new SPA defaults); else today's file
    entry = demo_shipped.method_entry(name, spec.recipe, spec.digest(DEMOS[name]))
    recipe = load_recipe(demo_shipped.read_text(entry["recipe"]) if entry else path)
    found = list(trainers_for(r.pass_name for r in recipe.rules).values())
    if len(found) != 1:
        raise TokenoptError(f"{path}: a demo method needs exactly one kind of learned part, the recipe has {len(found)}")
    _, trainer = found[0]
    dataset = DEMOS[name].dataset
    masks = True if trainer.uses_labels and spec.labels == "masks" else None
    train_set = get_dataset(dataset, "train", model=model, masks=masks)
    test_set = get_dataset(dataset, "test", model=model)
    original = copy.deepcopy(model).eval()
    torch.manual_seed(spec.seed)     # the parts' initial weights are part of what the spec determines
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = optimize(model, recipe, example, report=False)
    start = time.perf_counter()
    trainer.fit(gm, original, train_set, labels=spec.labels, epochs=spec.epochs, lr=spec.lr,
                batch_size=spec.batch_size, seed=spec.seed, quiet=quiet, resume=None)
    seconds = time.perf_counter() - start
    gm.eval()
    test = evaluate(gm, get_loader(test_set, 256, train=False))
    info = {"name": name, "method": spec.recipe, "recipe": recipe.to_yaml(), "spec_digest": spec.digest(DEMOS[name]),
            "base": demo_shipped.weights_fingerprint(original.state_dict()),
            "test": test, "train": {"epochs": spec.epochs, "labels": spec.labels, "seconds": round(seconds, 1),
                                    "threads": torch.get_num_threads()},
            "torch": torch.__version__}
    return gm, info


def _save(gm: nn.Module, info: dict, weights: Path, recipe: Path, meta: Path) -> None:
    from safetensors.torch import save_file

    weights.parent.mkdir(parents=True, exist_ok=True)
    # tmp + os.replace for every file, the json last: a json never points at missing parts
    for path, write in ((weights, lambda p: save_file({k: v.contiguous() for k, v in learned_state(gm).items()},
                                                      str(p), metadata={"spec_digest": info["spec_digest"]})),
                        (recipe, lambda p: p.write_text(info["recipe"])),
                        (meta, lambda p: p.write_text(json.dumps({k: v for k, v in info.items() if k != "recipe"},
                                                                 indent=2) + "\n"))):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(tmp)
        os.replace(tmp, path)
