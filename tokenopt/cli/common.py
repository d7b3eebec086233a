"""What every verb of the command line shares: the options, the console, loading models, recipes and images.

Verb modules (apply, inspect, measure, train) import from here and never from each other;
``tokenopt.cli`` (the package ``__init__``) assembles them into one Typer app.
"""
from __future__ import annotations

import contextlib
import functools
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from tokenopt.errors import DataError, TokenoptError
from tokenopt.sources.registry import arch_help, model_help

MODEL_HELP = model_help()    # one entry per registered model source
ArchOpt = Annotated[Optional[str], typer.Option(
    "--arch", "-a", metavar="ARCH", help=f"Architecture for a state dict: {arch_help()}.")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow a checkpoint that is a pickled Python object (runs code from the file).")]
StrictOpt = Annotated[bool, typer.Option(
    "--strict", help="Treat the recipe as `strict: true`: a layer that cannot take its r, or a ToSA model whose "
                     "selectors were never trained, is an error instead of a warning.")]
InputSizeOpt = Annotated[Optional[str], typer.Option(
    "--input-size", metavar="C,H,W", help="Input size of the example batch (default: from the model's config).")]
WeightsOpt = Annotated[Optional[Path], typer.Option(
    "--weights", metavar="FILE",
    help="Weights for the architecture MODEL names (open_clip:<arch>, torchvision:<name>, timm:<name>, a "
         "factory): a local state dict or checkpoint, read weights-only; nothing is downloaded.")]
# preprocessing, as timm's validate.py spells it; each overrides the model's own config
DataSizeOpt = Annotated[Optional[str], typer.Option(
    "--input-size", metavar="C,H,W", help="Image size the data is preprocessed to: C,H,W, H,W or one side "
                                          "(default: the model's config).")]
MeanOpt = Annotated[Optional[str], typer.Option(
    "--mean", metavar="M,M,M", help="Per-channel mean to normalise with (default: the model's config).")]
StdOpt = Annotated[Optional[str], typer.Option(
    "--std", metavar="S,S,S", help="Per-channel standard deviation to normalise with (default: the model's config).")]
InterpolationOpt = Annotated[Optional[str], typer.Option(
    "--interpolation", metavar="MODE", help="Resize interpolation: bilinear, bicubic, nearest, lanczos, box, hamming "
                                            "(default: the model's config).")]
CropPctOpt = Annotated[Optional[float], typer.Option(
    "--crop-pct", metavar="PCT", help="Centre-crop fraction: resize to size/PCT, then crop to size "
                                      "(default: the model's config).")]
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
LeafOpt = Annotated[Optional[list[str]], typer.Option(
    "--leaf", metavar="NAME", help="Module class name or path to keep whole when tracing (repeatable).")]
CaptureOpt = Annotated[str, typer.Option(
    "--capture", metavar="auto|fx|export",
    help="How the model's graph is captured: auto (torch.fx symbolic tracing, torch.export when that fails), "
         "fx, or export (torch.export, e.g. for Hugging Face transformers models).")]


# ----------------------------------------------------------------------------------------------
# output

def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    # Piped or captured output gets a fixed, wide layout instead of rich's 80-column default.
    return Console(file=stream, stderr=stderr, width=None if tty else 120, highlight=False)


def error(message: str) -> None:
    from rich.text import Text

    console(stderr=True).print(Text(f"error: {message}", style="red"), soft_wrap=True)


def warn(message: str, out=None) -> None:
    from rich.text import Text

    (out or console(stderr=True)).print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)


@contextlib.contextmanager
def status(message: str):
    """A spinner on stderr while something slow runs (only on a terminal: logs stay clean)."""
    if sys.stderr.isatty():
        with console(stderr=True).status(message):
            yield
    else:
        yield


