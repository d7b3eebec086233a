"""The digits as the demo generators learn them: 1 x 32 x 32 in [-1, 1].

The 8 x 8 scans of :mod:`tokenopt.data.digits` upsampled (bilinear) to 32 x 32, like the demo
digits classifier's inputs and in the same range (its normalisation maps [0, 1] ink to [-1, 1]),
so the classifier reads a generated digit as it reads a real one.
"""
from __future__ import annotations

import torch

from tokenopt.data.digits import digits_split, upsample

IMAGE_SIZE = 32


def digits_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 1, 32, 32) in [-1, 1], labels (n,)) of the ``train`` or ``test`` split."""
    gray, labels = digits_split(split)
    return (upsample(gray, IMAGE_SIZE) * 2 - 1).unsqueeze(1), labels
