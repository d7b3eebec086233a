"""Top-1 / top-5 accuracy of a classifier over a loader (summed over processes under torchrun)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from tokenopt import distributed as D
from tokenopt.model_outputs import class_logits


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str | torch.device | None = None) -> dict:
    """``{"top1": fraction, "top5": fraction, "n": images}``; top5 only when there are more than 5 classes.

    Use ``get_loader(dataset, train=False)`` under torchrun: its shards do not repeat samples,
    so ``n`` is the data set size and the figures are exact.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct1 = correct5 = n = 0
    num_classes = None
    try:
        for images, labels, *_ in loader:
            out = class_logits(model(images.to(device)))
            labels = labels.to(device)
            num_classes = out.shape[-1]
            top = out.topk(min(5, num_classes), dim=-1).indices
            hit = top == labels[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=-1).sum())
            n += len(labels)
    finally:
        model.train(was_training)
    # every rank must take part in the reduction, even one whose shard was empty
    many_classes = num_classes is not None and num_classes > 5
    correct1, correct5, n, many = D.sum_across_ranks([correct1, correct5, n, int(many_classes)], device)
    n = int(n)
    result = {"top1": correct1 / n if n else float("nan"), "n": n}
    if many:
        result["top5"] = correct5 / n if n else float("nan")
    return result
