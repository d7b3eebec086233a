"""tokenopt train: selectors then fine-tuning, one checkpoint, resume, and its user errors."""
from __future__ import annotations

import torch
from typer.testing import CliRunner

import tokenopt
from tokenopt.cli import app
from tokenopt.passes.tosa import selectors

MODEL = "timm:vit_small_patch16_224?img_size=32&patch_size=4&depth=3&num_classes=10&embed_dim=48&num_heads=4"
RECIPE = "version: 1\nrules:\n  - pass: tosa\n    layers: 1-2\n    keep: 0.5\n    selector: {input: pooled, hidden: 8}\n"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_saves_trained_selectors_and_resumes(tmp_path):
    recipe = tmp_path / "tosa.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "tosa.pt"
    args = ("train", recipe, MODEL, "--data", "digits", "-o", out, "--limit", "64", "--batch-size", "32",
            "--selector-epochs", "1", "--finetune-epochs", "1", "--eval-images", "32")
    res = run(*args)
    assert res.exit_code == 0, res.output
    for line in ("original", "untrained selectors", "selectors trained (1 ep)", "fine-tuned (1 ep)", "GFLOPs"):
        assert line in res.output
    gm = tokenopt.load(out)
    assert sorted(selectors(gm)) == [1, 2] and all(bool(m.trained) for m in selectors(gm).values())
    ckpt = torch.load(f"{out}.ckpt", weights_only=True)
    assert ckpt["fingerprint"].endswith(":finetune") and ckpt["epoch"] == 1

    # the checkpoint is in its last phase, complete: resuming trains nothing more and saves the same model
    again = tmp_path / "again.pt"
    res = run(*args[:6], again, *args[7:], "--resume", f"{out}.ckpt")
    assert res.exit_code == 0, res.output
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tokenopt.load(again)(x), gm(x))

    other = tmp_path / "other.yaml"
    other.write_text(RECIPE.replace("0.5", "0.7"))
    res = run("train", other, MODEL, "--data", "digits", "-o", tmp_path / "x.pt", "--limit", "64",
              "--resume", f"{out}.ckpt")
    assert res.exit_code == 2 and "another recipe" in res.output
    assert not (tmp_path / "x.pt").exists()


def test_resume_after_the_selector_phase_goes_on_to_fine_tuning(tmp_path):
    recipe = tmp_path / "tosa.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "tosa.pt"
    args = ("train", recipe, MODEL, "--data", "digits", "--limit", "64", "--batch-size", "32",
            "--selector-epochs", "1", "--eval-images", "0")
    assert run(*args, "-o", out).exit_code == 0
    assert torch.load(f"{out}.ckpt", weights_only=True)["fingerprint"].endswith(":selectors")
    res = run(*args, "-o", tmp_path / "tuned.pt", "--finetune-epochs", "1", "--resume", f"{out}.ckpt")
    assert res.exit_code == 0, res.output
    ckpt = torch.load(f"{out}.ckpt", weights_only=True)       # the resumed run keeps writing there
    assert ckpt["fingerprint"].endswith(":finetune") and ckpt["epoch"] == 1
    selected = tokenopt.load(out).state_dict()
    tuned = tokenopt.load(tmp_path / "tuned.pt").state_dict()
    assert all(torch.equal(selected[k], tuned[k]) for k in selected if k.startswith("tosa_selectors"))
    assert not torch.equal(selected["blocks.1.attn.qkv.weight"], tuned["blocks.1.attn.qkv.weight"])


def test_train_needs_a_tosa_rule(tmp_path):
    recipe = tmp_path / "tome.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: tome\n    r: 2\n")
    res = run("train", recipe, MODEL, "--data", "digits", "-o", tmp_path / "x.pt")
    assert res.exit_code == 2 and "no `pass: tosa` rule" in res.output
