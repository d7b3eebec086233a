"""The pass interface and its registry.

A pass is a small class that says which blocks it refuses (and why) and how it rewrites an
accepted block. Each method lives in its own module under ``tokenopt/passes`` and registers itself
by name with :func:`register_pass`; recipes refer to passes by that name.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class PassOptions(BaseModel):
    """Options shared by every pass; a pass extends this with its own fields.

    ``extra="forbid"`` makes an unknown key in a recipe rule an error rather than a silent no-op.
    """

    model_config = ConfigDict(extra="forbid")


class Pass:
    """Base class: one token-reduction method."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    #: True when the pass changes the number of tokens that later blocks see.
    changes_token_count: ClassVar[bool] = False

    def refuse(self, block) -> str | None:  # pragma: no cover - overridden
        """None when the block can be rewritten, else the reason shown to the user."""
        return block.refusal


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(name: str):
    """Class decorator: make a pass available to recipes under ``name``."""

    def wrap(cls: type[Pass]) -> type[Pass]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_pass(name: str) -> type[Pass]:
    _load_builtin_passes()
    return _REGISTRY[name]


def available_passes() -> list[str]:
    _load_builtin_passes()
    return sorted(_REGISTRY)


def _load_builtin_passes() -> None:
    # Importing the modules runs their @register_pass decorators.
    from tokenopt.passes import tome  # noqa: F401
