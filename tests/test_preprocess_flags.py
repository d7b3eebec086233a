"""Preprocessing: the model's own config (a Hugging Face image processor, open_clip's mean/std), and the
flags of timm's validate.py (--input-size, --mean, --std, --interpolation, --crop-pct) on top.

References are torchvision transforms written out by hand from what each setting means.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T
from typer.testing import CliRunner

from tokenopt.cli import app
from tokenopt.cli.common import open_dataset, preprocess_options

runner = CliRunner()
TINY = "timm:vit_small_patch16_224?img_size=32&patch_size=8&depth=2&num_classes=10"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of non-square RGB images (so resize-then-crop differs from a plain resize)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def first_image(root):
    return Image.open(sorted((root / "a").iterdir())[0]).convert("RGB")


def tiny_timm():
    return timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()


def by_hand(image, size, crop_pct, interpolation, mean, std):
    """timm's eval transform, as its docs define it: shortest edge to floor(size / crop_pct), centre crop."""
    return T.Compose([T.Resize(math.floor(size / crop_pct), interpolation=interpolation), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(mean, std)])(image)


def test_flags_override_the_model_config(folder):
    pre = preprocess_options(input_size="40", mean="0,0.1,0.2", std="1,2,3", interpolation="bilinear",
                             crop_pct=0.8)
    assert pre == {"input_size": (3, 40, 40), "mean": (0.0, 0.1, 0.2), "std": (1.0, 2.0, 3.0),
                   "interpolation": "bilinear", "crop_pct": 0.8}
    ds = open_dataset(str(folder), tiny_timm(), "test", None, pre)
    want = by_hand(first_image(folder), 40, 0.8, T.InterpolationMode.BILINEAR, (0, 0.1, 0.2), (1, 2, 3))
    assert torch.allclose(ds[0][0], want, atol=1e-6)


def test_without_flags_the_model_config_is_used(folder):
    m = tiny_timm()
    ds = open_dataset(str(folder), m, "test", None, {})
    cfg = m.pretrained_cfg
    want = by_hand(first_image(folder), 32, cfg["crop_pct"], T.InterpolationMode.BICUBIC, cfg["mean"], cfg["std"])
    assert torch.allclose(ds[0][0], want, atol=1e-6)


def test_one_flag_changes_only_its_setting(folder):
    m = tiny_timm()
    cfg = m.pretrained_cfg
    ds = open_dataset(str(folder), m, "test", None, preprocess_options(crop_pct=1.0))
    want = by_hand(first_image(folder), 32, 1.0, T.InterpolationMode.BICUBIC, cfg["mean"], cfg["std"])
    assert torch.allclose(ds[0][0], want, atol=1e-6)


@pytest.fixture
def hf_folder(tmp_path):
    """A Hugging Face ViT folder whose image processor resizes the shortest edge to 36, crops 32, bicubic."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=2)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                                image_mean=[0.2, 0.3, 0.4], image_std=[0.5, 0.6, 0.7])
    processor.save_pretrained(tmp_path)
    return tmp_path, processor


def test_hf_image_processor_config_is_the_models_preprocessing(folder, hf_folder):
    from tokenopt import sources

    path, processor = hf_folder
    model, _ = sources.load_model(f"hf:{path}")
    ds = open_dataset(str(folder), model, "test", None, {})
    image = first_image(folder)
    want = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                      T.Normalize((0.2, 0.3, 0.4), (0.5, 0.6, 0.7))])(image)
    assert torch.allclose(ds[0][0], want, atol=1e-6)
    # and Hugging Face's own processor agrees (its resize rounds differently: a loose bound)
    hf = torch.as_tensor(processor(images=image, return_tensors="np")["pixel_values"][0])
    assert (ds[0][0] - hf).abs().mean() < 0.02
    # a flag still wins over the folder's config
    ds = open_dataset(str(folder), model, "test", None, preprocess_options(mean="0,0,0", std="1,1,1"))
    assert torch.allclose(ds[0][0], want * torch.tensor([0.5, 0.6, 0.7])[:, None, None]
                          + torch.tensor([0.2, 0.3, 0.4])[:, None, None], atol=1e-6)


def test_hf_height_width_resize_squashes(tmp_path):
    from tokenopt.sources.hf import hf_data_config

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": {"height": 48, "width": 48}, "resample": 2, "do_normalize": False}))
    assert hf_data_config(tmp_path) == {"input_size": (3, 48, 48), "crop_pct": 1.0, "crop_mode": "squash",
                                        "interpolation": "bilinear", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def test_squash_mode_resizes_both_edges(folder, tmp_path):
    """HF's {"height", "width"} resize: the whole image to H x W, no crop."""
    from tokenopt.data import get_dataset

    ds = get_dataset(str(folder), "test", preprocess={"input_size": (3, 24, 24), "crop_pct": 1.0,
                                                      "crop_mode": "squash", "interpolation": "bilinear",
                                                      "mean": (0.0,) * 3, "std": (1.0,) * 3})
    want = T.Compose([T.Resize((24, 24), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor()])(first_image(folder))
    assert torch.allclose(ds[0][0], want, atol=1e-6)


@pytest.mark.parametrize("verb", ["eval", "probe", "train"])
def test_mean_with_the_wrong_count_exits_2(folder, tmp_path, verb):
    extra = {"eval": ["--recipe", "x.yaml"], "probe": [], "train": ["-o", tmp_path / "o.pt", "--finetune-epochs", 1]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: tome\n    r: 2\n")
    head = ["train", recipe, TINY] if verb == "train" else [verb, TINY]
    args = [*head, "--data", folder, "--mean", "0.5,0.5", *extra[verb]]
    if verb == "eval":
        args[args.index("x.yaml")] = recipe
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert "--mean: 2 values given (0.5,0.5), but the input has 3 channels: give 3" in res.output
    assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == [recipe]   # nothing written


@pytest.mark.parametrize("flag,value,says", [("--std", "1,0,1", "above 0"), ("--interpolation", "cubic", "choose one of"),
                                             ("--crop-pct", "0", "a fraction in (0, 1]"),
                                             ("--mean", "a,b,c", "numbers separated by commas")])
def test_bad_flag_values_exit_2(folder, flag, value, says):
    res = run("probe", TINY, "--data", folder, flag, value)
    assert res.exit_code == 2
    assert says in res.output and flag in res.output
