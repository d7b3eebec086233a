"""tokenopt eval and tokenopt probe: tables, files, and their user errors (exit 2, no file)."""
from __future__ import annotations

import csv

import yaml
from typer.testing import CliRunner

from tokenopt.cli import app
from tokenopt.record import record_of

MODEL = "timm:vit_small_patch16_224?img_size=32&patch_size=4&depth=4&num_classes=10&embed_dim=64&num_heads=2"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_eval_sweep_writes_csv_and_plot(tmp_path):
    res = run("eval", MODEL, "--data", "digits", "--sweep", "tome,tofu", "--r", "0,8,16", "--limit", "40",
              "--csv", tmp_path / "s.csv", "--plot", tmp_path / "s.png")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [(r["method"], r["r"]) for r in rows] == [("original", "")] + [
        (m, str(r)) for m in ("tome", "tofu") for r in (0, 8, 16)]
    assert all(int(r["n"]) == 40 for r in rows)
    gflops = {(r["method"], r["r"]): float(r["gflops"]) for r in rows}
    assert gflops[("tome", "0")] == gflops[("original", "")] > gflops[("tome", "8")] > gflops[("tome", "16")]
    assert float(rows[1]["agreement"]) == 1.0                       # r = 0 is the original
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_with_recipe_prints_both_models(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: tome\n    r: 8\n")
    res = run("eval", MODEL, "--data", "digits", "--recipe", recipe, "--limit", "40")
    assert res.exit_code == 0, res.output
    assert "original" in res.output and "r" in res.output and "agreement" in res.output


def test_probe_writes_a_loadable_recipe(tmp_path):
    out = tmp_path / "plan.yaml"
    res = run("probe", MODEL, "--data", "digits", "--images", "16", "-o", out, "--r", "6")
    assert res.exit_code == 0, res.output
    rules = yaml.safe_load(out.read_text())["rules"]
    layers = sorted(i for r in rules for i in r["layers"])
    assert layers == [0, 1, 2, 3] and {r["op"] for r in rules} == {"prune", "mlerp"}
    from tokenopt.recipe import load_recipe
    assert load_recipe(out).rules[0].options.r == 6


def test_probe_on_a_model_without_blocks(tmp_path, user_models):
    out = tmp_path / "plan.yaml"
    res = run("probe", "tokenopt_user_models:make_cnn", "--data", "digits", "-o", out)
    assert res.exit_code == 2
    assert "no transformer blocks" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_auto_without_calibration_is_exit_2(tmp_path):
    recipe = tmp_path / "auto.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: tofu\n    r: 4\n    op: auto\n")
    res = run("apply", recipe, MODEL, "-o", tmp_path / "out.pt")
    assert res.exit_code == 2 and "calibration" in res.output
    assert not (tmp_path / "out.pt").exists()


def test_unknown_op_is_exit_2(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: tofu\n    r: 4\n    op: squash\n")
    res = run("apply", recipe, MODEL, "-o", tmp_path / "out.pt")
    assert res.exit_code == 2 and "op" in res.output and "line 3" in res.output


def test_eval_errors(tmp_path):
    res = run("eval", MODEL, "--data", "digits")
    assert res.exit_code == 2 and "--recipe" in res.output
    res = run("eval", MODEL, "--data", "digits", "--sweep", "tome,nope")
    assert res.exit_code == 2 and "nope" in res.output
    res = run("eval", MODEL, "--data", tmp_path / "missing", "--sweep", "tome")
    assert res.exit_code == 2 and "unknown data set" in res.output


def test_apply_auto_with_calibration_round_trips(tmp_path):
    """op: auto measures once; the artifact replays the measured plan without calibration data."""
    import torch

    import tokenopt
    recipe = tmp_path / "auto.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: tofu\n    r: 4\n    op: auto\n")
    out = tmp_path / "auto.pt"
    res = run("apply", recipe, MODEL, "-o", out, "--calibration", "digits")
    assert res.exit_code == 0, res.output
    assert "linearity error" in res.output
    loaded = tokenopt.load(out)
    ops = [lp.step.params.op for lp in record_of(loaded).plan.layers]
    assert sorted(ops) == ["mlerp", "mlerp", "prune", "prune"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert loaded(x).shape == (2, 10)
