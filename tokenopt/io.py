"""Loading models (the CLI's ``MODEL``) and writing files without ever leaving half of one.

A model is named by a *spec*::

    timm:vit_small_patch16_224?img_size=64&depth=4     a timm architecture, random init (never downloads)
    mypkg.models:make_vit?dim=256                      a factory (any callable returning an nn.Module)
    model.pt / model.pth / model.bin                   a state dict or checkpoint, plus ``arch``
    model.safetensors                                  a safetensors state dict, plus ``arch``
    whole_model.pt                                     a pickled nn.Module, only with ``trust_pickle``
    demo:digits-clutter                                a trained demo ViT from the cache (``tokenopt demo`` trains it)
    hf:path/to/folder                                  a Hugging Face save_pretrained folder (families.py)
    open_clip:ViT-B-32[?key=value]                     open_clip's visual tower, random init (or ``weights``)
    torchvision:vit_b_16[?key=value]                   a torchvision model, random init (or ``weights``)

:func:`load_model` returns the model in eval mode and a *base* dict that says how to rebuild the
architecture (artifacts store it; the weights travel separately)::

    {"kind": "timm", "name": "vit_small_patch16_224", "kwargs": {"img_size": 64}}
    {"kind": "factory", "factory": "mypkg.models:make_vit", "kwargs": {"dim": 256}}
    {"kind": "class", "class": "mypkg.models:MyViT"}          # rebuilt by calling MyViT()
    {"kind": "demo", "name": "digits-clutter"}                # tokenopt's embedded demo models
    {"kind": "hf", "spec": "hf:DIR", "class": "ViTModel", "config": {...}}   # rebuilt from the config alone
    {"kind": "open_clip" | "torchvision", "name": "...", "kwargs": {...}}

plus ``"weights": <path>`` when the model came from a file (for the record only).

Checkpoints are read with ``torch.load(weights_only=True)``: a file that needs arbitrary Python
objects to load is refused with the names of the classes it would import, unless the caller
says it trusts the file.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote

import torch
from torch import nn

from tokenopt import families
from tokenopt.demo_specs import DEMOS, demo_files, describe
from tokenopt.errors import ModelLoadError, TokenoptError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
SAFETENSORS_SUFFIX = ".safetensors"
# Keys under which training scripts commonly nest the weights ({"state_dict": ...}, {"model": ...}).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "state_dict_ema", "model_ema")
# Prefixes added by DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")

_HOW_TO_NAME = ("  Name a model as timm:<name>[?key=value&...], package.module:factory, demo:digits | "
                "demo:digits-clutter (trained demo ViTs), hf:<save_pretrained folder>, open_clip:<arch>, "
                "torchvision:<name>, or a checkpoint file (.pt/.pth/.bin/.safetensors) with --arch.")
# spec prefixes that name an architecture built with random weights (``weights=`` fills them)
_ARCH_PREFIXES = {"timm:": "timm", "open_clip:": "open_clip", "torchvision:": "torchvision"}


# ----------------------------------------------------------------------------------------------
# spec parsing

def parse_value(text: str) -> Any:
    """``64`` -> 64, ``0.1`` -> 0.1, ``true`` -> True, ``none`` -> None, ``64,64`` -> (64, 64), else the string."""
    text = unquote(text.strip())
    if "," in text:
        return tuple(parse_value(p) for p in text.split(",") if p.strip() != "")
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_query(spec: str) -> tuple[str, dict[str, Any]]:
    """``name?a=1&b=x`` -> ``("name", {"a": 1, "b": "x"})``."""
    name, _, query = spec.partition("?")
    kwargs: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        key = unquote(key.strip())
        if not eq or not key.isidentifier():
            raise ModelLoadError(f"bad keyword argument {part!r} in {spec!r}: write key=value pairs joined by &, "
                                 "e.g. timm:vit_small_patch16_224?img_size=64&depth=4")
        if key in kwargs:
            raise ModelLoadError(f"keyword argument {key!r} is given twice in {spec!r}; keep only one.")
        kwargs[key] = parse_value(value)
    return name.strip(), kwargs


def _format_kwargs(kwargs: dict) -> str:
    def fmt(v):
        if isinstance(v, (tuple, list)):
            return ",".join(map(fmt, v))
        return str(v).lower() if isinstance(v, bool) else str(v)  # parse_value reads true/false back
    return "&".join(f"{k}={fmt(v)}" for k, v in kwargs.items())


def base_to_spec(base: dict) -> str | None:
    """The spec string that rebuilds ``base`` (for messages), or None for a class."""
    q = _format_kwargs(base.get("kwargs") or {})
    if base.get("kind") in ("timm", "open_clip", "torchvision"):
        return f"{base['kind']}:{base['name']}" + (f"?{q}" if q else "")
    if base.get("kind") == "hf":
        return base.get("spec")
    if base.get("kind") == "factory":
        return base["factory"] + (f"?{q}" if q else "")
    if base.get("kind") == "demo":
        return f"demo:{base['name']}"
    return None


def is_factory_spec(spec: str) -> bool:
    return bool(_FACTORY.match(spec.partition("?")[0].strip()))


# ----------------------------------------------------------------------------------------------
# building architectures

def build_arch(arch: str | dict) -> tuple[nn.Module, dict]:
    """Build an architecture with random weights from ``timm:<name>?kw``, ``pkg.mod:factory?kw`` or a base dict."""
    if isinstance(arch, dict):
        return build_base(arch), dict(arch)
    arch = arch.strip()
    for prefix, kind in _ARCH_PREFIXES.items():
        if arch.startswith(prefix):
            name, kwargs = parse_query(arch[len(prefix):])
            base = {"kind": kind, "name": name, "kwargs": kwargs}
            return build_base(base), base
    if is_factory_spec(arch):
        path, kwargs = parse_query(arch)
        return build_factory(path, kwargs), {"kind": "factory", "factory": path, "kwargs": kwargs}
    raise ModelLoadError(f"cannot read the architecture {arch!r}: expected timm:<name>[?key=value&...], "
                         "open_clip:<arch>, torchvision:<name> or "
                         "package.module:factory[?key=value&...] (a callable that returns an nn.Module).")


def build_base(base: dict) -> nn.Module:
    """Rebuild an architecture (random weights) from a base dict written by :func:`load_model`."""
    kind = base.get("kind")
    if kind == "timm":
        return build_timm(base["name"], dict(base.get("kwargs") or {}))
    if kind == "factory":
        return build_factory(base["factory"], dict(base.get("kwargs") or {}))
    if kind == "class":
        return build_factory(base["class"], {}, what="class")
    if kind == "demo":
        return load_demo(base["name"])
    if kind == "open_clip":
        return families.build_open_clip(base["name"], dict(base.get("kwargs") or {}))
    if kind == "torchvision":
        return families.build_torchvision(base["name"], dict(base.get("kwargs") or {}))
    if kind == "hf":
        return families.build_hf(base)
    raise ModelLoadError(f"unknown base model description {base!r}; pass the architecture explicitly (arch=...).")


def load_demo(name: str) -> nn.Module:
    """A trained demo model (``demo:digits``, ``demo:digits-clutter``) from the cache; never trains.

    Training is ``tokenopt demo`` (or :func:`tokenopt.demo.demo_model`): loading a model must not
    start minutes of work, and a model that is missing or stale is a user error that says so.
    """
    if name not in DEMOS:
        raise ModelLoadError(f"unknown demo model '{name}': choose one of {', '.join(DEMOS)}")
    found = cached_demo(name)
    if found is None:
        weights, _ = demo_files(name)
        raise ModelLoadError(
            f"demo:{name} is not trained yet (no up-to-date weights at {weights}).\n"
            f"  Run `tokenopt demo --model {name}` first: it trains the demo model once (a few CPU minutes) "
            "and caches it under $TOKENOPT_CACHE (default ~/.cache/tokenopt).")
    return found[0]


def cached_demo(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[nn.Module, dict] | None:
    """The cached demo model ``name`` (eval mode) and its info dict, if it was trained from its current spec.

    None when there is no cache entry, when it was trained from another spec, or when it cannot
    be read: a damaged or foreign entry is retrained (by ``tokenopt demo``) rather than trusted.
    """
    spec = DEMOS[name]
    weights, meta = demo_files(name, cache_dir)
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("spec_digest") != spec.digest():
            return None
        from safetensors.torch import load_file

        model = build_arch(info["arch"])[0]
        model.load_state_dict(load_file(weights))
    except Exception:
        return None
    describe(model, spec)
    info["weights"] = str(weights)
    return model.eval(), info


def build_timm(name: str, kwargs: dict) -> nn.Module:
    import timm

    if not name:
        raise ModelLoadError("timm: needs a model name, e.g. timm:vit_small_patch16_224")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown timm model {name!r}.{hint}\n"
                             "  List the names with `python -c \"import timm; print(timm.list_models('vit*'))\"`.")
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # bad kwargs raise TypeError/AssertionError/ValueError from the model's __init__
        raise ModelLoadError(f"timm could not build {name!r} with {kwargs or 'no arguments'}: "
                             f"{type(e).__name__}: {_first_line(e)}\n"
                             "  Check the keyword arguments after '?' (e.g. img_size=64&depth=4).") from None
    return model


def resolve_callable(path: str, what: str = "factory") -> Callable:
    """``package.module:qual.name`` -> the object. The working directory is importable, as with ``python -m``."""
    mod_name, _, qual = path.partition(":")
    if not mod_name or not qual:
        raise ModelLoadError(f"bad {what} path {path!r}: write it as package.module:name.")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelLoadError(f"cannot import module {mod_name!r} for the {what} {path!r}: {_first_line(e)}\n"
                             "  Check the spelling, install the package, or run from the folder that contains it "
                             "(or add that folder to PYTHONPATH).") from None
    except Exception as e:
        raise ModelLoadError(f"importing module {mod_name!r} for the {what} {path!r} failed: "
                             f"{type(e).__name__}: {_first_line(e)}") from None
    for part in qual.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelLoadError(f"{mod_name!r} has no {part!r} (looking up the {what} {path!r}).{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"{path!r} is a {type(obj).__name__}, not a callable that builds a model.")
    return obj


def build_factory(path: str, kwargs: dict, what: str = "factory") -> nn.Module:
    fn = resolve_callable(path, what)
    try:
        model = fn(**kwargs)
    except Exception as e:
        args = f"with {kwargs}" if kwargs else "with no arguments"
        raise ModelLoadError(f"calling the {what} {path!r} {args} failed: {type(e).__name__}: {_first_line(e)}\n"
                             "  Give the arguments it needs after '?' (e.g. "
                             f"{path}?dim=256&depth=12), or name a factory that needs none.") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"the {what} {path!r} returned a {type(model).__name__}, not an nn.Module.")
    return model


# ----------------------------------------------------------------------------------------------
# reading files

def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """The object stored in ``path`` (state dict, checkpoint dict, or with trust a pickled module).

    Reads safetensors files and torch files with ``weights_only=True``; only ``trust_pickle``
    allows a file that imports Python classes.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}\n  Check the path." + ("" if path.suffix else
                             "\n" + _HOW_TO_NAME))
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a model file.\n"
                             "  Name the checkpoint file inside it (.pt/.pth/.bin/.safetensors).")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Only "Unsupported global" means a well-formed pickle that wants to import code; anything
        # else the weights-only unpickler trips on ("Unsupported operand ...") is a damaged file.
        if "Unsupported global" not in str(e):
            raise _corrupt(path, e) from None
        if not trust_pickle:
            raise _untrusted(path, e) from None
    except Exception as e:  # truncated zip (RuntimeError), empty (EOFError), not a torch file (KeyError...)
        raise _corrupt(path, e) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"loading {path} as a pickle (--trust-pickle) failed: {type(e).__name__}: "
                             f"{_first_line(e)}\n  The classes it was saved with must be importable: install their "
                             "package or run from the folder that contains their module.") from None


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: not a valid safetensors file ({_first_line(e)}).\n"
                             "  The file is probably truncated or corrupt: copy or save it again.") from None


