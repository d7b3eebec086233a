"""Digits on a cluttered canvas: a small real digit somewhere in a large noisy image.

Each 8x8 scan is upsampled to ``digit_size`` (default half the canvas side, e.g. 32 px on 64 px)
and pasted at a random place on a canvas full of low-contrast clutter: fragments of *other*
digits, pen strokes and blobs. With 8 px patches on a 64 px canvas the digit covers 16-25 of the
64 tokens, so most tokens carry no information; a model that discards or merges them well loses
little accuracy, which is what token-reduction methods should show. (A quarter of the side,
16 px, leaves each digit 2x2 to 3x3 tokens: a small ViT then needs far more than the demo's
five CPU minutes to learn it, and ends between 0.65 and 0.77 top-1 depending on the seed.)

Everything about sample ``i`` (placement, clutter) comes from a generator seeded with
``(seed, split, variant, i)``: the data set is a fixed, reproducible list of images, and the same
index gives the same image in every process (DistributedSampler shards, resumed runs).
``variants`` > 1 repeats the split with fresh placement and clutter, a deterministic way to give
training more distinct images than 1437 digits.

With ``masks=True`` (or ``"ink"``) items are ``(image, label, mask)``: the mask (H, W) is 1 where
the digit's own ink is at least :data:`INK` (a quarter of full strength), clutter excluded;
``masks="box"`` gives the digit's square instead. SPA's gates learn from these (tokenopt.data.masks).

``digit_sizes=(lo, hi)`` draws each image's digit side uniformly from ``lo..hi`` px (drawn first
from the image's generator, before its placement), so objects differ in size across images:
:class:`SizedClutteredDigitsDataset` (``digits-clutter-sizes``) uses 20..44 px on a 64 px canvas,
an object area varying 4.8x, the setting where a per-image token budget (SPA) should beat a fixed
one. Clutter fragments stay cut from digits of the fixed ``digit_size``.

Canvases are 8-bit, like any photo, and kept in memory once rendered (64 px: 4 KB each), so
rendering costs one pass over the data rather than one per epoch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tokenopt.data.digits import canonical_split, digits_split, to_model_input, upsample
from tokenopt.errors import DataError

_SPLIT_CODE = {"train": 0, "test": 1}
INK = 0.25          # a digit pixel at least this strong (before the random intensity) is in its mask
MASK_KINDS = ("ink", "box")


class ClutteredDigitsDataset(Dataset):
    num_classes = 10
    has_masks = True   # masks=True gives (image, label, mask) items

    def __init__(self, split: str = "train", image_size: int = 64,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5), *,
                 digit_size: int | None = None, variants: int = 1, seed: int = 0,
                 clutter_contrast: tuple[float, float] = (0.2, 0.5), masks: bool | str = False,
                 digit_sizes: tuple[int, int] | None = None):
        self.split = canonical_split(split)
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.digit_size = int(digit_size or max(8, self.image_size // 2))
        if self.digit_size > self.image_size:
            raise DataError(f"digit_size {self.digit_size} is larger than the canvas ({self.image_size} px)")
        self.digit_sizes = None if digit_sizes is None else (int(digit_sizes[0]), int(digit_sizes[1]))
        if self.digit_sizes is not None and not 1 <= self.digit_sizes[0] <= self.digit_sizes[1] <= self.image_size:
            raise DataError(f"digit_sizes {digit_sizes} must be (smallest, largest) side in px with "
                            f"1 <= smallest <= largest <= {self.image_size} (the canvas)")
        if variants < 1:
            raise DataError(f"variants must be >= 1, got {variants}")
        self.variants, self.seed, self.contrast = int(variants), int(seed), tuple(clutter_contrast)
        self.masks = "ink" if masks is True else (masks or None)
        if self.masks is not None and self.masks not in MASK_KINDS:
            raise DataError(f"unknown mask kind {masks!r} for digits-clutter: use one of {', '.join(MASK_KINDS)}")
        images, self.base_labels = digits_split(self.split)
        self.scans = images             # the 8x8 scans, upsampled per image when sizes vary
        # Upsample all digits once; fragments are crops of these, so clutter looks like ink.
        self.digits = upsample(images, self.digit_size).numpy()
        s = self.image_size
        self._yy, self._xx = np.mgrid[0:s, 0:s].astype(np.float32)
        self._density = (s / 64.0) ** 2  # same clutter per area on any canvas size
        self._cache = np.zeros((len(self), s, s), dtype=np.uint8)
        self._cached = np.zeros(len(self), dtype=bool)

    def __len__(self) -> int:
        return len(self.base_labels) * self.variants

    def _rng(self, i: int) -> np.random.Generator:
        base, variant = i % len(self.base_labels), i // len(self.base_labels)
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], variant, base])

    def box(self, i: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) pixel box of the digit in image ``i`` (for box-supervised gates)."""
        top, left, d = self._placement(self._rng(i))
        return top, left, top + d, left + d

    def _placement(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """(top, left, side) of the digit. Drawn first from the generator so box() needs no clutter
        rendering; the side is drawn only when sizes vary, so fixed-size images stay as they were."""
        d = self.digit_size
        if self.digit_sizes is not None:
            d = int(rng.integers(self.digit_sizes[0], self.digit_sizes[1] + 1))
        hi = self.image_size - d + 1
        return int(rng.integers(0, hi)), int(rng.integers(0, hi)), d

    def _digit(self, i: int, side: int) -> np.ndarray:
        """The digit of image ``i`` upsampled to ``side`` px, float32 in [0, 1]."""
        if side == self.digit_size:
            return self.digits[i % len(self.digits)]
        return upsample(self.scans[i % len(self.scans)], side).numpy()

    def render(self, i: int) -> np.ndarray:
        """The canvas of sample ``i`` as float32 (H, W) in [0, 1] (steps of 1/255), before normalisation."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        if not self._cached[i]:
            self._cache[i] = np.round(self._draw(i) * 255.0)
            self._cached[i] = True
        return self._cache[i].astype(np.float32) / 255.0

    def _draw(self, i: int) -> np.ndarray:
        rng = self._rng(i)
        top, left, side = self._placement(rng)
        s, d = self.image_size, self.digit_size
        canvas = rng.uniform(0.0, 0.08, (s, s)).astype(np.float32)
        lo, hi = self.contrast

        def count(a: int, b: int) -> int:
            return int(round(rng.integers(a, b + 1) * self._density))

        for _ in range(count(3, 6)):  # fragments of other digits: the hardest distractors
            j = int(rng.integers(0, len(self.digits)))
            h, w = (int(v) for v in rng.integers(d * 3 // 8, d * 5 // 8 + 1, size=2))
            y0, x0 = int(rng.integers(0, d - h + 1)), int(rng.integers(0, d - w + 1))
            py, px = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
            crop = self.digits[j, y0:y0 + h, x0:x0 + w] * rng.uniform(lo, hi)
            np.maximum(canvas[py:py + h, px:px + w], crop, out=canvas[py:py + h, px:px + w])
        for _ in range(count(2, 4)):  # pen strokes: anti-aliased line segments about one ink width
            p0, p1 = rng.uniform(0, s, size=2), rng.uniform(0, s, size=2)
            width = rng.uniform(0.5, 1.0) * d / 8
            np.maximum(canvas, self._segment(p0, p1, width) * rng.uniform(lo, hi), out=canvas)
        for _ in range(count(1, 3)):  # soft blobs
            cy, cx = rng.uniform(0, s, size=2)
            sigma = rng.uniform(0.1, 0.25) * d
            blob = np.exp(-((self._yy - cy) ** 2 + (self._xx - cx) ** 2) / (2 * sigma**2))
            np.maximum(canvas, blob * rng.uniform(lo, hi), out=canvas)
        digit = self._digit(i, side) * rng.uniform(0.85, 1.0)
        region = canvas[top:top + side, left:left + side]
        np.maximum(region, digit, out=region)
        return canvas

    def _segment(self, p0: np.ndarray, p1: np.ndarray, width: float) -> np.ndarray:
        v = p1 - p0
        t = ((self._yy - p0[0]) * v[0] + (self._xx - p0[1]) * v[1]) / max(float(v @ v), 1e-6)
        t = np.clip(t, 0.0, 1.0)
        dist = np.hypot(self._yy - (p0[0] + t * v[0]), self._xx - (p0[1] + t * v[1]))
        return np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)

    def mask(self, i: int, kind: str = "ink") -> np.ndarray:
        """(H, W) float32, 1 on the digit of image ``i``: its ink (see :data:`INK`) or its ``box``."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        top, left, bottom, right = self.box(i)
        out = np.zeros((self.image_size, self.image_size), dtype=np.float32)
        if kind == "box":
            out[top:bottom, left:right] = 1.0
        else:
            out[top:bottom, left:right] = self._digit(i, bottom - top) >= INK
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        gray = torch.from_numpy(self.render(i))
        item = to_model_input(gray, self.mean, self.std), int(self.base_labels[i % len(self.base_labels)])
        if self.masks is None:
            return item
        return (*item, torch.from_numpy(self.mask(i, self.masks)))


class SizedClutteredDigitsDataset(ClutteredDigitsDataset):
    """``digits-clutter-sizes``: digits-clutter whose digit side varies per image, 5/16 to 11/16 of
    the canvas (20..44 px on 64 px: the largest digit covers 4.8x the area of the smallest)."""

    def __init__(self, split: str = "train", image_size: int = 64,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5), *,
                 digit_sizes: tuple[int, int] | None = None, **options):
        size = int(image_size)
        super().__init__(split, size, mean, std, digit_sizes=digit_sizes or (size * 5 // 16, size * 11 // 16),
                         **options)
