"""``apply --check``: compare a model with its optimized version, and say what the numbers compared.

A comparison can mean nothing. torchvision's ViT starts with a zero head, so at random init the
original and any rewrite of it both output zeros: "difference 0, 8/8 agree". And top-1 agreement is
meaningless for an embedding (open_clip's 512-d image features). So the check decides what it has:

- **class logits**: a 2-D output that is exactly what the last ``nn.Linear`` of the forward returned,
  where that layer's name does not say projection (``proj``): timm's ``head``, torchvision's
  ``heads.head``, Hugging Face's ``classifier``. Reported: max difference and top-1 agreement.
- **an embedding** (anything else 2-D: open_clip's ``proj`` matrix, CLIP's ``visual_projection``, a
  model built without a classifier) and **tokens** (``outputs: tokens``): max difference and mean
  cosine similarity.
- **uninformative**: the original's output is the same for every input of the batch (all zero, or a
  head that ignores its input). Then the features going into the head Linear are compared instead,
  when the optimized model calls that same module; otherwise the line says the check means nothing
  and what to do (load trained weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenopt.errors import TokenoptError


@dataclass
class _Run:
    out: torch.Tensor                    # the first tensor of the model's output
    head: str | None = None              # the Linear that produced ``out`` (class logits), if any
    head_input: torch.Tensor | None = None


def compare(model: nn.Module, gm: nn.Module, batch: torch.Tensor, reference: nn.Module | None = None) -> str:
    """One line saying how ``gm`` differs from ``model`` on ``batch`` and what was compared.

    ``reference`` replaces ``model`` as what ``gm`` must reproduce (the original's patch tokens
    for an ``outputs: tokens`` recipe)."""
    n = batch.shape[0]
    head_line = f"check on {n} random inputs (seed 0)"
    a = _run(reference if reference is not None else model, batch)
    b = _run(gm, batch, a.head)
    if a.out.shape != b.out.shape:
        return f"check: output shapes differ: original {tuple(a.out.shape)}, optimized {tuple(b.out.shape)}"
    if n > 1 and _constant(a.out):
        what = "all zero" if not a.out.any() else "the same values"
        line = (f"{head_line}: uninformative: the original model's output is {what} for every input, so it "
                "cannot show a difference (a zero-initialised or untrained head?)")
        if a.head is not None and b.head_input is not None and a.head_input.shape == b.head_input.shape:
            return (f"{line}. Compared the features going into its head `{a.head}` instead: "
                    f"{_difference(a.head_input, b.head_input)}, mean cosine similarity "
                    f"{_cosine(a.head_input, b.head_input):.4f}. Load trained weights to check the outputs.")
        return (f"{line}, and the features before its head cannot be reached in the optimized model. "
                "Load trained weights (a trained checkpoint, or --weights FILE) and check again.")
    line = f"{head_line}: {_difference(a.out, b.out)}"
    if a.out.ndim == 2 and a.head is not None:
        agree = (a.out.argmax(-1) == b.out.argmax(-1)).sum().item()
        return line + f", top-1 agreement {agree}/{n} ({100 * agree / n:.0f}%)"
    line += f", mean cosine similarity {_cosine(a.out, b.out):.4f}"
    if a.out.ndim == 2:
        line += (f" (the {a.out.shape[1]}-d output is an embedding, not class logits: no classifier Linear "
                 "produces it, so no top-1 agreement)")
    return line


def _run(model: nn.Module, batch: torch.Tensor, head: str | None = None) -> _Run:
    """Run ``model``; note the last Linear it calls (or, given ``head``, the input of that module)."""
    last: list = [None]
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (head is None or name == head):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: last.__setitem__(0, (name, inp[0], out))))
    try:
        with torch.no_grad():
            out = first_tensor(model(batch))
    finally:
        for h in hooks:
            h.remove()
    if last[0] is None:
        return _Run(out)
    name, inp, lin_out = last[0]
    if head is not None:
        return _Run(out, head_input=inp)
    is_logits = (out.ndim == 2 and isinstance(lin_out, torch.Tensor) and lin_out.shape == out.shape
                 and torch.equal(lin_out, out) and "proj" not in name.lower())
    return _Run(out, name, inp) if is_logits else _Run(out)


def _constant(t: torch.Tensor) -> bool:
    t = t.float()
    return (t - t[:1]).abs().max().item() <= 1e-6 * t.abs().max().item()


def compare_call(model: nn.Module, gm: nn.Module, example) -> str:
    """The check for a model of several inputs (a denoiser): both called on the example's inputs,
    the first tensor of their outputs compared (max difference, mean cosine similarity)."""
    with torch.no_grad():
        a, b = first_tensor(example.call(model)), first_tensor(example.call(gm))
    if a.shape != b.shape:
        return f"check: output shapes differ: original {tuple(a.shape)}, optimized {tuple(b.shape)}"
    return (f"check on the example inputs ({example.batch} random inputs, seed 0): {_difference(a, b)}, "
            f"mean cosine similarity {_cosine(a, b):.4f}")


def _difference(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max |original - optimized| = {(a.float() - b.float()).abs().max().item():.3g}"


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=-1).mean().item()


def first_tensor(out) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a tuple, or a dict-like output object)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    for item in out:
        if isinstance(item, torch.Tensor):
            return item
    raise TokenoptError("--check: the model returns no tensor to compare.")
