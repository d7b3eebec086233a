"""Which parameters a run trains, and how they are grouped for weight decay."""
from __future__ import annotations

from typing import Iterable

from torch import nn

from tokenopt.errors import TokenoptError


def select_trainable(model: nn.Module, params: Iterable[nn.Parameter | str] | None = None,
                     train_all: bool = False) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs to optimise, with ``requires_grad`` set to match.

    ``train_all``: every parameter. ``params`` (parameters or their names): exactly those, and
    the rest are frozen, so autograd and DDP skip them. Neither: whatever already requires grad,
    which is how a pass marks its new selector/gate as the only trainable part.
    """
    named = list(model.named_parameters())
    if train_all:
        chosen = {name for name, _ in named}
    elif params is not None:
        wanted = list(params)
        by_id = {id(p): name for name, p in named}
        names = {name for name, _ in named}
        chosen = set()
        for p in wanted:
            if isinstance(p, str):
                if p not in names:
                    raise TokenoptError(f"cannot train '{p}': the model has no parameter of that name")
                chosen.add(p)
            elif id(p) in by_id:
                chosen.add(by_id[id(p)])
            else:
                raise TokenoptError("a parameter passed in params= is not part of the model being trained")
    else:
        chosen = {name for name, p in named if p.requires_grad}
    if not chosen:
        raise TokenoptError("nothing to train: no parameter requires grad; pass params=... or train_all=True")
    for name, p in named:
        p.requires_grad_(name in chosen)
    return [(name, p) for name, p in named if name in chosen]


def weight_decay_groups(model: nn.Module, trainable: list[tuple[str, nn.Parameter]],
                        weight_decay: float) -> list[dict]:
    """AdamW groups: biases, norms and token/position embeddings get no decay (as timm trains ViTs)."""
    skip = set(getattr(model, "no_weight_decay", lambda: ())())

    def exempt(name: str, p: nn.Parameter) -> bool:
        return p.ndim <= 1 or any(name == s or name.endswith("." + s) for s in skip)

    decay = [p for n, p in trainable if not exempt(n, p)]
    no_decay = [p for n, p in trainable if exempt(n, p)]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
