"""Data sets: the built-in digits (fixed split, normalisation, clutter) and user ImageFolders."""
import numpy as np
import pytest
import torch
from PIL import Image

from tokenopt.data import ClutteredDigitsDataset, DigitsDataset, ShardSampler, get_dataset, get_loader
from tokenopt.data.digits import digits_split
from tokenopt.errors import DataError


def test_digits_split_is_fixed_stratified_80_20():
    xtr, ytr = digits_split("train")
    xte, yte = digits_split("test")
    assert (len(ytr), len(yte)) == (1437, 360)
    assert xtr.shape == (1437, 8, 8) and 0.0 <= float(xtr.min()) and float(xtr.max()) == 1.0
    # stratified: every class holds ~20% of its scans in the test split
    counts_te = torch.bincount(yte, minlength=10)
    counts_all = counts_te + torch.bincount(ytr, minlength=10)
    assert torch.all((counts_te.float() / counts_all - 0.2).abs() < 0.01)
    # train and test are disjoint scans (no identical 8x8 image in both)
    train_rows = {tuple(r) for r in xtr.reshape(len(xtr), -1).tolist()}
    assert sum(tuple(r) in train_rows for r in xte.reshape(len(xte), -1).tolist()) == 0


def test_digits_fills_the_image_and_is_normalised():
    ds = get_dataset("digits", "test", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert isinstance(ds, DigitsDataset) and len(ds) == 360
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # background ink 0 maps to (0 - 0.5) / 0.25 = -2, full ink to +2
    assert x.min().item() == pytest.approx(-2.0) and x.max().item() <= 2.0 + 1e-6
    assert x.max().item() > 1.0  # the digit is there
    assert get_dataset("digits", "val", 32)[0][1] == y  # 'val' names the test split


def test_digits_takes_size_and_normalisation_from_the_model():
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=48, patch_size=8,
                              embed_dim=32, depth=1, num_heads=2, num_classes=10)
    ds = get_dataset("digits", "train", model=model)
    x, _ = ds[0]
    assert x.shape == (3, 48, 48)  # patch_embed's size, not the 224 of timm's pretrained_cfg
    assert ds.mean == (0.5, 0.5, 0.5)  # vit's data config
    with pytest.raises(DataError, match="10 classes.*5 classes|5 classes.*10 classes"):
        get_dataset("digits", "train", 32, num_classes=5)


