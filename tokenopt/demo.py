"""Demo models: small timm ViTs trained on the built-in digits data, so tokenopt can be tried offline.

    model, info = demo_model("digits-clutter")   # trains once (a few CPU minutes), then cached
    info["arch"]   # 'timm:vit_small_patch16_224?img_size=64&patch_size=8&...' rebuilds the architecture
    info["test"]   # {'top1': ..., 'top5': ..., 'n': 360}

``digits``: the 8x8 scans filling a 32 px image, one token per scan pixel (4 px patches, 64 tokens).
``digits-clutter``: a 32 px digit somewhere on a 64 px cluttered canvas, 8 px patches, 64 tokens
of which 39-48 show only clutter: the case token reduction is for.

Weights are cached as safetensors beside a json of what they are (``$TOKENOPT_CACHE``, else
``$XDG_CACHE_HOME/tokenopt``, else ``~/.cache/tokenopt``). The json records a hash of the recipe
that trained them, so changing a spec here retrains rather than reusing stale weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tokenopt import io
from tokenopt.errors import ModelLoadError, TokenoptError

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
}


def demo_names() -> list[str]:
    return list(DEMOS)


def default_cache_dir() -> Path:
    if os.environ.get("TOKENOPT_CACHE"):
        return Path(os.environ["TOKENOPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tokenopt"


def format_arch(timm_name: str, kwargs: dict) -> str:
    """``timm:NAME?k=v&...``: the model spec (as ``tokenopt.io`` reads it) that rebuilds a demo architecture."""
    return io.base_to_spec({"kind": "timm", "name": timm_name, "kwargs": kwargs})


def parse_arch(arch: str) -> tuple[str, dict]:
    """Inverse of :func:`format_arch`: (timm model name, create_model kwargs)."""
    if not arch.startswith("timm:"):
        raise ModelLoadError(f"architecture '{arch}' is not of the form timm:NAME?key=value&...")
    return io.parse_query(arch[len("timm:"):])


def build_arch(arch: str) -> nn.Module:
    """An untrained model of architecture ``arch`` (``timm:...``), never downloading weights."""
    return io.build_arch(arch)[0]


def demo_model(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False,
               quiet: bool = False) -> tuple[nn.Module, dict]:
    """The trained demo model ``name`` (in eval mode) and its info dict; trains it on first use.

    ``force`` retrains even if a cached copy exists. Training is deterministic for a given
    torch build and thread count, and takes a few minutes on 2 CPU cores.
    """
    if name not in DEMOS:
        raise TokenoptError(f"unknown demo model '{name}': choose one of {', '.join(DEMOS)}")
    spec = DEMOS[name]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    weights, meta = folder / "demos" / f"{name}.safetensors", folder / "demos" / f"{name}.json"
    if not force:
        cached = _load_cached(spec, weights, meta)
        if cached is not None:
            return cached
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
    _describe(model, spec)
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


def _load_cached(spec: DemoSpec, weights: Path, meta: Path) -> tuple[nn.Module, dict] | None:
    """The cached model if it exists and was trained from this very spec; else None (retrain)."""
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("spec_digest") != spec.digest():
            return None
        from safetensors.torch import load_file

        model = build_arch(info["arch"])
        model.load_state_dict(load_file(weights))
    except Exception:  # a damaged or foreign cache entry is rebuilt rather than trusted
        return None
    _describe(model, spec)
    info["weights"] = str(weights)
    return model.eval(), info


def _save(model: nn.Module, info: dict, weights: Path, meta: Path) -> None:
    from safetensors.torch import save_file

    weights.parent.mkdir(parents=True, exist_ok=True)
    # tmp + os.replace for both files, weights first: a json never points at missing weights
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"arch": info["arch"], "spec_digest": info["spec_digest"]})
    os.replace(tmp, weights)
    tmp = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, meta)


def _describe(model: nn.Module, spec: DemoSpec) -> None:
    """Make timm's data config tell the truth: built with img_size=32, pretrained_cfg still says 224."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(input_size=(3, spec.image_size, spec.image_size), mean=MEAN, std=STD, crop_pct=1.0,
               interpolation="bilinear", num_classes=int(spec.timm_kwargs["num_classes"]),
               url="", hf_hub_id=None, tag=f"tokenopt-demo-{spec.dataset}")
    model.pretrained_cfg = cfg


def _timm_version() -> str:
    import timm

    return timm.__version__