def user_errors(fn):
    """Turn a TokenoptError raised by a command into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TokenoptError as e:
            error(str(e))
            raise typer.Exit(getattr(e, "exit_code", 2)) from None

    return wrapper


def print_notes(skipped, notes, out) -> None:
    for path, why in skipped:
        warn(f"{path} left unchanged: {why}", out)
    for n in notes:
        warn(n, out)


@contextlib.contextmanager
def quiet_plan_warnings():
    """Plan warnings come back in the plan/report and are printed from there, once."""
    from tokenopt.plan import TokenoptWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenoptWarning)
        yield


# ----------------------------------------------------------------------------------------------
# inputs: models, recipes, images

def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """``3,224,224`` (or ``3x224x224``), ``224,160`` (3 channels) or ``224`` (square, 3 channels)."""
    if text is None:
        return None
    parts = re.split(r"[,x]", text.strip().lower())
    dims = tuple(int(p) for p in parts) if all(p.strip().isdigit() for p in parts) else ()
    if len(dims) == 1:
        dims = (3, dims[0], dims[0])
    elif len(dims) == 2:
        dims = (3, *dims)
    if len(dims) != 3 or min(dims) <= 0:
        raise typer.BadParameter(f"{text!r}: write C,H,W (e.g. 3,224,224), H,W or a single size.",
                                 param_hint="--input-size")
    return dims  # type: ignore[return-value]


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if not values:
        raise typer.BadParameter(f"{text!r}: write numbers separated by commas, e.g. 0.5,0.5,0.5.", param_hint=flag)
    return values


def preprocess_options(input_size: str | None = None, mean: str | None = None, std: str | None = None,
                       interpolation: str | None = None, crop_pct: float | None = None) -> dict:
    """The preprocessing flags as timm data-config overrides (only those given); format checked here,
    the number of --mean/--std values against the model's channels in :func:`open_dataset`."""
    out: dict = {}
    if input_size is not None:
        out["input_size"] = parse_input_size(input_size)
    for key, text, flag in (("mean", mean, "--mean"), ("std", std, "--std")):
        values = _floats(text, flag)
        if values is not None:
            out[key] = values
    if "std" in out and any(v <= 0 for v in out["std"]):
        raise typer.BadParameter(f"{std!r}: every standard deviation must be above 0.", param_hint="--std")
    if interpolation is not None:
        if interpolation.lower() not in INTERPOLATIONS:
            raise typer.BadParameter(f"{interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}.",
                                     param_hint="--interpolation")
        out["interpolation"] = interpolation.lower()
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise typer.BadParameter(f"{crop_pct}: a fraction in (0, 1], e.g. 0.875.", param_hint="--crop-pct")
        out["crop_pct"] = float(crop_pct)
    return out


def example_input(model, size: tuple[int, int, int] | None):
    import torch

    from tokenopt.analysis import example_input_for

    if size is None:    # the model's own size: the same rule as the API's (example_input_for)
        return example_input_for(model)
    if callable(getattr(model, "tokenopt_example", None)):   # a denoiser: --input-size is the latent's H,W
        return example_input_for(model, size=size[1:])
    p = next(iter(model.parameters()), None)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    return x.to(p.device, p.dtype) if p is not None and p.is_floating_point() else x


def load_model(spec: str, arch: str | None, trust_pickle: bool, weights: Path | None = None):
    """``(model, base)`` for the MODEL argument (see :func:`tokenopt.sources.load_model`)."""
    from tokenopt import sources

    with status(f"loading {spec}"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", sources.SourceWarning)
        loaded = sources.load_model(spec, arch, trust_pickle, weights=weights)
    for w in caught:   # a loader's note is one "warning:" line like the others; the rest as Python shows them
        if issubclass(w.category, sources.SourceWarning):
            warn(str(w.message), console(stderr=True))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded


def load_model_or_artifact(spec: str, arch: str | None, trust_pickle: bool, weights: Path | None = None):
    """A base model as :func:`load_model` loads it, or an optimized one rebuilt from a tokenopt artifact file
    (for the verbs that run a model as it is: generate, eval of a generator)."""
    from tokenopt import artifact, files

    path = Path(spec)
    if path.is_file() and weights is None:
        with status(f"reading {spec}"):
            obj = files.read_checkpoint(path, trust_pickle=trust_pickle)
        if artifact.is_artifact(obj):
            with status("rebuilding the optimized model"):
                return artifact.rebuild(artifact.validate_payload(obj, path), arch, source=str(path)), None
    return load_model(spec, arch, trust_pickle, weights)


def load_recipe(path: str, strict: bool = False):
    from tokenopt.recipe import load_recipe as _load_recipe

    rec = _load_recipe(Path(path))
    rec.strict = rec.strict or strict
    return rec


def open_dataset(data: str, model, split: str, limit: int | None, preprocess: dict | None = None, masks=None):
    """The DATA argument (digits, digits-clutter, an ImageFolder) preprocessed for ``model`` (``preprocess``:
    the flags of :func:`preprocess_options`); the first ``limit`` images.

    ``masks``: items carry object masks (True for a built-in set that draws them, a directory for an ImageFolder).
    """
    import torch

    from tokenopt.data import get_dataset
    from tokenopt.data.config import check_channels, data_config

    preprocess = dict(preprocess or {})
    if "mean" in preprocess or "std" in preprocess:
        channels = data_config(model, **preprocess)["input_size"][0]
        check_channels(preprocess.get("mean"), "--mean", channels)
        check_channels(preprocess.get("std"), "--std", channels)
    ds = get_dataset(data, split, model=model, preprocess=preprocess, masks=masks)
    if len(ds) == 0:
        raise DataError(f"data set '{data}' ({split}) has no images")
    if limit is not None and limit < len(ds):
        ds = torch.utils.data.Subset(ds, range(limit))
    return ds


def first_images(ds, n: int):
    """The first ``n`` images of ``ds`` stacked into one batch."""
    import torch

    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])