def _corrupt(path: Path, e: BaseException) -> ModelLoadError:
    size = path.stat().st_size
    text = str(e)
    if "WeightsUnpickler error:" in text:  # skip torch's paragraph about weights_only defaults
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    detail = f"{type(e).__name__}: {text.strip().splitlines()[0]}" if text.strip() else type(e).__name__
    if len(detail) > 160:
        detail = detail[:157] + "..."
    what = "the file is empty" if size == 0 else "it is truncated, corrupt, or not a PyTorch checkpoint"
    return ModelLoadError(f"cannot read checkpoint {path} ({size} bytes): {what} ({detail}).\n"
                          "  Copy or save it again (torch.save(model.state_dict(), path) or safetensors).")


def unsafe_globals(path: Path, error: BaseException | None = None) -> list[str]:
    """The classes/functions a pickle would import: the one torch tripped on first (for a whole
    pickled model, its class), then user code, then torch's own."""
    first = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(error)) if error is not None else []
    names: list[str] = []
    getter = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if getter is not None:
        try:
            names = list(getter(str(path)))
        except Exception:
            names = []
    rest = sorted(set(names) - set(first), key=lambda n: (n.startswith(("torch.", "collections.", "builtins.")), n))
    return first + rest


def _untrusted(path: Path, e: BaseException) -> ModelLoadError:
    names = unsafe_globals(path, e)
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return ModelLoadError(
        f"{path} is a pickled Python object (a whole model, or a checkpoint holding Python objects), not plain "
        f"weights; loading it would import and run code from: {shown or 'unknown classes'}.\n"
        "  If you trust this file, pass --trust-pickle (API: trust_pickle=True). Safer: save "
        "model.state_dict() (torch.save or safetensors) and pass it with --arch naming the architecture.")


