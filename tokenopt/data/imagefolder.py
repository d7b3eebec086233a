"""A user's ImageFolder directory (``root/<class>/<image>``), preprocessed as the model expects.

Class folders named by integers (``0/``, ``1/``, ... ``10/``) are labelled by that integer, so
``10`` does not sort before ``2``; any other names get indices in sorted order, as torchvision's
ImageFolder does. Structural problems are found when the data set is built; an unreadable image
is found when it is loaded, and the error names the file.

With ``masks=DIR`` every image has an object mask: ``DIR/<same relative path>.png``, the image's
size (tokenopt.data.masks says how pixels are read). Items are then ``(image, label, mask)``,
the mask resized and cropped exactly as the image. Missing masks and masks of another size are
found when the data set is built (file headers only), and the error names the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from tokenopt.data import masks as M
from tokenopt.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan(root: Path) -> tuple[list[str], dict[str, int], list[tuple[Path, int]]]:
    """(class names, class → label, [(file, label)]) of an ImageFolder tree; DataError if unusable."""
    if not root.is_dir():
        raise DataError(f"'{root}' is not a directory: expected an ImageFolder root/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"'{root}' has no class subfolders: expected root/<class>/<image>, "
                        f"e.g. {root}/cat/0001.jpg")
    if all(c.isdigit() for c in classes):
        class_to_idx = {c: int(c) for c in classes}
        if len(set(class_to_idx.values())) != len(classes):
            raise DataError(f"'{root}': class folders {classes} name the same label twice (e.g. '1' and '01')")
    else:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in classes:
        for dirpath, dirnames, filenames in os.walk(root / c, followlinks=True):
            dirnames.sort()
            samples += [(Path(dirpath) / f, class_to_idx[c]) for f in sorted(filenames)
                        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    if not samples:
        raise DataError(f"'{root}' has class folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}) "
                        f"but no images in them (looked for {' '.join(IMAGE_EXTENSIONS)})")
    return classes, class_to_idx, samples


class ImageFolderDataset(Dataset):
    """Images of ``root`` through ``transform`` (a timm eval transform unless the caller gives one)."""

    def __init__(self, root: str | os.PathLike, transform, *, verify: bool = False,
                 masks: str | os.PathLike | None = None):
        self.root = Path(root)
        self.classes, self.class_to_idx, self.samples = scan(self.root)
        self.transform = transform
        self.num_classes = max(label for _, label in self.samples) + 1
        self.masks = Path(masks) if masks is not None else None
        if self.masks is not None:
            self._mask_geometry = M.geometry_of(transform)
            self.check_masks()
        if verify:
            self.verify()

    def check_masks(self) -> None:
        """Every image has a mask file of its own size (headers only: fast even for large sets)."""
        if not self.masks.is_dir():
            raise DataError(f"masks directory '{self.masks}' does not exist: give the root of a tree with one PNG "
                            f"per image at the same relative path as the image under '{self.root}'")
        missing = [(path, M.mask_path(self.masks, self.root, path)) for path, _ in self.samples]
        missing = [(path, mask) for path, mask in missing if not mask.is_file()]
        if missing:
            raise DataError(M.missing_masks_message(missing, len(self.samples), self.root, self.masks))
        for path, _ in self.samples:
            mask = M.mask_path(self.masks, self.root, path)
            wm, hm = M.image_size(mask, "mask")
            wi, hi = M.image_size(path)
            if (wm, hm) != (wi, hi):
                raise DataError(f"mask '{mask}' is {wm}x{hm} but its image '{path}' is {wi}x{hi}: a mask must have "
                                f"its image's size")

    def verify(self) -> None:
        """Open every image header now, so a bad file fails before training rather than hours into it."""
        from PIL import Image

        for path, _ in self.samples:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                raise DataError(f"cannot read image '{path}': {e}") from None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:
            raise DataError(f"cannot read image '{path}': {e}") from None
        if self.masks is None:
            return self.transform(image), label
        mask_file = M.mask_path(self.masks, self.root, path)
        mask = M.read_mask(mask_file)
        if mask.size != image.size:   # changed on disk since check_masks
            raise DataError(f"mask '{mask_file}' is {mask.size[0]}x{mask.size[1]} but its image '{path}' is "
                            f"{image.size[0]}x{image.size[1]}: a mask must have its image's size")
        return self.transform(image), label, M.apply_geometry(self._mask_geometry, mask)
