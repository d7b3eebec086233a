"""Whether a base dict rebuilds a model as it is: the same state-dict keys with the same shapes.

An artifact stores a base dict, not the model; a base that builds another architecture (a timm
model made in Python with ``img_size=64, depth=4`` recorded only as its class, which then builds
the 224-px, 12-block default) would fail on load, or worse, load into the wrong graph. Saving
compares first. The check builds the architecture on the meta device: no memory, no init work.
"""
from __future__ import annotations

from tokenopt.sources.registry import build_base

# kinds whose base is a full record of the model (a Hugging Face config, a cached demo): nothing to check
_EXACT_KINDS = ("hf", "demo")


def state_shapes(module) -> dict[str, tuple[int, ...]]:
    """``{state-dict key: shape}`` of ``module``."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def rebuilt_shapes(base: dict) -> dict[str, tuple[int, ...]] | None:
    """The state-dict shapes of the architecture ``base`` builds (None for a kind rebuilt from a full
    record). Raises ModelLoadError when it cannot be built."""
    import torch

    if base.get("kind") in _EXACT_KINDS:
        return None
    try:
        with torch.device("meta"):
            model = build_base(base)
    except Exception:   # some constructors need real tensors (.item(), numpy): a real build decides
        model = build_base(base)
    return state_shapes(model)


def shape_difference(want: dict[str, tuple], got: dict[str, tuple], limit: int = 3) -> str | None:
    """What ``got`` (a rebuilt model's shapes) lacks, adds or shapes otherwise than ``want``; None when equal."""
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [f"{k} {want[k]} vs {got[k]}" for k in want if k in got and tuple(got[k]) != tuple(want[k])]
    parts = []
    for label, items in (("missing", missing), ("extra", extra), ("of another shape (model vs rebuilt)", wrong)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts) or None