def extract_state_dict(obj: Any, path: Path | str = "") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a state dict or a training checkpoint, wrapper prefixes removed."""
    where = f" in {path}" if path else ""
    for _ in range(3):  # {"state_dict": {"model": {...}}} is not unheard of
        if isinstance(obj, dict) and not _all_tensors(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ModelLoadError(f"no weights found{where}: expected a state dict (name -> tensor), got "
                             f"{'an empty dict' if isinstance(obj, dict) else type(obj).__name__}.")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(repr, list(obj)[:6]))
        raise ModelLoadError(f"no weights found{where}: its top-level keys are {keys}, none holding tensors.\n"
                             f"  Save model.state_dict() itself, or nest it under one of "
                             f"{', '.join(_WRAPPER_KEYS[:3])}.")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _all_tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch_hint: str = "--arch",
                 model_name: str | None = None) -> None:
    """``model.load_state_dict(state)`` with a readable error for missing, unexpected and misshapen keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", wrong)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
        raise ModelLoadError(f"the weights in {source} do not fit the architecture {model_name or type(model).__name__}: "
                             f"{'; '.join(parts)}.\n  Check {arch_hint}: same model name and the same keyword "
                             "arguments (depth, embed_dim, img_size, num_classes...) as when it was trained.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"loading the weights in {source} failed: {_first_line(e)}") from None


# ----------------------------------------------------------------------------------------------
# the front door

def load_model(spec: str | os.PathLike | nn.Module, arch: str | dict | nn.Module | None = None,
               trust_pickle: bool = False, weights: str | os.PathLike | None = None) -> tuple[nn.Module, dict]:
    """Load ``spec`` (see the module docstring); returns ``(model.eval(), base)``.

    ``arch`` builds the architecture for a state dict: ``timm:<name>?kw``, ``package.module:factory?kw``,
    a base dict, or an already-built nn.Module (its weights are replaced). ``weights`` is the other
    way round: ``spec`` names the architecture (``open_clip:ViT-B-32``, ``timm:...``) and ``weights``
    a local state dict or checkpoint for it (read ``weights_only``; an open_clip checkpoint of a
    whole CLIP model gives its ``visual.`` weights).
    """
    if isinstance(spec, nn.Module):
        return spec.eval(), module_base(spec)
    spec_str = os.fspath(spec).strip()
    if not spec_str:
        raise ModelLoadError("no model given.\n" + _HOW_TO_NAME)
    path = Path(spec_str)
    if weights is not None:
        return _arch_with_weights(spec_str, arch, weights, trust_pickle)
    if spec_str.startswith("demo:") and not path.exists():
        if arch is not None:
            raise ModelLoadError(f"{spec_str} is a trained demo model; --arch is only for weight files.")
        name = spec_str[len("demo:"):]
        return load_demo(name).eval(), {"kind": "demo", "name": name}
    if spec_str.startswith("hf:"):
        if arch is not None:
            raise ModelLoadError(f"{spec_str} is a Hugging Face folder: config.json names the architecture and "
                                 "the folder holds the weights; --arch is only for weight files.")
        model, base = families.load_hf(spec_str[len("hf:"):].strip())
        model.tokenopt_base = base   # tokenopt.save(optimize(model, ...)) rebuilds it from this
        return model, base
    if spec_str.startswith(tuple(_ARCH_PREFIXES)) or (not path.exists() and is_factory_spec(spec_str)):
        if arch is not None:
            raise ModelLoadError(f"{spec_str} already names the architecture (random weights); --arch is only "
                                 "for weight files (to load weights into it, pass --weights FILE).")
        model, base = build_arch(spec_str)
        if base["kind"] in ("open_clip", "torchvision"):
            model.tokenopt_base = base
        return model.eval(), base
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}\n  Check the path."
                             + ("" if path.suffix in CHECKPOINT_SUFFIXES + (SAFETENSORS_SUFFIX,) else "\n" + _HOW_TO_NAME))
    return model_from_checkpoint(read_checkpoint(path, trust_pickle=trust_pickle), path, arch)


