"""ToMe pass vs a reference written from the paper's definition (tests/reference_tome.py)."""
import pytest
import timm
import torch

import tokenopt
from reference_tome import tome_reference
from tokenopt.ops import native
from tokenopt.passes.tome import expand_r

TINY = dict(img_size=64, patch_size=8, depth=4, num_classes=10, embed_dim=96, num_heads=4)  # 64 patch tokens


def _model(name, **kw):
    """A tiny timm model with weights at unit gain: timm's 0.02-std init makes blocks near-identity,
    under which merging barely changes the output and a parity test would prove little."""
    torch.manual_seed(0)
    model = timm.create_model(name, **{**TINY, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            elif p.dim() == 1 or p.dim() == 0:
                p.add_(torch.randn_like(p) * 0.1)
    return model


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


def _recipe(r, prop_attn=True):
    return {"version": 1, "rules": [{"pass": "tome", "layers": "all", "r": r, "prop_attn": prop_attn}]}


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
    assert [l.tokens_out for l in fast.tokenopt_plan.layers][-1] < 64


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
