"""The trainer registry: how `tokenopt train` fits each kind of learned part, found through the kind.

A pass that inserts learned parts registers their kind (:mod:`tokenopt.rewrite.learned`); the
module that trains those parts registers a :class:`Trainer` for the same module type::

    @register_trainer(TokenSelector)          # tokenopt/train/selector.py
    SELECTOR_TRAINER = Trainer(noun="selectors", fit=..., finetune=..., measure=..., ...)

The command line asks :func:`trainers_for` for the recipe's passes and never names one. Importing
``tokenopt.train`` registers the built-in trainers, as importing ``tokenopt.passes`` registers the
passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tokenopt.passes  # noqa: F401  (registers the built-in passes, and so their learned kinds)
from tokenopt.passes import get_pass
from tokenopt.rewrite.learned import LearnedKind


@dataclass(frozen=True)
class Trainer:
    """How one kind of learned part is trained, fine-tuned with, and measured.

    fit(model, original, data, *, epochs, lr, resume, labels, **loop):  train the parts alone.
    finetune(model, original, data, *, epochs, lr, resume, labels, distill, part_weight, **loop):
        train the backbone with the parts in the loop.
    measure(model, original, images) -> float: the column the training table shows after each phase.
    budget(model, {"train": images, "test": images}) -> list[str]: lines on a budget the parts were
        calibrated to meet (target against achieved), printed after each phase; None: no budgets.
    """

    noun: str                          # "selectors" | "gates": what the CLI's messages call the parts
    fit: Callable
    finetune: Callable
    measure: Callable
    column: str                        # header of the measured column
    number_format: str = ".4g"         # how the column's values print
    uses_labels: bool = False          # trained against selection labels (--labels, --masks)
    distill: str = ""                  # "" when --distill works; else why not (a message)
    weight_option: str = "--selector-weight"   # the option weighing the parts' loss while fine-tuning
    epochs_option: str = "--selector-epochs"   # the option giving the epochs of fitting the parts
    budget: Callable | None = None

    def describe_fit(self, epochs: int, labels: str) -> str:
        return f"{self.noun} trained ({epochs} ep{f', {labels} labels' if self.uses_labels else ''})"


_TRAINERS: dict[type, Trainer] = {}


def register_trainer(module_type: type):
    """Decorator-free registration: ``register_trainer(TokenGate)(trainer)`` returns ``trainer``."""

    def add(trainer: Trainer) -> Trainer:
        _TRAINERS[module_type] = trainer
        return trainer

    return add


def trainer_for(kind: LearnedKind) -> Trainer:
    for module_type, trainer in _TRAINERS.items():
        if issubclass(kind.module_type, module_type) or issubclass(module_type, kind.module_type):
            return trainer
    raise KeyError(f"no trainer is registered for {kind.noun}")


def learned_kind_of_pass(pass_name: str) -> LearnedKind | None:
    """The kind of learned part a pass inserts, or None (training-free passes)."""
    return getattr(get_pass(pass_name), "learned", None)


def trainers_for(pass_names) -> dict[str, tuple[LearnedKind, Trainer]]:
    """For each pass of ``pass_names`` that inserts learned parts: its kind and trainer."""
    found = {}
    for name in dict.fromkeys(pass_names):
        kind = learned_kind_of_pass(name)
        if kind is not None:
            found[name] = (kind, trainer_for(kind))
    return found


def learned_passes() -> list[str]:
    """Every registered pass that inserts learned parts (for messages listing what can be trained)."""
    from tokenopt.passes import available_passes

    return [p for p in available_passes() if learned_kind_of_pass(p) is not None]