def _arch_with_weights(spec: str, arch, weights: str | os.PathLike, trust_pickle: bool) -> tuple[nn.Module, dict]:
    """``spec`` names an architecture, ``weights`` the file that fills it."""
    if arch is not None:
        raise ModelLoadError(f"give either --weights (with MODEL naming the architecture) or --arch (with MODEL "
                             f"naming the weight file), not both: got MODEL {spec!r}, --arch {arch!r}.")
    if not (spec.startswith(tuple(_ARCH_PREFIXES)) or is_factory_spec(spec)):
        raise ModelLoadError(f"--weights {weights}: MODEL must name an architecture (timm:<name>, open_clip:<arch>, "
                             f"torchvision:<name> or package.module:factory), not {spec!r}.")
    model, base = build_arch(spec)
    path = Path(weights)
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    module = obj if isinstance(obj, nn.Module) else None
    state = extract_state_dict(module.state_dict() if module is not None else obj, path)
    if base["kind"] == "open_clip":
        state = families.open_clip_visual_state(state)
    load_weights(model, state, str(path), arch_hint="MODEL")
    base = dict(base)
    base["weights"] = str(path)
    if base["kind"] in ("open_clip", "torchvision"):
        model.tokenopt_base = base
    return model.eval(), base


def model_from_checkpoint(obj: Any, path: str | os.PathLike, arch: str | dict | nn.Module | None = None
                          ) -> tuple[nn.Module, dict]:
    """The model in an object :func:`read_checkpoint` returned (see :func:`load_model`)."""
    path = Path(path)
    if isinstance(obj, dict) and obj.get("format") == "tokenopt-artifact":
        raise ModelLoadError(f"{path} is a tokenopt artifact (an already optimized model), not a base model.\n"
                             "  Load it with tokenopt.load(path) or look at it with `tokenopt inspect`; to apply "
                             "another recipe, start from the original model.")
    # a pickled module, possibly inside a checkpoint dict ({"model": <nn.Module>})
    module = obj if isinstance(obj, nn.Module) else None
    if module is None and isinstance(obj, dict):
        module = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), nn.Module)), None)
    if module is not None and arch is None:
        base = module_base(module)
        base["weights"] = str(path)
        return module.eval(), base
    # the user named an architecture: a pickled module only provides its weights
    state = extract_state_dict(module.state_dict() if module is not None else obj, path)
    if arch is None:
        raise ModelLoadError(f"{path} holds only weights (a state dict of {len(state)} tensors), not an architecture.\n"
                             "  Pass --arch (API: arch=) naming it: timm:<name>[?key=value&...] or "
                             "package.module:factory[?key=value&...].")
    if isinstance(arch, nn.Module):
        model, base = arch, module_base(arch)
    else:
        model, base = build_arch(arch)
    load_weights(model, state, str(path))
    base = dict(base)
    base["weights"] = str(path)
    return model.eval(), base


def module_base(module: nn.Module) -> dict:
    """The best description we have of an already-built module: its class (rebuilt with no arguments)."""
    base = getattr(module, "tokenopt_base", None)
    if isinstance(base, dict):
        return dict(base)
    return {"kind": "class", "class": f"{type(module).__module__}:{type(module).__qualname__}"}


# ----------------------------------------------------------------------------------------------
# writing

def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before any heavy work) when ``path`` cannot be written: its folder must exist."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise TokenoptError(f"output path {path} is a directory; name a file inside it.")
    if not folder.exists():
        raise TokenoptError(f"output folder does not exist: {folder}\n  Create it first (mkdir -p {folder}) "
                            "or choose another path.")
    if not folder.is_dir():
        raise TokenoptError(f"output folder {folder} is not a directory.")
    if not os.access(folder, os.W_OK):
        raise TokenoptError(f"output folder {folder} is not writable.")
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on any error it is removed.

    Readers never see a half-written file, and a failed run leaves no file behind.
    """
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name, not a file object
    (ONNX): renamed to ``path`` on success, removed on any error."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
