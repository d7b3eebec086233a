"""Token counts that vary by image: planned as TokenCount(max, expected), reported with the mean measured.

No built-in pass keeps a different number of tokens per image yet, so a small gate is registered
here: it keeps, per image, the patch tokens whose norm is above a threshold (the stream stays
dense; the tokens after each image's count are zeroed, as padding would be) and plans "at most all, about ``keep`` of them".
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import pytest
import timm
import torch

import tokenopt
from tokenopt.analysis import analyse
from tokenopt.passes import base as registry
from tokenopt.passes.base import LayerStep, Pass, PassOptions
from tokenopt.plan import LayerPlan, make_plan
from tokenopt.recipe import load_recipe
from tokenopt.report import LayerRow
from tokenopt.tokens import TokenCount
from tokenopt.record import record_of


def count_above(x: torch.Tensor, prefix: int, threshold: float) -> torch.Tensor:
    """(B, N, C) -> (B,): prefix tokens plus the patch tokens whose norm exceeds ``threshold``."""
    return prefix + (x[:, prefix:].norm(dim=-1) > threshold).sum(1)


def zero_after(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, N, C), (B,) -> x with the tokens at positions >= counts[b] zeroed: a padded layout's tail."""
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < counts[:, None]
    return x * keep[..., None]


class GateOptions(PassOptions):
    keep: float
    threshold: float = 1.0


@dataclass(frozen=True)
class GateParams:
    keep: float
    threshold: float


class ToyGate(Pass):
    Options = GateOptions
    changes_token_count = True

    def layer_options(self, options, n_layers, where):
        return [GateParams(options.keep, options.threshold)] * n_layers

    def plan_layer(self, block, params, tokens_in, prefix):
        free = tokens_in.max - prefix
        return LayerStep(TokenCount(tokens_in.max, prefix + params.keep * free), params, f"gate keep≈{params.keep}")

    def rewrite(self, g, block, step):
        out = g.node(block.output)
        counts = g.insert_after(out, count_above, out, g.analysis.prefix_tokens, step.params.threshold,
                                label="tokens kept per image")
        padded = g.insert_after(counts, zero_after, out, counts, label="padding after the kept tokens")
        g.replace_uses(out, padded, keep=(counts, padded))
        g.record_token_count(block, counts)


@pytest.fixture
def gate():
    registry.register_pass("toy-gate")(ToyGate)
    yield
    registry._REGISTRY.pop("toy-gate")


def model():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=10,
                             embed_dim=32, num_heads=2).eval()


def test_token_count_reads_and_compares():
    fixed, vary = TokenCount.fixed(197), TokenCount(197, 98.4)
    assert str(fixed) == "197" and str(vary) == "≤ 197, ≈ 98 expected"
    assert fixed == 197 and vary != 197 and vary != 98
    assert not fixed.varies and vary.varies
    assert fixed.minus(13) == 184 and vary.minus(13) == TokenCount(184, 85.4)
    assert vary < 198 and not vary < 197 and vary <= 197
    assert fixed.to_json() == 197 and vary.to_json() == {"max": 197, "expected": 98.4}
    with pytest.raises(ValueError, match="expected <= max"):
        TokenCount(10, 11)


def test_varying_count_is_planned_and_later_merges_cap_by_the_maximum(gate):
    m = model()
    a = analyse(m, torch.randn(2, 3, 32, 32))
    recipe = load_recipe({"version": 1, "rules": [{"pass": "toy-gate", "layers": 0, "keep": 0.5},
                                                  {"pass": "tome", "layers": "1-2", "r": 3}]})
    plan = make_plan(recipe, a)
    # 16 patches + cls: at most all 17 stay, about 1 + 0.5 * 16 = 9 expected
    assert [lp.tokens_out for lp in plan.layers] == [TokenCount(17, 9.0), TokenCount(14, 6.0), TokenCount(11, 3.0)]
    assert [str(lp.tokens_in) for lp in plan.layers] == ["17", "≤ 17, ≈ 9 expected", "≤ 14, ≈ 6 expected"]


def test_report_gives_the_mean_measured_on_the_example_batch(gate):
    m = model()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # by hand: the output of block 1 of the original model, counted per image
    with torch.no_grad():
        h = m.blocks[:2](m.norm_pre(m._pos_embed(m.patch_embed(x))))
    threshold = h[:, 1:].norm(dim=-1).quantile(0.6).item()   # splits the tokens, differently per image
    want = count_above(h, 1, threshold).float().mean().item()
    assert 1 < want < 17
    recipe = {"version": 1, "rules": [{"pass": "toy-gate", "layers": 1, "keep": 0.5, "threshold": threshold}]}
    fast = tokenopt.optimize(m, recipe, example_input=x)
    rows = record_of(fast).report.rows
    assert rows[1].measured_out == pytest.approx(want)
    assert rows[0].measured_out is None and rows[2].measured_out is None
    assert f"(measured {want:.1f})" in str(record_of(fast).report)
    # manifests keep a varying count as {max, expected} and read it back
    d = record_of(fast).report.to_dict()["rows"][1]
    assert d["tokens_out"] == {"max": 17, "expected": 9.0} and d["tokens_in"] == 17
    assert LayerRow(**d).tokens_out == TokenCount(17, 9.0)


def test_layer_plan_takes_ints_as_fixed_counts():
    lp = LayerPlan(0, "blocks.0", 197, 184)
    assert lp.tokens_in == TokenCount.fixed(197) and lp.tokens_out == 184
