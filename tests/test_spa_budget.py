"""SPA's target_keep: each layer's threshold calibrated after gate training so the layer keeps a
stated mean share of the patch tokens; the share on held-out images, the threshold in the saved
model, the report of `tokenopt train`, and the recipe errors."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from typer.testing import CliRunner

import tokenopt
from tokenopt.cli import app
from tokenopt.data import get_dataset
from tokenopt.errors import RecipeError
from tokenopt.ops.gates import kept_counts, select_tokens, threshold_for_share
from tokenopt.passes.spa import gates_of
from tokenopt.train.gate import budget_report, calibrate_gates, measure_kept, train_gates

TINY_KW = dict(img_size=32, patch_size=8, depth=4, num_classes=10, embed_dim=32, num_heads=2)
TINY = "timm:vit_small_patch16_224?" + "&".join(f"{k}={v}" for k, v in TINY_KW.items())


def rule(**kw):
    return {"version": 1, "rules": [{"pass": "spa", "layers": "1-3", "min_keep": 0.0, **kw}]}


# ------------------------------------------------------------------------------------------------
# the threshold search against a brute force over every threshold the images allow


@pytest.mark.parametrize("lo, hi, target", [(0, 16, 0.3), (2, 10, 0.45), (1, 16, 0.02), (0, 16, 1.0), (4, 12, 0.9)])
def test_threshold_for_share_is_the_closest_share_any_threshold_gives(lo, hi, target):
    g = torch.Generator().manual_seed(3)
    prob = torch.rand(40, 16, generator=g) ** 2
    valid = torch.rand(40, 16, generator=g) > 0.1
    t, share = threshold_for_share(prob, valid, lo, hi, target)
    # brute force: every probability (and above all of them) as the threshold, the exact selection
    prefix_valid = torch.ones(40, 1, dtype=torch.bool)
    shares = []
    for cand in torch.cat([prob[valid], torch.tensor([1.5])]).tolist():
        keep = select_tokens(torch.cat([torch.ones(40, 1), prob], 1), torch.cat([prefix_valid, valid], 1), 1,
                             cand, lo, hi)
        shares.append(keep[:, 1:].sum().item() / prob.numel())
    best = min(abs(s - target) for s in shares)
    assert abs(share - target) == pytest.approx(best, abs=1e-12)
    assert share == kept_counts(prob, valid, t, lo, hi).sum().item() / prob.numel()


# ------------------------------------------------------------------------------------------------
# on a trained tiny model


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", **TINY_KW).eval()
    data = torch.utils.data.Subset(get_dataset("digits-clutter", "train", 32, masks="box", variants=2), range(768))
    example = torch.stack([data[i][0] for i in range(2)])
    gm = tokenopt.optimize(model, rule(target_keep=0.35, gate={"hidden": 16, "noise": 0}), example, report=False)
    result = train_gates(gm, model, data, "masks", epochs=2, batch_size=64, lr=1e-2, quiet=True,
                         calibration_images=512)
    return gm, data, result


def test_calibrated_gates_keep_the_target_share_on_held_out_images(trained):
    gm, data, result = trained
    held_out = torch.stack([x for x, _ in get_dataset("digits-clutter", "test", 32)])        # 360 images
    train_x = torch.stack([data[i][0] for i in range(512)])
    assert sorted(result.calibrated) == [1, 2, 3]
    on_train, on_test = measure_kept(gm, train_x), measure_kept(gm, held_out)
    for i, (t, share) in result.calibrated.items():
        gate = gates_of(gm)[i]
        assert float(gate.threshold) == pytest.approx(t) and 0.0 < t < 1.0
        assert on_train[i] == pytest.approx(share, abs=1e-9)          # the calibration images: as measured there
        assert abs(share - 0.35) < 0.01                               # 512 images x 16 tokens: fine steps
        assert abs(on_test[i] - 0.35) < 0.03, (i, on_test[i])
    lines = budget_report(gm, {"train": train_x, "test": held_out})
    assert lines[0].startswith("L1: target_keep 0.350, kept train 0.35") and "test 0.3" in lines[0]
    assert lines[-1].startswith("mean: target_keep 0.350, kept train")


def test_the_calibrated_threshold_is_saved_with_the_model(trained, tmp_path):
    gm, data, _ = trained
    path = tmp_path / "spa.pt"
    tokenopt.save(gm, path, arch=TINY)
    loaded = tokenopt.load(path)
    assert {i: float(g.threshold) for i, g in gates_of(loaded).items()} == \
           {i: float(g.threshold) for i, g in gates_of(gm).items()}
    assert {g.target_keep for g in gates_of(loaded).values()} == {0.35}
    x = torch.stack([data[i][0] for i in range(8)])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(loaded(x), gm.eval()(x))


def test_calibration_goes_layer_by_layer():
    """A later layer is calibrated on inputs shaped by the thresholds set before it: with a target
    far from what the untrained gates keep, calibrating each layer on the untouched model would miss."""
    torch.manual_seed(1)
    model = timm.create_model("vit_small_patch16_224", **TINY_KW).eval()
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    gm = tokenopt.optimize(model, rule(target_keep=0.2, mode="prune", min_keep=0.0), x[:2], report=False)
    for g in gates_of(gm).values():
        g.trained.fill_(True)
    found = calibrate_gates(gm, x)
    kept = measure_kept(gm, x)
    for i in (1, 2, 3):
        assert abs(kept[i] - 0.2) <= 1 / 16 / 2 + 1e-9 and kept[i] == pytest.approx(found[i][1])


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("option, says", [
    ("target_keep: 0", "target_keep must be a share in (0, 1]"),
    ("target_keep: 1.5", "target_keep must be a share in (0, 1]"),
    ("target_keep: true", "target_keep must be a share in (0, 1]"),
    ("target_keep: 0.5\n    threshold: 0.3", "target_keep (0.5) and threshold (0.3) are both given"),
    ("target_keep: 0.05\n    min_keep: 0.1", "target_keep (0.05) is below min_keep (0.1)"),
])
def test_bad_target_keep_is_refused_with_exit_2_and_nothing_written(tmp_path, option, says):
    path = tmp_path / "r.yaml"
    path.write_text(f"version: 1\nrules:\n  - pass: spa\n    layers: 1-2\n    {option}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml, line 3") as e:
        tokenopt.optimize(timm.create_model("vit_small_patch16_224", **TINY_KW), path, report=False)
    assert says in str(e.value)
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(app, ["apply", str(path), TINY, "-o", str(out)])
    assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not out.exists()


def test_tokenopt_train_reports_target_against_achieved(tmp_path):
    recipe = tmp_path / "spa.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: spa\n    layers: [1, 2]\n    target_keep: 0.4\n"
                      "    min_keep: 0.0\n")
    out = tmp_path / "spa.pt"
    result = CliRunner().invoke(app, ["train", str(recipe), TINY, "-o", str(out), "--data", "digits-clutter",
                                      "--labels", "masks", "--gate-epochs", "1", "--limit", "128",
                                      "--eval-images", "64", "--batch-size", "64"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "budget after gates trained (1 ep, masks labels)" in text
    for layer in (1, 2):
        assert f"L{layer}: target_keep 0.400, kept train 0.4" in text       # 128 images x 16 tokens
    assert "mean: target_keep 0.400, kept train" in text and ", test 0." in text
    loaded = tokenopt.load(out)
    assert all(float(g.threshold) != 0.5 for g in gates_of(loaded).values())


# ------------------------------------------------------------------------------------------------
# the shipped recipes and the paper's gate


@pytest.mark.parametrize("name", ["spa-bypass-second-half", "spa-prune"])
def test_shipped_recipes_state_a_budget_and_the_measured_gate(name):
    from pathlib import Path

    from tokenopt.recipe import load_recipe

    options = load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.yaml").rules[0].options
    assert options.target_keep == 0.5 and options.threshold is None
    assert (options.gate.hidden, options.gate.noise) == (64, 0.0)


def test_gate_paper_is_the_papers_linear_gate():
    from tokenopt.recipe import load_recipe

    gm = tokenopt.optimize(timm.create_model("vit_small_patch16_224", **TINY_KW), rule(gate="paper"), report=False)
    gate = gates_of(gm)[1]
    assert isinstance(gate.score, torch.nn.Linear) and gate.noise == 1.0 and float(gate.threshold) == 0.5
    with pytest.raises(RecipeError, match=r"gate must be `paper` or a mapping such as \{hidden: 64, noise: 0\}, "
                                          r"got 'papr'"):
        load_recipe(rule(gate="papr"))


def test_weights_saved_before_the_threshold_was_a_buffer_still_load():
    gm = tokenopt.optimize(timm.create_model("vit_small_patch16_224", **TINY_KW), rule(threshold=0.3), report=False)
    old = {k: v for k, v in gm.state_dict().items() if not k.endswith(".threshold")}
    assert len(old) == len(gm.state_dict()) - 3
    again = tokenopt.optimize(timm.create_model("vit_small_patch16_224", **TINY_KW), rule(threshold=0.3), report=False)
    again.load_state_dict(old, strict=True)
    assert [float(g.threshold) for g in gates_of(again).values()] == pytest.approx([0.3] * 3)
