"""tokenopt train: selectors then fine-tuning, one checkpoint, resume, and its user errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import tokenopt
from tokenopt.cli import app
from tokenopt.passes.tosa import UntrainedSelectorWarning, selectors
from tokenopt.record import record_of

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


def test_a_recipe_without_selectors_needs_fine_tuning_epochs(tmp_path):
    recipe = tmp_path / "tome.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: tome\n    r: 2\n")
    res = run("train", recipe, MODEL, "--data", "digits", "-o", tmp_path / "x.pt")
    assert res.exit_code == 2 and "no `pass: tosa` rule" in res.output and "no `pass: spa` rule" in res.output and "--finetune-epochs" in res.output
    assert not (tmp_path / "x.pt").exists()


def test_fine_tuning_with_tome_in_the_loop(tmp_path):
    # the ToMe paper's "train with ToMe": the backbone trains with the merges in its forward pass
    recipe = tmp_path / "tome.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: tome\n    r: 8\n")
    torch.manual_seed(0)
    start = tokenopt.sources.build_arch(MODEL)[0]
    weights = tmp_path / "start.pt"
    torch.save(start.state_dict(), weights)
    out = tmp_path / "tome.pt"
    res = run("train", recipe, weights, "--arch", MODEL, "--data", "digits", "-o", out, "--limit", "96",
              "--batch-size", "32", "--finetune-epochs", "1", "--finetune-lr", "1e-3", "--eval-images", "32")
    assert res.exit_code == 0, res.output
    for line in ("original", "tome, training-free", "tome, fine-tuned (1 ep)"):
        assert line in res.output
    tuned = tokenopt.load(out)
    assert [lp.tokens_out for lp in record_of(tuned).plan.layers] == [57, 49, 41]   # 64 patches + cls, r=8
    before, after = start.state_dict(), tuned.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"blocks.0.attn.qkv.weight", "blocks.2.mlp.fc2.weight", "head.weight"} <= changed
    assert torch.load(f"{out}.ckpt", weights_only=True)["epoch"] == 1


@pytest.mark.slow   # > 10 s on 2 cores: CI runs it with -m slow
def test_train_runs_under_torchrun_and_rank_0_saves(tmp_path):
    recipe = tmp_path / "tosa.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "tosa.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tokenopt", "train", str(recipe), MODEL, "--data", "digits", "-o", str(out),
                           "--limit", "64", "--batch-size", "16", "--selector-epochs", "1", "--eval-images", "32"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1 and "selectors trained (1 ep)" in proc.stdout
    gm = tokenopt.load(out)
    assert all(bool(m.trained) for m in selectors(gm).values())
    ckpt = torch.load(f"{out}.ckpt", weights_only=True)
    assert ckpt["settings"]["world_size"] == 2 and ckpt["step"] == 2   # 64 images / 2 ranks / 16 per batch


def test_untrained_selectors_warn_and_strict_refuses_from_the_cli(tmp_path):
    recipe = tmp_path / "tosa.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "tosa.pt"
    res = run("apply", recipe, MODEL, "-o", out, "--strict")
    assert res.exit_code == 2 and "never trained" in res.output and "strict" in res.output
    assert "Traceback" not in res.output and not out.exists()
    res = run("eval", MODEL, "--data", "digits", "--recipe", recipe, "--limit", "16", "--strict")
    assert res.exit_code == 2 and "never trained" in res.output
    res = run("apply", recipe, MODEL, "-o", out)   # without --strict: saved, with a warning on use
    assert res.exit_code == 0, res.output
    assert out.exists()
    with pytest.warns(UntrainedSelectorWarning, match="never trained"):
        tokenopt.load(out)(torch.randn(2, 3, 32, 32))


def _flat_folder(root, per_class=10):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _files(ds):
    return {ds.dataset.samples[i][0] for i in ds.indices}


def test_a_folder_without_splits_holds_out_its_test_images(tmp_path, monkeypatch):
    """`train --data /data/train` (one folder, no train/ and val/): the test table must not be made of
    training images. A seeded 10% is held out, the run says how many, and training never sees them."""
    import tokenopt.train as train_pkg
    import tokenopt.train.selector as selector_mod

    data = _flat_folder(tmp_path / "train")
    recipe = tmp_path / "tosa.yaml"
    recipe.write_text(RECIPE)
    seen = {}
    real_train, real_eval = selector_mod.train_selectors, train_pkg.evaluate

    def train_selectors(gm, original, train_set, **kw):
        seen["train"] = _files(train_set)
        return real_train(gm, original, train_set, **kw)

    def evaluate(m, loader, *a, **kw):
        seen.setdefault("test", _files(loader.dataset))
        return real_eval(m, loader, *a, **kw)

    monkeypatch.setattr(selector_mod, "train_selectors", train_selectors)
    monkeypatch.setattr(train_pkg, "evaluate", evaluate)
    res = run("train", recipe, MODEL, "--data", data, "-o", tmp_path / "t.pt", "--selector-epochs", "1",
              "--batch-size", "8")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert (f"note: '{data}' has no train/ and val/ folders, so 2 of its 20 images (10%, chosen with seed 0) are "
            "held out: training uses the other 18; the table reports 2 held-out images.") in text
    assert "(held out, 2 images)" in text and "(test," not in text
    assert len(seen["train"]) == 18 and len(seen["test"]) == 2 and not seen["train"] & seen["test"]


def test_eval_on_a_folder_without_splits_does_not_call_it_test(tmp_path):
    data = _flat_folder(tmp_path / "imgs", per_class=2)
    recipe = tmp_path / "tome.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: tome\n    r: 2\n")
    res = run("eval", MODEL, "--data", data, "--recipe", recipe)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "(every image of the folder: it has no train/ or val/ split, 4 images)" in text and "(test," not in text
