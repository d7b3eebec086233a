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

    ``extra="forbid"`` makes an unknown key in a recipe rule an error rather than a silent no-op;
    ``strict=True`` refuses a value of another type instead of converting it (``r: yes`` is not 1,
    ``prop_attn: 1`` is not true, ``r: "5"`` and ``r: 5.0`` are not 5); an int is still a float.
    """

    model_config = ConfigDict(extra="forbid", strict=True)


class Pass:
    """Base class: one token-reduction method."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    #: True when the pass changes the number of tokens that later blocks see.
    changes_token_count: ClassVar[bool] = False

    def refuse(self, block) -> str | None:
        """None when the block can be rewritten, else the reason shown to the user."""
        return block.refusal

    def layer_options(self, options: PassOptions, n_layers: int, where: str) -> list[dict]:
        """Expand a rule's options into one dict per selected layer (schedules live here)."""
        return [options.model_dump() for _ in range(n_layers)]

    def needs_calibration(self, options: PassOptions) -> bool:
        """True when planning this rule needs calibration images (e.g. ToFu's op: auto)."""
        return False

    def resolve(self, per_layer: list[dict], blocks: list, context: dict) -> list[dict]:
        """Fill in per-layer choices that depend on measurements in ``context`` (default: none)."""
        return per_layer

    def plan_layer(self, block, opts: dict, tokens_in: int, prefix: int) -> "LayerStep":
        raise NotImplementedError

    def rewrite(self, g, block, step: "LayerStep") -> None:
        """Insert this pass's ops for ``block`` using the GraphRewriter ``g``."""
        raise NotImplementedError


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
    from tokenopt.passes import tofu, tome  # noqa: F401
    from tokenopt.passes import tosa  # noqa: F401


from dataclasses import dataclass as _dataclass, field as _field


@_dataclass
class LayerStep:
    """What a pass will do at one layer, decided before rewriting."""

    tokens_out: int
    params: dict = _field(default_factory=dict)   # what rewrite() needs, e.g. {"r": 13}
    describe: str = ""                            # shown in the report, e.g. "merge r=13"
    shortfall: str = ""                           # non-empty: asked for more than the layer can give