def test_clutter_is_deterministic_and_mostly_empty():
    a = ClutteredDigitsDataset("train", 64, variants=2)
    b = get_dataset("digits-clutter", "train", 64, mean=(0.5,) * 3, std=(0.5,) * 3, variants=2)
    assert len(a) == 2 * 1437
    for i in (0, 5, 1437 + 5):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert a[5][1] == a[1437 + 5][1]  # a variant is the same digit ...
    assert not torch.equal(a[5][0], a[1437 + 5][0])  # ... placed on other clutter
    assert a.digit_size == 32  # half the canvas side
    canvas = a.render(3)
    top, left, bottom, right = a.box(3)
    assert bottom - top == 32 and 0 <= top and bottom <= 64 and 0 <= left and right <= 64
    # the digit is the brightest thing on the canvas; clutter stays at low contrast
    inside = canvas[top:bottom, left:right]
    outside = canvas.copy()
    outside[top:bottom, left:right] = 0
    assert inside.max() > 0.8 and outside.max() <= 0.5 + 1e-6
    # most 8x8 patches hold none of the digit: it touches 4x4 (aligned) to 5x5 of the 8x8 patches
    patches_with_digit = {(y // 8, x // 8) for y in range(top, bottom) for x in range(left, right)}
    assert 16 <= len(patches_with_digit) <= 25
    assert outside.mean() > 0.02  # there is clutter


def test_clutter_test_split_differs_from_train_and_places_digits_everywhere():
    tr, te = ClutteredDigitsDataset("train", 64), ClutteredDigitsDataset("test", 64)
    assert len(te) == 360
    assert not np.array_equal(tr.render(0), te.render(0))
    tops = [te.box(i)[0] for i in range(200)]
    assert min(tops) <= 4 and max(tops) >= 28  # tops range over 0..32


def test_clutter_sizes_vary_the_digit_area_and_its_mask_covers_the_digit():
    ds = get_dataset("digits-clutter-sizes", "test", 64, mean=(0.5,) * 3, std=(0.5,) * 3, masks=True)
    fixed = ClutteredDigitsDataset("test", 64, masks=True)
    sides = [ds.box(i)[2] - ds.box(i)[0] for i in range(len(ds))]
    assert min(sides) == 20 and max(sides) == 44             # 5/16 .. 11/16 of the canvas
    areas = np.array([float(ds[i][2].sum()) for i in range(120)])
    assert areas.max() / areas.min() >= 4.0                  # ink area varies at least 4x across images
    for i in range(0, 120, 7):
        x, label, mask = ds[i]
        top, left, bottom, right = ds.box(i)
        canvas = ds.render(i)
        assert mask.shape == (64, 64) and label == fixed[i][1]
        inside = np.zeros((64, 64), bool)
        inside[top:bottom, left:right] = True
        assert not mask.numpy()[~inside].any()               # nothing outside the digit's box
        # the mask is the digit's ink: drawn at >= 0.85 * INK, brighter than the clutter can reach there
        m = mask.numpy().astype(bool)
        assert m.sum() > 0.15 * (bottom - top) ** 2 and canvas[m].min() >= 0.85 * 0.25 - 1e-6
        assert torch.equal(x, to_input(canvas))
    # the fixed-size set is unchanged by the option: same images as before it existed
    assert fixed.box(0)[2] - fixed.box(0)[0] == 32
    with pytest.raises(DataError, match="digit_sizes"):
        ClutteredDigitsDataset("test", 64, digit_sizes=(40, 20))


def to_input(canvas):
    return (torch.from_numpy(canvas).unsqueeze(0).expand(3, -1, -1) - 0.5) / 0.5


def test_unknown_names_and_splits_are_data_errors():
    with pytest.raises(DataError, match="unknown data set 'mnist'"):
        get_dataset("mnist", "train", 32)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        get_dataset("digits", "dev", 32)


def test_loader_shuffles_by_epoch_and_evaluation_shards_cover_each_sample_once():
    ds = get_dataset("digits", "test", 16)
    loader = get_loader(ds, 50, seed=3)
    loader.sampler.set_epoch(0)
    first = torch.cat([y for _, y in loader])
    loader.sampler.set_epoch(0)
    again = torch.cat([y for _, y in loader])
    loader.sampler.set_epoch(1)
    other = torch.cat([y for _, y in loader])
    assert torch.equal(first, again) and not torch.equal(first, other) and len(first) == 360
    shards = [list(ShardSampler(ds, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(360))
    assert [y for _, y in get_loader(ds, 64, train=False)][0].tolist() == ds.labels[:64].tolist()


# --- ImageFolder -------------------------------------------------------------------------------

def _write_folder(root, classes=("cat", "dog"), per_class=3, size=20):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def test_imagefolder_uses_the_models_preprocessing(tmp_path):
    import timm

    root = _write_folder(tmp_path / "pets")
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=1, num_heads=2, num_classes=2)
    ds = get_dataset(root, "train", model=model)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and y == 1
    assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6  # vit's mean/std 0.5 maps [0,1] → [-1,1]
    # overrides win over the model's config
    x = get_dataset(f"imagefolder:{root}", "test", 40, mean=(0, 0, 0), std=(1, 1, 1), model=model)[0][0]
    assert x.shape == (3, 40, 40) and x.min() >= 0.0
    batch = next(iter(get_loader(ds, 4, train=False)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[1].tolist() == [0, 0, 0, 1]


def test_imagefolder_picks_the_split_subfolder_and_integer_class_names(tmp_path):
    _write_folder(tmp_path / "data" / "train", classes=("2", "10"), per_class=1)
    _write_folder(tmp_path / "data" / "val", classes=("2", "10"), per_class=2)
    ds = get_dataset(tmp_path / "data", "val", 16, num_classes=11)
    assert len(ds) == 4
    assert ds.class_to_idx == {"10": 10, "2": 2}  # numeric names are labels, not sort positions
    assert sorted(ds[i][1] for i in range(4)) == [2, 2, 10, 10]
    assert len(get_dataset(tmp_path / "data", "train", 16)) == 2
    assert len(get_dataset(tmp_path / "data", "test", 16)) == 4  # ImageNet-style: val/ serves as test
    (tmp_path / "data" / "val").rename(tmp_path / "data" / "holdout")
    with pytest.raises(DataError, match="split folders train/ but none for split 'test'"):
        get_dataset(tmp_path / "data", "test", 16)


def test_imagefolder_errors_name_the_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class subfolders"):
        get_dataset(tmp_path / "empty", "train", 16)

    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="has no class subfolders"):
        get_dataset(tmp_path / "flat", "train", 16)

    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        get_dataset(tmp_path / "noimg", "train", 16)

    root = _write_folder(tmp_path / "bad", per_class=1)
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    ds = get_dataset(root, "train", 16)
    with pytest.raises(DataError, match=r"cannot read image '.*broken\.png'"):
        [ds[i] for i in range(len(ds))]
    with pytest.raises(DataError, match=r"broken\.png"):
        get_dataset(root, "train", 16, verify=True)

    root = _write_folder(tmp_path / "many", classes=("a", "b", "c"), per_class=1)
    with pytest.raises(DataError, match="does not fit a model with 2 classes.*'c'"):
        get_dataset(root, "train", 16, num_classes=2)


def test_holdout_is_seeded_disjoint_and_a_tenth():
    from tokenopt.data.holdout import holdout_indices

    train, held = holdout_indices(50)
    assert len(held) == 5 and len(train) == 45
    assert sorted(train + held) == list(range(50)) and train == sorted(train) and held == sorted(held)
    assert holdout_indices(50) == (train, held)                  # the same on every run
    assert holdout_indices(50, seed=1)[1] != held
    assert holdout_indices(2) [0] and len(holdout_indices(2)[1]) == 1   # at least one each way
    with pytest.raises(DataError, match="'x' has 1 image\\(s\\): holding some out for testing needs at least 2"):
        holdout_indices(1, where="'x'")
