"""The demo models as data: what each is (architecture, data set, training recipe) and where its cache lives.

Kept apart from the training code (``tokenopt.demo``) so that loading a ``demo:NAME`` spec
(``tokenopt.sources``) reads a cached model without being able to train one: sources imports this
module, demo imports sources.

Weights are cached as ``<cache>/demos/NAME.safetensors`` beside ``NAME.json``, a record of what
they are. The json carries :meth:`DemoSpec.digest`, so changing a spec here makes the cached
weights stale (retrained by ``tokenopt demo``, refused by loading) rather than silently reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenopt.paths import demo_models_dir

# Both models use timm's default ViT preprocessing constants; the data sets normalise with them.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DemoSpec:
    """How a demo model is built and trained: everything that determines its weights."""

    dataset: str
    timm_name: str
    timm_kwargs: dict
    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    train_options: dict = field(default_factory=dict)  # data set options for the training split only
    seed: int = 0
    min_top1: float = 0.0  # the accuracy the test suite expects on the test split

    @property
    def image_size(self) -> int:
        return int(self.timm_kwargs["img_size"])

    def digest(self) -> str:
        text = json.dumps({"v": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


DEMOS: dict[str, DemoSpec] = {
    "digits": DemoSpec(
        dataset="digits",
        timm_name="vit_small_patch16_224",
        timm_kwargs=dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, num_classes=10),
        epochs=30, batch_size=32, lr=1e-3, warmup_epochs=2.0, min_top1=0.95,
    ),
    "digits-clutter": DemoSpec(
        dataset="digits-clutter",
        timm_name="vit_small_patch16_224",
        timm_kwargs=dict(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=4, num_classes=10),
        # 6 placements of each training digit: a ViT has to learn translation invariance from data.
        # Measured (2 CPU cores, about 4 min): 0.87 top-1 at seed 0, 0.83 at seed 1
        epochs=8, batch_size=64, lr=1e-3, warmup_epochs=0.5, train_options={"variants": 6}, min_top1=0.75,
    ),
    # the digit drawn 20..44 px per image (digits-clutter-sizes): objects that need 6 to 36 of the
    # 64 tokens, where a per-image budget (SPA) can differ from a fixed one (ToSA, ToMe). Measured
    # (1 thread on a loaded 2-core machine, 35 min): 0.344 top-1, far from converged (loss 1.77);
    # digits-clutter's 8 epochs x 6 variants would reach more in twice the time
    "digits-clutter-sizes": DemoSpec(
        dataset="digits-clutter-sizes",
        timm_name="vit_small_patch16_224",
        timm_kwargs=dict(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=4, num_classes=10),
        epochs=6, batch_size=64, lr=1e-3, warmup_epochs=0.5, train_options={"variants": 4}, min_top1=0.3,
    ),
    # a 4-stage Swin (window 4 on a 16x16 patch grid: 16, 8, 4, 2 tokens a side), its windowed
    # stages 3-4 where the SPA paper puts its gates. Measured (1 thread on a loaded 2-core machine,
    # 16 min): 0.41 top-1, still learning; lr 2e-3 for 8 epochs reached only 0.29
    "swin-clutter-sizes": DemoSpec(
        dataset="digits-clutter-sizes",
        timm_name="swin_tiny_patch4_window7_224",
        timm_kwargs=dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(1, 1, 2, 2),
                         num_heads=(2, 2, 4, 8), mlp_ratio=2.0, num_classes=10),
        epochs=6, batch_size=64, lr=1e-3, warmup_epochs=0.5, train_options={"variants": 4}, min_top1=0.35,
    ),
}


@dataclass(frozen=True)
class MethodSpec:
    """How the learned parts of one demo method (ToSA selectors, SPA gates) are trained on a demo model.

    ``recipe`` names a shipped recipe; the recipe as it read when the parts were trained is stored
    beside them (cache and package data) and used from there, so a later change to the shipped
    recipe cannot pair these parts with options they were not trained for.
    """

    recipe: str
    epochs: int = 3
    labels: str = "attention"   # what the trainer fits to, when it takes labels: masks | attention
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0

    def digest(self, model: DemoSpec) -> str:
        """Changes with this spec and with the demo model's: stale parts are retrained, not reused."""
        text = json.dumps({"v": FORMAT_VERSION, "model": model.digest(), **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: The demo methods with learned parts, per demo model: ``tokenopt demo`` shows them beside the
#: training-free recipes. digits has no object masks, so its gates learn the original's attention.
DEMO_METHODS: dict[str, tuple[MethodSpec, ...]] = {
    "digits": (MethodSpec("tosa-keep50"), MethodSpec("spa-bypass-second-half")),
    "digits-clutter": (MethodSpec("tosa-keep50"), MethodSpec("spa-bypass-second-half", labels="masks")),
}


# What `tokenopt demo` runs when no --model is given: the two ViTs it ships trained. The others
# (size-varying clutter, the demo Swin) are trained on request, `tokenopt demo -m NAME`.
MAIN_DEMOS = ("digits", "digits-clutter")


def demo_names() -> list[str]:
    return list(DEMOS)


def demo_files(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(weights, json) of the cached demo model ``name``."""
    folder = demo_models_dir(cache_dir)
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def read_cached(name: str, spec_digest: str, build, cache_dir: str | os.PathLike | None = None):
    """(model in eval mode, info) of the cache entry ``name`` when it was trained from ``spec_digest``, else None.

    ``build(info)`` makes the untrained module the weights load into. A missing, stale, damaged or
    foreign entry is None: it is retrained rather than trusted.
    """
    weights, meta = demo_files(name, cache_dir)
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("spec_digest") != spec_digest:
            return None
        from safetensors.torch import load_file

        model = build(info)
        model.load_state_dict(load_file(weights))
    except Exception:
        return None
    info["weights"] = str(weights)
    return model.eval(), info


def write_cached(state: dict, info: dict, weights: Path, meta: Path, metadata: dict[str, str]) -> None:
    """The cache entry :func:`read_cached` reads: ``state`` as safetensors, then ``info`` as json, each
    written atomically and in that order, so a json never points at missing weights."""
    from safetensors.torch import save_file

    from tokenopt.files import atomic_path, atomic_write

    weights.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    with atomic_write(meta, "w") as f:
        f.write(json.dumps(info, indent=2) + "\n")


def method_files(name: str, method: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path, Path]:
    """(learned parts, recipe, json) of demo method ``method`` on the cached demo model ``name``."""
    stem = demo_models_dir(cache_dir) / f"{name}.{method}"
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".yaml"), \
        stem.with_name(stem.name + ".json")


def describe(model, spec: DemoSpec) -> None:
    """Make timm's data config tell the truth: built with img_size=32, pretrained_cfg still says 224."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(input_size=(3, spec.image_size, spec.image_size), mean=MEAN, std=STD, crop_pct=1.0,
               interpolation="bilinear", num_classes=int(spec.timm_kwargs["num_classes"]),
               url="", hf_hub_id=None, tag=f"tokenopt-demo-{spec.dataset}")
    model.pretrained_cfg = cfg
