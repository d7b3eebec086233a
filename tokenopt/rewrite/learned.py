"""Learned parts: the small networks a pass inserts and a trainer fits (ToSA's selectors, SPA's gates).

Every kind of learned part is registered once, by the pass that inserts it, as a :class:`LearnedKind`;
everything else works from the kind, never from the pass's name::

    SELECTORS = register_learned(LearnedKind("tosa_selectors", TokenSelector, "ToSA selectors", ...))
    call = g.add_learned(block, SELECTORS, module, *inputs)   # -> submodule "tosa_selectors.<layer>"
    learned_modules(model, SELECTORS)                         # {layer: module}, also under DDP's "module."
    kinds_in(model)                                           # the kinds a rewritten model holds

Each part has a ``trained`` buffer (saved with the weights). One forward pre-hook per model,
:func:`check_trained`, warns once per kind while a part is untrained (``strict: true``: refuses),
so a model saved before training says so when it is used. The trainers (``tokenopt.train``) are
registered by the module type a kind names, so the command line dispatches through the kind too.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tokenopt.errors import PlanError
from tokenopt.record import record_of


@dataclass(frozen=True)
class LearnedKind:
    """One kind of learned part.

    prefix: submodules are named ``{prefix}.{layer index}`` in the rewritten model (and its state_dict).
    module_type: the ops class of the part (the trainer registry's key).
    noun: how messages name the parts ("ToSA selectors").
    warning: the warning category for untrained parts.
    untrained: what an untrained part does, for the message ("they pick tokens by ...").
    api: where to train them from Python ("" if only the command line is named).
    checked_attr: the attribute that marks a model as checked for this kind.
    """

    prefix: str
    module_type: type
    noun: str
    warning: type[Warning]
    untrained: str
    api: str = ""

    @property
    def checked_attr(self) -> str:
        return f"_{self.prefix.split('_')[0]}_checked"

    def name(self, layer: int) -> str:
        return f"{self.prefix}.{layer}"


_KINDS: dict[str, LearnedKind] = {}


def register_learned(kind: LearnedKind) -> LearnedKind:
    _KINDS[kind.prefix] = kind
    return kind


def learned_kinds() -> list[LearnedKind]:
    return list(_KINDS.values())


def learned_modules(model: nn.Module, kind: LearnedKind) -> dict[int, nn.Module]:
    """The parts of ``kind`` in ``model``, by the index of their layer (also inside a wrapper such as
    DistributedDataParallel, whose names start with ``module.``)."""
    return {int(name.rsplit(".", 1)[1]): m for name, m in model.named_modules()
            if isinstance(m, kind.module_type) and name.split(".")[-2:-1] == [kind.prefix]}


def kind_of_type(module_type: type) -> LearnedKind:
    """The registered kind whose parts are ``module_type`` (a trainer's way to find its parts)."""
    for kind in _KINDS.values():
        if issubclass(module_type, kind.module_type) or issubclass(kind.module_type, module_type):
            return kind
    raise KeyError(f"no learned kind of part is registered for {module_type.__name__}")


def parts_of_type(model: nn.Module, module_type: type) -> dict[int, nn.Module]:
    """The learned parts of ``model`` that are ``module_type``, by layer (see :func:`learned_modules`).
    Empty when no pass registered such parts (none of its rules ran)."""
    try:
        kind = kind_of_type(module_type)
    except KeyError:
        return {}
    return learned_modules(model, kind)


def kinds_in(model: nn.Module) -> list[LearnedKind]:
    """The kinds of learned part ``model`` holds, in registration order."""
    return [k for k in _KINDS.values() if learned_modules(model, k)]


def check_kind_trained(module: nn.Module, kind: LearnedKind, strict: bool | None = None) -> None:
    """Warn once (``strict``: refuse) if a part of ``kind`` in ``module`` was never trained.

    Skipped while torch.compile traces (it would break the graph), while tokenopt trains, and while
    a benchmark forces the parts' choice (``forced``). ``strict`` defaults to the recipe's.
    """
    if torch.compiler.is_compiling() or getattr(module, kind.checked_attr, False) \
            or getattr(module, "tokenopt_training", False):
        return
    parts = learned_modules(module, kind)
    if any(getattr(m, "forced", None) is not None for m in parts.values()):
        return
    untrained = [i for i, m in parts.items() if not bool(m.trained)]
    if not untrained:
        setattr(module, kind.checked_attr, True)
        return
    msg = (f"{kind.noun} of layer(s) {', '.join(map(str, untrained))} were never trained: {kind.untrained}, which "
           "loses accuracy.\n  Train them: `tokenopt train RECIPE MODEL --data ...`"
           + (f" (API: {kind.api})." if kind.api else "."))
    if strict is None:
        strict = recipe_is_strict(module)
    if strict:
        raise PlanError(msg + " (refused because the recipe sets strict: true)")
    warnings.warn(msg, kind.warning, stacklevel=8)  # the caller of model(x), through the hook
    setattr(module, kind.checked_attr, True)


def check_trained(module: nn.Module, args=()) -> None:
    """Forward pre-hook of a rewritten model with learned parts: :func:`check_kind_trained` for
    every kind it holds. A kind once checked (or absent) costs no module walk on later calls."""
    for kind in _KINDS.values():
        if getattr(module, kind.checked_attr, False):
            continue
        if learned_modules(module, kind):
            check_kind_trained(module, kind)
        elif not torch.compiler.is_compiling():
            setattr(module, kind.checked_attr, True)      # none of this kind: nothing to check, ever


def hook_for(kind: LearnedKind) -> Callable:
    """A forward pre-hook that checks the parts of one kind only (its pass's public name for it)."""

    def check(module: nn.Module, args=()) -> None:
        check_kind_trained(module, kind)

    check.__name__ = f"check_{kind.prefix}_trained"
    return check


def recipe_is_strict(module: nn.Module) -> bool:
    """Whether the recipe ``module`` was rewritten with sets ``strict: true``."""
    return bool(getattr(getattr(record_of(module), "recipe", None), "strict", False))
