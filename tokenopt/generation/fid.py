"""digits-FID and class accuracy: how good generated digits are, seen by the demo digits classifier.

The Fréchet distance between two Gaussians fitted to feature vectors (Heusel et al. 2017)::

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Inception's features mean nothing on 8 x 8 scans, so the features are those of ``demo:digits``
(the demo ViT classifier): its pooled penultimate tokens (``forward_head(..., pre_logits=True)``).
The same classifier's top-1 on a generated digit says whether it shows the class asked for.
Real digits: the 360 test scans of the fixed split (fewer than the 1,000 the usual protocol
compares; the figures say how many).
"""
from __future__ import annotations

import numpy as np
import torch

from tokenopt.errors import ModelLoadError


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets ``a`` (n, d) and ``b`` (m, d), from the definition.

    (S1 S2)^(1/2) has the eigenvalues of S1^(1/2) S2 S1^(1/2), which is symmetric positive
    semi-definite: its trace is the sum of the square roots of those eigenvalues, computed with
    symmetric eigen-decompositions only (no complex parts to discard, unlike a general sqrtm).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (n, d) feature sets of the same d and n >= 2, got {a.shape} and {b.shape}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root1 = _sqrt_psd(s1)
    middle = np.linalg.eigvalsh(root1 @ s2 @ root1)
    cross = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def digits_classifier():
    """``demo:digits`` (eval mode), or a message saying how to train it."""
    from tokenopt.sources import load_demo

    try:
        return load_demo("digits")
    except ModelLoadError as e:
        raise ModelLoadError(f"digits-FID and class accuracy need the demo digits classifier.\n  {e}") from None


@torch.no_grad()
def features_and_classes(classifier, images: torch.Tensor, batch: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features (n, d), predicted classes (n,)) of 1-channel images in [-1, 1].

    The classifier was trained on 3-channel digits normalised with mean = std = 0.5, which maps
    [0, 1] ink to [-1, 1]: a generated image in [-1, 1] is already normalised, only repeated.
    """
    feats, preds = [], []
    for chunk in images.split(batch):
        x = chunk.clamp(-1, 1).expand(-1, 3, -1, -1)
        tokens = classifier.forward_features(x)
        pooled = classifier.forward_head(tokens, pre_logits=True)
        feats.append(pooled)
        preds.append(classifier.head(pooled).argmax(-1))
    return torch.cat(feats).double().numpy(), torch.cat(preds).numpy()


def real_features(classifier) -> np.ndarray:
    """The classifier's features of the real test digits (360 of them)."""
    from tokenopt.generation.data import digits_images

    images, _ = digits_images("test")
    return features_and_classes(classifier, images)[0]
