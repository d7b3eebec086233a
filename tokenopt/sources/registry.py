"""The registry of model sources: one :class:`Source` per kind of MODEL spec, registered with a decorator.

    @register_source
    class TimmSource(Source):
        kind, prefix = "timm", "timm:"
        help = "timm:<name>[?key=value&...]"
        def parse(self, spec): ...      # spec -> base dict
        def build(self, base): ...      # base dict -> nn.Module (random weights)
        def to_spec(self, base): ...    # base dict -> spec, for messages

A *base* dict says how to rebuild an architecture (``{"kind": "timm", "name": ..., "kwargs": ...}``);
artifacts store it, and its ``kind`` names the source that rebuilds it. The CLI's MODEL help is
:func:`model_help`, written from the sources registered here, so a new source shows up there too.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tokenopt.errors import ModelLoadError
from tokenopt.sources.spec import parse_query, with_query

if TYPE_CHECKING:
    from torch import nn

# optional dependency -> the extra of tokenopt that installs it
EXTRAS = {"transformers": "hf", "open_clip": "openclip", "diffusers": "diffusion"}


class SourceWarning(UserWarning):
    """A model loaded, with something the user should know (e.g. default preprocessing); the CLI prints it."""


class Source:
    """One kind of model spec; a subclass sets the class attributes and overrides what applies."""

    kind: str = ""            # the base dict's "kind"
    prefix: str = ""          # the spec prefix it answers ("timm:"); "" when :meth:`matches` decides
    help: str = ""            # how to write its spec, one entry of the CLI's MODEL help ("" to leave it out)
    names_arch: bool = False  # the spec names an architecture with random weights (--weights / arch= fill it)
    file_wins: bool = False   # an existing file of the same name is read as a file instead

    def matches(self, spec: str) -> bool:
        return bool(self.prefix) and spec.startswith(self.prefix)

    def parse(self, spec: str) -> dict:
        """The base dict ``spec`` names (sources that name an architecture)."""
        raise ModelLoadError(f"{spec} does not name an architecture.")

    def load(self, spec: str) -> tuple[nn.Module, dict]:
        """The model ``spec`` names and its base dict; an architecture source builds it with random weights."""
        base = self.parse(spec)
        return self.build(base), base

    def build(self, base: dict) -> nn.Module:
        """Rebuild the architecture ``base`` describes (random weights, or the source's own trained ones)."""
        raise NotImplementedError

    def to_spec(self, base: dict) -> str | None:
        """The spec that rebuilds ``base`` (for messages), or None when there is none."""
        return None

    def arch_conflict(self, spec: str) -> str:
        """Why ``--arch`` (for weight files) does not go with ``spec``."""
        return f"{spec} already names the architecture (random weights); --arch is only for weight files " \
               "(to load weights into it, pass --weights FILE)."

    def weights_for(self, state: dict) -> dict:
        """The part of a checkpoint's state dict that this architecture holds (``--weights``)."""
        return state


class NamedSource(Source):
    """A source whose spec is ``prefix<name>[?key=value&...]``: a named architecture with keyword
    arguments (timm, torchvision, open_clip); a subclass says how to build one (:meth:`build_named`)."""

    names_arch = True

    def parse(self, spec: str) -> dict:
        name, kwargs = parse_query(spec[len(self.prefix):])
        return {"kind": self.kind, "name": name, "kwargs": kwargs}

    def build(self, base: dict):
        return self.build_named(base["name"], dict(base.get("kwargs") or {}))

    def build_named(self, name: str, kwargs: dict):
        raise NotImplementedError

    def to_spec(self, base: dict) -> str:
        return self.prefix + with_query(base["name"], base.get("kwargs"))


class FolderSource(Source):
    """A source whose spec is ``prefix<folder>``: a saved folder whose config.json names the
    architecture and whose files hold the weights (hf, diffusers). A subclass names the library
    (``library``) and says how to load a folder and rebuild a base (:meth:`load_folder`, :meth:`build`)."""

    library: str = ""

    def load(self, spec: str):
        return self.load_folder(spec[len(self.prefix):].strip())

    def load_folder(self, folder: str):
        raise NotImplementedError

    def to_spec(self, base: dict) -> str | None:
        return base.get("spec")

    def arch_conflict(self, spec: str) -> str:
        return (f"{spec} is a {self.library} folder: config.json names the architecture and the folder holds the "
                "weights; --arch is only for weight files.")


_SOURCES: dict[str, Source] = {}     # kind -> source, in registration order


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: register one instance of ``cls`` under its ``kind``."""
    if not cls.kind or cls.kind in _SOURCES:
        raise ValueError(f"model source {cls.__name__} needs a kind of its own, got {cls.kind!r}")
    _SOURCES[cls.kind] = cls()
    return cls


def registered() -> list[Source]:
    """The sources, those answering a prefix first (``timm:x`` also reads as ``package:callable``)."""
    return sorted(_SOURCES.values(), key=lambda s: not s.prefix)


def source_for_spec(spec: str) -> Source | None:
    return next((s for s in registered() if s.matches(spec)), None)


def model_help() -> str:
    """The CLI's MODEL help: every source's spec, then what files it reads."""
    lines = [s.help for s in registered() if s.help]
    return ", ".join(lines) + ", a state dict (.pt/.pth/.bin/.safetensors, with --arch) or a pickled model " \
                              "(with --trust-pickle)."


_OPTIONS = "[?key=value&...]"


def arch_help() -> str:
    """How to name an architecture (for --arch): the sources that name one. The ``?key=value&...``
    they share is said once at the end: repeated after each name, it made words too long for an
    80-column help panel, which cut them (``timm:<name>[?key=valu…``)."""
    specs = [s.help.split(" (")[0] for s in registered() if s.names_arch and s.help]
    names = [spec.removesuffix(_OPTIONS) for spec in specs]
    text = ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1] if names else ""
    if any(spec.endswith(_OPTIONS) for spec in specs):
        text += ", each optionally followed by ?key=value&... (constructor arguments)"
    return text


def parse_arch(arch: str) -> dict:
    """The base dict an architecture spec names (nothing is built)."""
    arch = arch.strip()
    src = source_for_spec(arch)
    if src is None or not src.names_arch:
        raise ModelLoadError(f"cannot read the architecture {arch!r}: expected {arch_help()} "
                             "(a factory is a callable that returns an nn.Module).")
    return src.parse(arch)


def build_base(base: dict) -> nn.Module:
    """Rebuild an architecture from a base dict written by :func:`tokenopt.sources.load_model`."""
    src = _SOURCES.get(base.get("kind"))
    if src is None:
        raise ModelLoadError(f"unknown base model description {base!r}; pass the architecture explicitly (arch=...).")
    return src.build(base)


def build_arch(arch: str | dict) -> tuple[nn.Module, dict]:
    """Build an architecture with random weights from an architecture spec or a base dict."""
    base = dict(arch) if isinstance(arch, dict) else parse_arch(arch)
    return build_base(base), base


def base_to_spec(base: dict) -> str | None:
    """The spec string that rebuilds ``base`` (for messages), or None (a class)."""
    src = _SOURCES.get(base.get("kind"))
    return src.to_spec(base) if src is not None else None


def require(module: str, what: str):
    """Import an optional dependency, or one message naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module]
        raise ModelLoadError(f"{what} needs the Python package {module!r}, which is not installed.\n"
                             f"  Install it with: pip install 'tokenopt[{extra}]'") from None
