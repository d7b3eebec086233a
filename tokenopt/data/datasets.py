"""``get_dataset``: a name (``digits``, ``digits-clutter``) or an ImageFolder path → a torch Dataset.

Every data set returns ``(image (3, H, W) normalised, label int)``, or with object masks
``(image, label, mask (H, W))`` (``masks=DIR`` for an ImageFolder, ``masks=True`` for
digits-clutter; tokenopt.data.masks). Image size and mean/std come from the arguments, else from
``model`` (its timm data config), else timm's defaults.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn
from torch.utils.data import Dataset

from tokenopt.data.clutter import ClutteredDigitsDataset, SizedClutteredDigitsDataset
from tokenopt.data.config import data_config, model_num_classes
from tokenopt.data.digits import DigitsDataset
from tokenopt.data.imagefolder import ImageFolderDataset
from tokenopt.errors import DataError

BUILTIN = {"digits": DigitsDataset, "digits-clutter": ClutteredDigitsDataset,
           "digits-clutter-sizes": SizedClutteredDigitsDataset}
IMAGEFOLDER_PREFIX = "imagefolder:"


def get_dataset(name_or_path: str | Path, split: str = "train", image_size: int | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None, *,
                model: nn.Module | None = None, num_classes: int | None = None,
                augment: bool = False, verify: bool = False, masks: str | Path | bool | None = None,
                preprocess: dict | None = None, **options) -> Dataset:
    """Build a data set for ``split`` (``train`` / ``test``; ``val`` means test for the built-ins).

    ``name_or_path``: a built-in name, ``imagefolder:PATH``, or a directory. A directory holding
    ``train/`` / ``val/`` / ``test/`` subfolders is read at ``PATH/<split>`` (``test`` and ``val``
    stand in for each other, as ImageNet ships only ``val/``); otherwise ``PATH`` itself is used
    for any split. Built-in names win over a same-named directory (write ``./digits``).
    ``num_classes`` (default: the model's) is checked against the data's labels.
    ``options`` go to the built-in data set (e.g. ``digit_size``, ``variants`` for digits-clutter).
    ImageFolder only: ``augment`` uses timm's training transform; ``verify`` opens every file now.
    ``masks``: items carry object masks: an ImageFolder's mask directory, or for a built-in set
    that has them (digits-clutter) True / its kind of mask (``"ink"``, ``"box"``).
    ``preprocess`` overrides the model's preprocessing (timm data-config keys: input_size,
    interpolation, crop_pct, crop_mode, mean, std); the built-ins read only the size, mean and std.
    """
    pre = dict(preprocess or {})
    mean, std = pre.pop("mean", mean), pre.pop("std", std)
    cfg = data_config(model, image_size, mean, std, **pre)
    size, mean, std = cfg["input_size"][-1], cfg["mean"], cfg["std"]
    name = str(name_or_path)
    if name in BUILTIN:
        if masks:
            if not getattr(BUILTIN[name], "has_masks", False):
                raise DataError(f"data set '{name}' has no object masks; mask labels need a data set that has them "
                                f"(digits-clutter, or an ImageFolder with a masks directory)")
            if isinstance(masks, (str, Path)) and str(masks) not in ("ink", "box"):
                raise DataError(f"a masks directory ('{masks}') goes with an ImageFolder; the built-in '{name}' "
                                f"draws its own masks (kinds: ink, box)")
            options["masks"] = masks
        dataset = BUILTIN[name](split, size, mean, std, **options)
    else:
        if options:
            raise DataError(f"options {sorted(options)} apply to built-in data sets only, not to '{name}'")
        root = Path(name.removeprefix(IMAGEFOLDER_PREFIX)).expanduser()
        if not root.exists():
            raise DataError(f"unknown data set '{name}': use one of {', '.join(BUILTIN)}, "
                            f"or the path of an ImageFolder directory (root/<class>/<image>)")
        root = _split_folder(root, split)
        if masks is True or masks in ("ink", "box"):
            raise DataError(f"the ImageFolder '{root}' needs a masks directory (masks=DIR), not masks={masks!r}")
        if masks and augment:
            raise DataError("masks cannot follow random training augmentation: use masks without augment")
        dataset = ImageFolderDataset(root, _timm_transform(cfg, augment), verify=verify, masks=masks or None)
    _check_classes(dataset, name, num_classes or model_num_classes(model))
    return dataset


SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val", "validation"),
                 "val": ("val", "validation", "test"), "validation": ("validation", "val", "test")}


def single_folder(name_or_path: str | Path) -> Path | None:
    """The root of an ImageFolder DATA that has no split folders (so every split reads the same
    images); None for a built-in name or a folder with ``train/`` / ``val/`` / ``test/``."""
    name = str(name_or_path)
    if name in BUILTIN:
        return None
    root = Path(name.removeprefix(IMAGEFOLDER_PREFIX)).expanduser()
    if not root.is_dir() or any((root / n).is_dir() for n in ("train", "val", "validation", "test")):
        return None
    return root


def _split_folder(root: Path, split: str) -> Path:
    for name in SPLIT_FOLDERS.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    present = [n for n in ("train", "val", "validation", "test") if (root / n).is_dir()]
    if present:  # without this, train/ and val/ would silently become two classes
        raise DataError(f"'{root}' has split folders {', '.join(p + '/' for p in present)} but none for "
                        f"split '{split}'; ask for one of {', '.join(present)}")
    return root


def _timm_transform(cfg: dict, augment: bool):
    from timm.data import create_transform

    return create_transform(**cfg, is_training=augment)


def _check_classes(dataset: Dataset, name: str, num_classes: int | None) -> None:
    if num_classes is None or dataset.num_classes <= num_classes:
        return
    where = getattr(dataset, "root", name)
    if getattr(dataset, "class_to_idx", None):
        over = [c for c, i in dataset.class_to_idx.items() if i >= num_classes]
        detail = (f"its class folders map to labels up to {dataset.num_classes - 1} "
                  f"({len(over)} folder(s) out of range, e.g. '{over[0]}')")
    else:
        detail = f"it has {dataset.num_classes} classes"
    raise DataError(f"data set '{where}' does not fit a model with {num_classes} classes: {detail}. "
                    f"Use a model with at least {dataset.num_classes} outputs, or remove the extra classes.")
