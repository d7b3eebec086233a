"""ToMe pass vs a reference written from the paper's definition (tests/reference_tome.py)."""
import pytest
import torch

import tokenopt
from reference_tome import tome_reference, unit_gain_model
from tokenopt.ops import native
from tokenopt.passes.tome import expand_r
from tokenopt.record import record_of

TINY = dict(img_size=64, patch_size=8, depth=4, num_classes=10, embed_dim=96, num_heads=4)  # 64 patch tokens


def _model(name, **kw):
    return unit_gain_model(name, **{**TINY, **kw})


@pytest.fixture(params=["native", "pytorch"])
def step_path(request):
    """Both implementations of the ToMe step (native C for eager CPU inference, PyTorch operators)."""
    if request.param == "native":
        if native.status().startswith("off"):
            pytest.skip(f"native step {native.status()}")
        yield
    else:
        with native.disabled():
            yield


def _recipe(r, prop_attn=True, **options):
    return {"version": 1, "rules": [{"pass": "tome", "layers": "all", "r": r, "prop_attn": prop_attn, **options}]}


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_small_distilled_patch16_224",
                                  "vit_medium_patch16_reg4_gap_256", "deit3_small_patch16_224"])
@pytest.mark.parametrize("r", [6, [10, 8, 4, 2], {"start": 12, "end": 3}])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_matches_reference(name, r, prop_attn, step_path):
    model = _model(name)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fast = tokenopt.optimize(model, _recipe(r, prop_attn), report=False)
    rs = expand_r(r if not isinstance(r, dict) else type("S", (), r)(), 4, "test")
    with torch.no_grad():
        got = fast(x)
    want = tome_reference(model, x, rs, prop_attn)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5
    # and ToMe really changed the result (the test would be vacuous otherwise)
    with torch.no_grad():
        assert (got - model(x)).abs().max().item() > 1e-3
    assert [l.tokens_out for l in record_of(fast).plan.layers][-1] < 64


def test_decreasing_schedule_values():
    class S:
        start, end = 12, 3
    assert expand_r(S(), 4, "t") == [12, 9, 6, 3]
    assert expand_r(5, 3, "t") == [5, 5, 5]


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_small_distilled_patch16_224",
                                  "vit_medium_patch16_reg4_gap_256"])
def test_r_zero_is_bit_identical(name):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    fast = tokenopt.optimize(model, _recipe(0), report=False)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


@pytest.mark.parametrize("prop_attn", [True, False])
def test_matches_reference_without_prefix_tokens(prop_attn, step_path):
    # no cls token, average pooling: nothing is protected and pooling is size-weighted
    model = _model("vit_small_patch16_224", class_token=False, global_pool="avg")
    assert model.num_prefix_tokens == 0
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    fast = tokenopt.optimize(model, _recipe(8, prop_attn), report=False)
    with torch.no_grad():
        got = fast(x)
        assert (got - model(x)).abs().max().item() > 1e-3
    assert (got - tome_reference(model, x, [8] * 4, prop_attn)).abs().max().item() < 1e-5


def _diff(a, b):
    return (a - b).abs().max().item()


def test_rank_order_matches_the_reference_without_prefix_tokens():
    """``order: rank`` reproduces the reference implementation on a model without prefix tokens,
    where it leaves unmerged tokens in rank order; what differs is shown: the order decides the
    next layer's A/B split, and tokenopt weights average pooling by size on purpose. (No
    step_path: the native step writes only the original order, so both paths run PyTorch.)"""
    model = _model("vit_small_patch16_224", class_token=False, global_pool="avg")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    fast = tokenopt.optimize(model, _recipe(8, order="rank"), report=False)
    with torch.no_grad():
        got = fast(x)
    assert _diff(got, tome_reference(model, x, [8] * 4, order="rank")) < 1e-5
    assert _diff(got, tome_reference(model, x, [8] * 4, order="original")) > 1e-3
    assert _diff(got, tome_reference(model, x, [8] * 4, order="rank", pool="plain")) > 1e-3


def test_rank_order_with_prefix_tokens():
    """With prefix tokens (here one in A and one in B), rank order keeps them in front in their
    original order (the reference sorts such models back to the original order, tokenopt's default)."""
    model = _model("deit_small_distilled_patch16_224", depth=3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    fast = tokenopt.optimize(model, _recipe([12, 8, 4], order="rank"), report=False)
    with torch.no_grad():
        got = fast(x)
    assert _diff(got, tome_reference(model, x, [12, 8, 4], order="rank")) < 1e-5
    assert _diff(got, tome_reference(model, x, [12, 8, 4], order="original")) > 1e-3


def test_tofu_takes_the_order_too():
    """ToFu shares the matching, so ``order`` must reach its step too (not be accepted and ignored)."""
    model = _model("vit_small_patch16_224", class_token=False, global_pool="avg", depth=2)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    outs = {}
    for order in ("original", "rank"):
        recipe = {"version": 1, "rules": [{"pass": "tofu", "r": 8, "op": "mlerp", "order": order}]}
        fast = tokenopt.optimize(model, recipe, report=False)
        with torch.no_grad():
            outs[order] = fast(x)
    assert _diff(outs["original"], outs["rank"]) > 1e-3


def test_unknown_order_is_an_error():
    from tokenopt.ops.matching import bipartite_match
    with pytest.raises(ValueError, match="order must be one of"):
        bipartite_match(torch.randn(1, 9, 4), 2, 1, order="sorted")
