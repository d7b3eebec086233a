"""scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10 classes) as model input.

Nothing is downloaded: ``load_digits`` ships inside scikit-learn. The split is fixed (stratified,
seed 0, 80/20 → 1437 train / 360 test) so accuracy figures are comparable across runs and machines.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tokenopt.errors import DataError

SPLITS = {"train": "train", "test": "test", "val": "test", "validation": "test"}


@lru_cache(maxsize=None)
def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (n, 8, 8) in [0, 1], labels int64 (n,)) for ``train`` or ``test``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    part = canonical_split(split)
    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # scans are 0..16 ink levels
    idx = np.arange(len(images))
    train_idx, test_idx = train_test_split(idx, test_size=0.2, random_state=0, stratify=bunch.target)
    chosen = np.sort(train_idx if part == "train" else test_idx)
    return torch.from_numpy(images[chosen]), torch.from_numpy(bunch.target[chosen].astype(np.int64))


def canonical_split(split: str) -> str:
    try:
        return SPLITS[split]
    except KeyError:
        raise DataError(f"unknown split '{split}': use one of {', '.join(SPLITS)}") from None


def upsample(gray: torch.Tensor, size: int) -> torch.Tensor:
    """(..., h, w) → (..., size, size), bilinear: smooth strokes rather than blocky pixels."""
    lead = gray.shape[:-2]
    flat = gray.reshape(-1, 1, *gray.shape[-2:])
    out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, size, size).clamp_(0.0, 1.0)


def to_model_input(gray: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W) in [0, 1] → (3, H, W) normalised like the model's training data."""
    rgb = gray.unsqueeze(0).expand(3, -1, -1)
    m = torch.tensor(mean, dtype=rgb.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=rgb.dtype).view(3, 1, 1)
    return (rgb - m) / s


class DigitsDataset(Dataset):
    """Each 8x8 scan upsampled to fill the whole image, white ink on black, 3 channels."""

    num_classes = 10

    def __init__(self, split: str = "train", image_size: int = 32,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.split = canonical_split(split)
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.images, self.labels = digits_split(self.split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        gray = upsample(self.images[i], self.image_size)
        return to_model_input(gray, self.mean, self.std), int(self.labels[i])
