"""A held-out test split of a folder that has none: fixed, seeded, disjoint from training.

An ImageFolder without ``train/`` and ``val/`` folders gives the same images for every split; a
command that trains and then reports test accuracy on it would report training images as test.
:func:`holdout_indices` splits such a folder once: the same share of images, by the same seed, on
every run, so a resumed run and a later ``eval`` see the same two sets.
"""
from __future__ import annotations

import torch

from tokenopt.errors import DataError

HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0


def holdout_indices(n: int, fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED,
                    where: str = "the data set") -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of ``n`` items, both ascending: a seeded random
    ``fraction`` of them (at least one) is held out; at least one is left for training."""
    if n < 2:
        raise DataError(f"{where} has {n} image(s): holding some out for testing needs at least 2. "
                        "Add images, or give a folder with train/ and val/ subfolders.")
    k = min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[k:]), sorted(order[:k])
