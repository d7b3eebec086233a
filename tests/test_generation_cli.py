"""``tokenopt generate`` and ``tokenopt eval`` of a generator, on a random-init class-conditional DiT folder
(and its artifact), with a stand-in classifier so no trained demo model is needed."""
from __future__ import annotations

import csv
import sys

import pytest
import torch
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from tokenopt.cli import app  # noqa: E402
from tokenopt.generation import fid  # noqa: E402
from tokenopt.sources.generator_models import DIT  # noqa: E402

runner = CliRunner()
TINY_DIT = {**DIT, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dit")
    diffusers.DiTTransformer2DModel(**TINY_DIT).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dit_artifact(dit_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "dit.tokenopt.pt"
    recipe = out.with_name("op.yaml")
    recipe.write_text("version: 1\nrules:\n  - {pass: tome, placement: op, ratio: 0.5}\n")
    res = run("apply", recipe, f"diffusers:{dit_dir}", "-o", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def stand_in_classifier(monkeypatch):
    """A random tiny timm ViT in place of demo:digits: the figures are meaningless, the plumbing is not."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              embed_dim=16, num_heads=2, num_classes=10).eval()
    monkeypatch.setattr(fid, "digits_classifier", lambda: model)
    return model


def png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_generate_writes_a_grid_and_the_seed_fixes_it(dit_dir, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        res = run("generate", f"diffusers:{dit_dir}", "--class", 3, "--steps", 2, "--seed", seed, "-n", 10, "-o", out)
        assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "10 images of class 3" in res.output
    # 10 images of 32 px, 8 to a row: 2 rows; 2 px gaps; every pixel drawn 2x2
    assert png_size(a) == ((8 * 34 + 2) * 2, (2 * 34 + 2) * 2)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()


def test_generate_from_an_optimized_artifact(dit_artifact, tmp_path):
    out = tmp_path / "g.png"
    res = run("generate", dit_artifact, "--class", 9, "--steps", 2, "-n", 4, "-o", out)
    assert res.exit_code == 0, res.output
    assert png_size(out) == ((4 * 34 + 2) * 2, (34 + 2) * 2)


@pytest.mark.parametrize("label", [10, -1])
def test_generate_refuses_a_class_out_of_range(dit_dir, tmp_path, label):
    out = tmp_path / "g.png"
    res = run("generate", f"diffusers:{dit_dir}", "--class", label, "-o", out)
    assert res.exit_code == 2
    assert f"--class {label} is out of range: this generator draws classes 0 to 9." in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_generate_refuses_a_model_that_is_not_a_generator(tmp_path):
    out = tmp_path / "g.png"
    res = run("generate", "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=1", "--class", 1, "-o", out)
    assert res.exit_code == 2
    assert "is not a diffusers denoiser, so it cannot generate a chosen class" in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_generate_refuses_a_unet_without_class_labels(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "unet"
    diffusers.UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                   block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                   attention_head_dim=4, norm_num_groups=4).save_pretrained(folder)
    res = run("generate", f"diffusers:{folder}", "--class", 1, "-o", tmp_path / "g.png")
    assert res.exit_code == 2
    assert "is a UNet2DConditionModel without class labels" in res.output


def test_eval_of_a_generator_sweeps_op_level_and_writes_csv_plot_grids(dit_dir, tmp_path, stand_in_classifier):
    grids = tmp_path / "grids"
    grids.mkdir()
    table, plot = tmp_path / "q.csv", tmp_path / "q.png"
    res = run("eval", f"diffusers:{dit_dir}", "--sweep", "tome", "--ratios", "0.5", "--samples", 20, "--steps", 2,
              "--grids", grids, "--csv", table, "--plot", plot)
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(table.open()))
    assert [r["setting"] for r in rows] == ["original", "tome op 0.5"]
    assert all(r["n_generated"] == "20" and r["n_real"] == "360" for r in rows)
    orig, merged = (float(r["gflops"]) for r in rows)
    assert 0 < merged < orig
    assert all(0 <= float(r["class_acc"]) <= 1 and float(r["fid"]) >= 0 for r in rows)
    assert sorted(p.name for p in grids.iterdir()) == ["original.png", "tome-op-0.5.png"]
    # 20 images of 10 classes: 2 per class, one column per class
    assert png_size(grids / "original.png") == ((10 * 34 + 2) * 2, (2 * 34 + 2) * 2)
    assert plot.stat().st_size > 0


def test_eval_of_a_classifier_still_needs_data():
    res = run("eval", "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=1", "--recipe", "x.yaml")
    assert res.exit_code == 2
    assert "is a classifier: give --data" in res.output
