"""Object masks: read from PNG files, carried beside images, pooled to a ViT's token grid.

A data set that has masks yields ``(image (3, H, W), label, mask (H, W) float in [0, 1])``; the
mask is at the image's resolution, after the same resize and crop as the image. SPA's gates learn
from the masks pooled to the token grid (:func:`pool_to_grid`): a token's value is the fraction of
its patch the object covers, and it is a positive label when that fraction is at least ``cover``
(default one half).

Mask files: a pixel belongs to the object when it is non-zero (any PNG mode; for RGB, any channel
non-zero; for palette PNGs such as Pascal VOC's, any palette index but 0).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tokenopt.errors import DataError

DEFAULT_COVER = 0.5


def pool_to_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each patch the object covers.

    masks: (B, H, W) float in [0, 1] (or bool), H and W multiples of the grid;
    grid: (rows, cols) of patches → (B, rows * cols) float, patches in row-major order (the order
    of a ViT's patch tokens).
    """
    b, h, w = masks.shape
    rows, cols = grid
    if h % rows or w % cols:
        raise DataError(f"a {h}x{w} mask does not tile into the model's {rows}x{cols} patch grid: "
                        f"give masks at the image's input size")
    m = masks.to(torch.float32).reshape(b, rows, h // rows, cols, w // cols)
    return m.mean(dim=(2, 4)).reshape(b, rows * cols)


def token_labels(masks: torch.Tensor, grid: tuple[int, int], cover: float = DEFAULT_COVER) -> torch.Tensor:
    """(B, H, W) masks → (B, rows * cols) bool: the object covers at least ``cover`` of the patch."""
    return pool_to_grid(masks, grid) >= cover


def square_grid(patch_tokens: int) -> tuple[int, int]:
    """The (rows, cols) of a square grid of ``patch_tokens`` patches."""
    side = round(patch_tokens ** 0.5)
    if side * side != patch_tokens:
        raise DataError(f"{patch_tokens} patch tokens do not form a square grid; mask labels need the "
                        f"grid (rows, cols) of the model's patches")
    return side, side


def mask_path(masks_root: Path, images_root: Path, image: Path) -> Path:
    """The mask of ``image``: same path relative to its root, under ``masks_root``, as a .png."""
    return (masks_root / image.relative_to(images_root)).with_suffix(".png")


def missing_masks_message(missing: list[tuple[Path, Path]], total: int, images_root: Path, masks_root: Path,
                          shown: int = 3) -> str:
    """Every image without a mask counted, the first ``shown`` named with the file expected for each."""
    (path, mask), n = missing[0], len(missing)
    if n == 1:
        head = f"no mask for image '{path}': expected '{mask}'"
    else:
        listed = ", ".join(f"'{m}'" for _, m in missing[:shown])
        more = f" and {n - shown} more" if n > shown else ""
        head = f"no mask for {n} of the {total} images under '{images_root}': expected {listed}{more}"
    return (f"{head} (one PNG per image, at the image's path relative to '{images_root}', under "
            f"'{masks_root}')")


def read_mask(path: Path):
    """A mask file → PIL "L" image, 255 on the object, 0 elsewhere."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except Exception as e:
        raise DataError(f"cannot read mask '{path}': {e}") from None
    on = a != 0 if a.ndim == 2 else (a[..., :3] != 0).any(-1)
    return Image.fromarray(on.astype(np.uint8) * 255, mode="L")


def image_size(path: Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file's header."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise DataError(f"cannot read {what} '{path}': {e}") from None


def geometry_of(transform):
    """The steps of an image transform before it turns the image into a tensor (resize, crop).

    The mask goes through exactly these, so it stays aligned with its image. A transform that draws
    random numbers (training augmentation) cannot be mirrored on the mask and is refused.
    """
    steps = getattr(transform, "transforms", None)
    if steps is None:
        raise DataError("masks need an image transform made of steps (a Compose) to follow it")
    geometry = []
    for t in steps:
        name = type(t).__name__
        if "ToTensor" in name:
            return geometry
        if name.startswith("Random") or "Augment" in name:
            raise DataError(f"masks cannot follow the random transform {name}: use masks without augmentation")
        geometry.append(t)
    raise DataError("masks need an image transform that turns the image into a tensor")


def apply_geometry(geometry, mask) -> torch.Tensor:
    """PIL "L" mask through the image's resize/crop steps → (H, W) float in [0, 1]."""
    import numpy as np

    for t in geometry:
        mask = t(mask)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
