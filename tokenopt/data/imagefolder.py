"""A user's ImageFolder directory (``root/<class>/<image>``), preprocessed as the model expects.

Class folders named by integers (``0/``, ``1/``, ... ``10/``) are labelled by that integer, so
``10`` does not sort before ``2``; any other names get indices in sorted order, as torchvision's
ImageFolder does. Structural problems are found when the data set is built; an unreadable image
is found when it is loaded, and the error names the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

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

    def __init__(self, root: str | os.PathLike, transform, *, verify: bool = False):
        self.root = Path(root)
        self.classes, self.class_to_idx, self.samples = scan(self.root)
        self.transform = transform
        self.num_classes = max(label for _, label in self.samples) + 1
        if verify:
            self.verify()

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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:
            raise DataError(f"cannot read image '{path}': {e}") from None
        return self.transform(image), label
