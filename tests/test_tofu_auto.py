"""ToFu `op: auto`: which blocks prune is decided by the linearity profile, not by depth or counts.

The profiles are given (``context={"linearity": ...}`` for the library, a patched
``linearity_profile`` for ``tokenopt probe``) and ordered so that the linear blocks are not the
late ones: a threshold applied the wrong way round, or a strict ``>`` instead of ``>=``, picks a
different set of blocks even where the number of pruned blocks stays the same.
"""
from __future__ import annotations

import statistics

import pytest
import timm
import torch
import yaml
from typer.testing import CliRunner

import tokenopt
from tokenopt.analysis import analyse
from tokenopt.cli import app
from tokenopt.plan import make_plan
from tokenopt.recipe import load_recipe
from tokenopt.passes import linearity as probe_mod
from tokenopt.record import record_of

# (errors per block, threshold or None for the median, blocks expected to prune)
CASES = {
    "median-even": ([0.9, 0.1, 0.5, 0.05], None, [0, 2]),        # median 0.3
    "median-odd": ([0.5, 0.95, 0.1, 0.9, 0.25], None, [0, 1, 3]),  # median 0.5 (mean 0.54): block 0 sits on it
    "threshold": ([0.25, 0.5, 0.125, 0.75], 0.5, [1, 3]),         # block 1 sits on it
    "threshold-0": ([0.25, 0.5, 0.125, 0.75], 0.0, [0, 1, 2, 3]),
    "threshold-high": ([0.25, 0.5, 0.125, 0.75], 1.0, []),
}


def tiny_timm(depth: int):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=depth, num_classes=10,
                             embed_dim=32, num_heads=2).eval()


_ANALYSES: dict = {}


def analysis_of(depth: int):
    if depth not in _ANALYSES:
        _ANALYSES[depth] = analyse(tiny_timm(depth), torch.randn(2, 3, 32, 32))
    return _ANALYSES[depth]


def auto_recipe(threshold=None, layers="all"):
    rule = {"pass": "tofu", "layers": layers, "r": 2, "op": "auto"}
    if threshold is not None:
        rule["threshold"] = threshold
    return load_recipe({"version": 1, "rules": [rule]})


def ops_of(plan) -> list[str]:
    return [lp.step.params.op if lp.step else "-" for lp in plan.layers]


@pytest.mark.parametrize("case", CASES)
def test_auto_prunes_exactly_the_nonlinear_blocks(case):
    """make_plan with a known profile: blocks with error >= threshold (or median) prune, the rest
    merge with MLERP, and each layer's description shows its own error."""
    errors, tau, prune = CASES[case]
    plan = make_plan(auto_recipe(tau), analysis_of(len(errors)), {"linearity": errors})
    assert ops_of(plan) == ["prune" if i in prune else "mlerp" for i in range(len(errors))]
    assert [lp.step.describe.endswith(f"(linearity error {e:.3f})") for lp, e in zip(plan.layers, errors)] \
        == [True] * len(errors)


def test_resolve_uses_each_selected_block_own_error():
    """With a subset of layers the profile is indexed by block, and the median is that of the
    selected blocks only (0.5, 0.05, 0.9 -> 0.5), not of the whole model (0.7)."""
    plan = make_plan(auto_recipe(layers=[1, 2, 3]), analysis_of(4), {"linearity": [0.95, 0.5, 0.05, 0.9]})
    assert ops_of(plan) == ["-", "prune", "mlerp", "prune"]


def test_resolve_directly():
    """ToFu.resolve on its own: the op is rewritten per layer and the error is recorded."""
    from tokenopt.passes.tofu import ToFu, ToFuOptions

    class B:
        def __init__(self, i):
            self.index = i

    p = ToFu()
    auto = ToFuOptions(r=2, op="auto")
    per_layer = p.layer_options(auto, 4, "here")
    out = p.resolve(auto, per_layer, [B(i) for i in range(4)], {"linearity": [0.9, 0.1, 0.5, 0.05]}, "here")
    assert [(o.op, o.linearity) for o in out] == [("prune", 0.9), ("mlerp", 0.1), ("prune", 0.5), ("mlerp", 0.05)]
    merge = ToFuOptions(r=2, op="merge")
    fixed = p.layer_options(merge, 4, "here")
    assert p.resolve(merge, fixed, [B(i) for i in range(4)], {}, "here") == fixed   # only auto consults the profile


def test_optimize_with_calibration_follows_the_measured_order(monkeypatch):
    """tokenopt.optimize(..., calibration=...) measures the profile and prunes where it is high."""
    monkeypatch.setattr(probe_mod, "linearity_profile",
                        lambda model, images, **kw: probe_mod.LinearityProfile(
                            [f"blocks.{i}" for i in range(4)], [0.1, 0.9, 0.05, 0.5], len(images), (0.5,)))
    fast = tokenopt.optimize(tiny_timm(4), {"version": 1, "rules": [{"pass": "tofu", "r": 2, "op": "auto"}]},
                             calibration=torch.randn(4, 3, 32, 32), report=False)
    assert [lp.step.params.op for lp in record_of(fast).plan.layers] == ["mlerp", "prune", "mlerp", "prune"]


# ---------------------------------------------------------------------------------------------- CLI

def spec(depth: int) -> str:
    return (f"timm:vit_small_patch16_224?img_size=32&patch_size=8&depth={depth}&num_classes=10"
            "&embed_dim=32&num_heads=2")


@pytest.fixture
def fixed_profile(monkeypatch):
    """Make ``tokenopt probe`` report the given errors instead of measuring them."""
    holder = {}

    def fake(model, images, alphas=(0.25, 0.5, 0.75), analysis=None, leaf_modules=()):
        errors = holder["errors"]
        assert analysis is not None and len(analysis.blocks) == len(errors)
        return probe_mod.LinearityProfile(analysis.block_paths, list(errors), images.shape[0], alphas)

    monkeypatch.setattr(probe_mod, "linearity_profile", fake)
    return holder


@pytest.mark.parametrize("case", ["median-even", "median-odd", "threshold"])
def test_probe_cli_writes_prune_for_the_nonlinear_blocks(tmp_path, fixed_profile, case):
    """`tokenopt probe` prints and writes a recipe whose prune rule lists exactly the blocks at or
    above the threshold; the recipe then plans those ops."""
    errors, tau, prune = CASES[case]
    fixed_profile["errors"] = errors
    out = tmp_path / "plan.yaml"
    args = ["probe", spec(len(errors)), "--data", "digits", "--images", "4", "-o", str(out), "--r", "2"]
    if tau is not None:
        args += ["--threshold", str(tau)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rules = yaml.safe_load(out.read_text())["rules"]
    mlerp = [i for i in range(len(errors)) if i not in prune]
    assert rules == [{"pass": "tofu", "layers": prune, "r": 2, "op": "prune"},
                     {"pass": "tofu", "layers": mlerp, "r": 2, "op": "mlerp"}]
    expected = ["prune" if i in prune else "mlerp" for i in range(len(errors))]
    assert _table_ops(res.output) == expected
    how = "given" if tau is not None else "median"
    assert f"threshold {tau if tau is not None else statistics.median(errors):.4f} ({how})" in res.output
    plan = make_plan(load_recipe(out), analysis_of(len(errors)))
    assert ops_of(plan) == expected


def _table_ops(output: str) -> list[str]:
    """The op column of the printed table, in row order."""
    ops = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│") if c.strip()]
        if len(cells) == 4 and cells[0].isdigit() and cells[3] in ("prune", "mlerp"):
            ops.append(cells[3])
    return ops
