"""How good a reduced model is, measured against the original on calibration images.

A classifier: its top-1 agreement with the original, the KL divergence from the original's class
distribution, and its top-1 accuracy when the images have labels. The search compares ``loss`` =
error rate (against the labels, else against the original's top-1) + mean KL: the error rate is what
the user reads, the KL tells apart schedules that flip the same number of images. A dense model
(its output is tokens or a map, not class scores): the relative L2 distance of its output to the
original's, and ``score = 1 - distance``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenopt.errors import DataError
from tokenopt.model_outputs import class_logits
from tokenopt.tuning.search import Judged

MIN_IMAGES = 32     # fewer: one image moves agreement by more than 3 points


@dataclass
class Reference:
    """The original's outputs on the calibration images, computed once."""

    images: torch.Tensor
    labels: torch.Tensor | None
    outputs: torch.Tensor
    dense: bool
    batch: int

    @property
    def score_name(self) -> str:
        return "output similarity" if self.dense else ("top-1" if self.labels is not None else "agreement")


@torch.inference_mode()
def _outputs(model, images: torch.Tensor, batch: int) -> torch.Tensor:
    model.eval()
    return torch.cat([class_logits(model(images[i:i + batch])).float() for i in range(0, len(images), batch)])


def reference(model, images: torch.Tensor, labels: torch.Tensor | None = None, batch: int = 64,
              where: str = "the data") -> Reference:
    if len(images) < MIN_IMAGES:
        raise DataError(f"{where} has {len(images)} image(s); tune needs at least {MIN_IMAGES} calibration images "
                        "to measure agreement with the original (give a larger data set)")
    out = _outputs(model, images, batch)
    dense = out.dim() != 2
    return Reference(images, None if dense else labels, out, dense, batch)


def judge(ref: Reference, model) -> Judged:
    """Loss and score of ``model`` against ``ref`` (see the module docstring)."""
    out = _outputs(model, ref.images, ref.batch)
    if ref.dense:
        if out.shape != ref.outputs.shape:
            raise DataError(f"the reduced model's output has shape {tuple(out.shape)}, the original's "
                            f"{tuple(ref.outputs.shape)}: a dense output must keep every token (outputs='tokens')")
        diff = (out - ref.outputs).flatten(1).norm(dim=1) / ref.outputs.flatten(1).norm(dim=1).clamp_min(1e-12)
        d = float(diff.mean())
        return Judged(d, 1 - d, {"distance": d})
    pred, orig = out.argmax(-1), ref.outputs.argmax(-1)
    agreement = float((pred == orig).float().mean())
    kl = float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref.outputs, -1), log_target=True,
                        reduction="batchmean"))
    detail = {"agreement": agreement, "kl": kl}
    if ref.labels is not None:
        top1 = float((pred == ref.labels).float().mean())
        detail["top1"] = top1
        return Judged((1 - top1) + kl, top1, detail)
    return Judged((1 - agreement) + kl, agreement, detail)
