"""How a generator and its optimized versions compare: GFLOPs per denoising call, digits-FID, class
accuracy, seconds per image, and a grid of samples a person can look at.

Every setting draws the same images: the same classes in the same order from the same seeded
starting noise, with the same deterministic DDIM steps, so a difference between two rows is the
optimization's alone. ``tokenopt eval`` (generators) and ``tokenopt generate`` are built on it, and
``benchmarks/bench_generation.py`` prints the quality table with it.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tokenopt.errors import TokenoptError
from tokenopt.flops import count_flops
from tokenopt.sources.generator_models import call_inputs, class_count, example_of, image_shape, predicted_noise
from tokenopt.generation.schedule import ddim_sample

SAMPLE_BATCH = 50     # below the batch limit a captured diffusers denoiser has (sources.diffusers.MAX_BATCH)


@dataclass
class GenRow:
    setting: str
    gflops: float | None        # multiply-accumulates of one denoising call of one image, in billions
    fid: float | None
    class_acc: float | None
    sec_per_image: float | None
    n_generated: int
    n_real: int
    note: str = ""              # why a setting has no figures ("not available: ...")


@dataclass(frozen=True)
class Generator:
    """What sampling needs to know about a denoiser: its call and its classes."""

    example: object             # tokenopt.sources.diffusers.DenoiserInputs
    classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return image_shape(self.example)


def denoiser_example(model: nn.Module):
    """The example call of the diffusers denoiser ``model`` is, or was optimized from; None for other models."""
    example = example_of(model)
    if example is None and hasattr(model, "graph"):
        from tokenopt.sources.generator_specs import GENERATORS
        from tokenopt.record import record_of

        base = getattr(record_of(model), "base", None) or {}
        if base.get("kind") == "diffusers" or (base.get("kind") == "demo" and base.get("name") in GENERATORS):
            from tokenopt.sources import build_base

            example = example_of(build_base(base))
    return example


def generator_of(model: nn.Module, spec: str = "the model") -> Generator:
    """The class-conditional denoiser ``model`` is (or was optimized from); TokenoptError if it is none."""
    example = denoiser_example(model)
    classes = class_count(example)
    if classes is None:
        what = f"a {example.class_name} without class labels" if example is not None else "not a diffusers denoiser"
        raise TokenoptError(f"{spec} is {what}, so it cannot generate a chosen class.\n"
                            "  Give a class-conditional generator: demo:digits-dit, demo:digits-unet, a diffusers "
                            "DiT (num_embeds_ada_norm) or UNet (num_class_embeds), or an artifact optimized from one.")
    return Generator(example, classes)


def check_class(gen: Generator, label: int) -> None:
    if not 0 <= label < gen.classes:
        raise TokenoptError(f"--class {label} is out of range: this generator draws classes 0 to {gen.classes - 1}.")


@torch.no_grad()
def sample(model: nn.Module, gen: Generator, labels: torch.Tensor, steps: int = 25, seed: int = 0,
           batch: int = SAMPLE_BATCH) -> torch.Tensor:
    """Images (n, C, H, W) of classes ``labels``, from one seeded draw of starting noise, in chunks."""
    model.eval()
    noise = torch.randn((len(labels), *gen.shape), generator=torch.Generator().manual_seed(seed))
    out = []
    for start in range(0, len(labels), batch):
        y = labels[start:start + batch]

        def predict(x, t, y=y):
            args, kwargs = call_inputs(gen.example, x, t, y)
            return predicted_noise(model(*args, **kwargs))
        out.append(ddim_sample(predict, (len(y), *gen.shape), steps=steps, noise=noise[start:start + batch]))
    return torch.cat(out)


def gflops_per_call(model: nn.Module, gen: Generator) -> float:
    """Multiply-accumulates (tokenopt.flops' convention) of one denoising call on one image, in billions.

    Counted on a batch of 2 (a captured denoiser may not take a batch of 1) and halved.
    """
    c, h, w = gen.shape
    args, kwargs = call_inputs(gen.example, torch.zeros(2, c, h, w), torch.tensor([500, 500]), torch.tensor([0, 1]))
    return count_flops(model, *args, **kwargs) / 2 / 1e9


def balanced_labels(n: int, classes: int) -> torch.Tensor:
    return torch.arange(n) % classes


def evaluate_generators(models: dict[str, nn.Module | str], gen: Generator, classifier, n: int = 1000,
                        steps: int = 25, seed: int = 0, grid_dir: str | Path | None = None,
                        progress=None) -> list[GenRow]:
    """One row per setting (a model, or a string saying why the setting is not available)."""
    from tokenopt.generation.fid import features_and_classes, frechet_distance, real_features

    real = real_features(classifier)
    labels = balanced_labels(n, gen.classes)
    rows = []
    for name, model in models.items():
        if isinstance(model, str):
            rows.append(GenRow(name, None, None, None, None, 0, len(real), note=model))
            continue
        if progress:
            progress(f"{name}: sampling {n} images, {steps} steps")
        start = time.perf_counter()
        images = sample(model, gen, labels, steps, seed)
        seconds = (time.perf_counter() - start) / n
        feats, preds = features_and_classes(classifier, images)
        rows.append(GenRow(name, gflops_per_call(model, gen), frechet_distance(feats, real),
                           float((preds == labels.numpy()).mean()), seconds, n, len(real)))
        if grid_dir is not None:
            write_grid(class_grid(images, labels, gen.classes), Path(grid_dir) / f"{safe_name(name)}.png",
                       columns=gen.classes)
    return rows


def optimized_settings(model: nn.Module, recipes: dict[str, object], capture: str = "auto",
                       first: str = "original") -> dict[str, nn.Module | str]:
    """``{first: model, name: optimized model or "not available: why"}``, capturing ``model`` once."""
    from tokenopt.analysis import analyse, example_input_for
    from tokenopt.pipeline import optimize

    out: dict[str, nn.Module | str] = {first: model}
    if not recipes:
        return out
    example = example_input_for(model)
    analysis = analyse(model, example, capture=capture)
    for name, recipe in recipes.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = optimize(model, recipe, example, report=False, analysis=analysis)
        except TokenoptError as e:
            out[name] = f"not available: {str(e).splitlines()[0]}"
    return out


def class_grid(images: torch.Tensor, labels: torch.Tensor, classes: int, per_class: int = 8) -> torch.Tensor:
    """The first ``per_class`` images of each class, one column per class (row-major for write_grid)."""
    picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(classes)]
    rows = min(len(p) for p in picks)
    return torch.stack([images[picks[c][r]] for r in range(rows) for c in range(classes)])


def write_grid(images: torch.Tensor, path: str | Path, columns: int = 8, scale: int = 2) -> Path:
    """A PNG of images (n, C, H, W) in [-1, 1], ``columns`` to a row, 2 px apart, each pixel ``scale`` px."""
    from PIL import Image

    from tokenopt.files import atomic_write

    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.zeros(c, rows * (h + 2) + 2, columns * (w + 2) + 2)
    for i, img in enumerate(images):
        r, k = divmod(i, columns)
        canvas[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = img
    pixels = ((canvas.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = pixels[0].numpy() if c == 1 else pixels.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")
    return path


def safe_name(setting: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in setting).strip("-") or "setting"


def write_csv(rows: list[GenRow], path: str | Path) -> None:
    from tokenopt.files import write_csv_rows
    write_csv_rows([asdict(r) for r in rows], path)


def plot(rows: list[GenRow], path: str | Path, title: str = "") -> None:
    """digits-FID against GFLOPs per denoising call, one point per setting, labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenopt.files import atomic_write

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for r in rows:
        if r.fid is None:
            continue
        star = r.setting == "original"
        ax.plot([r.gflops], [r.fid], marker="*" if star else "o", markersize=12 if star else 6,
                color="black" if star else None, linestyle="")
        ax.annotate(r.setting, (r.gflops, r.fid), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("GFLOPs per denoising call (multiply-accumulates)")
    ax.set_ylabel("digits-FID (lower is better)")
    ax.set_title(title or "quality against cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
