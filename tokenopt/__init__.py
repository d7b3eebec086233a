"""tokenopt: make Vision Transformers cheaper by rewriting their torch.fx graphs.

    fast = tokenopt.optimize(model, "recipe.yaml")      # any ViT class; returns an nn.Module
    print(tokenopt.record_of(fast).report)               # per-layer tokens and FLOPs
    tuned = tokenopt.tune(model, "digits", budget="speed=1.5")   # the best recipe for a budget
    tokenopt.save(fast, "model.tokenopt.pt"); tokenopt.load("model.tokenopt.pt")
"""
from tokenopt.errors import TokenoptError
from tokenopt.record import Record, record_of
from tokenopt.version import __version__


def optimize(model, recipe, example_input=None, **kwargs):
    """Rewrite ``model`` as ``recipe`` asks; see [`tokenopt.pipeline.optimize`][tokenopt.pipeline.optimize]."""
    from tokenopt.pipeline import optimize as _optimize
    return _optimize(model, recipe, example_input, **kwargs)


def save(module, path, **kwargs):
    """Save an optimized module: weights + recipe + manifest; see [`tokenopt.artifact.save`][tokenopt.artifact.save]."""
    from tokenopt.artifact import save as _save
    return _save(module, path, **kwargs)


def load(path, **kwargs):
    """Rebuild a saved optimized module by replaying its recipe; see [`tokenopt.artifact.load`][tokenopt.artifact.load]."""
    from tokenopt.artifact import load as _load
    return _load(path, **kwargs)


def unmerge(tokens, index):
    """Put merged tokens back on the original token grid (dense outputs)."""
    from tokenopt.ops.tome import unmerge as _unmerge
    return _unmerge(tokens, index)


def __getattr__(name: str):
    # tokenopt.Example (inputs of a model called with several): loaded on first use, like the
    # functions above, so `import tokenopt` stays light
    if name == "Example":
        from tokenopt.analysis.example import Example
        return Example
    if name == "tune":   # tokenopt.tune(model, data, budget=...): loaded on first use (it needs the pipeline)
        from tokenopt.tuning.run import tune
        return tune
    raise AttributeError(f"module 'tokenopt' has no attribute {name!r}")


__all__ = ["Example", "Record", "TokenoptError", "optimize", "record_of", "save", "load", "tune", "unmerge", "__version__"]
