"""Dense outputs: the token index map puts every merged token back at its original positions."""
import pytest
import timm
import torch

import tokenopt
from reference_tome import tome_reference, unit_gain_model
from tokenopt.ops import native
from tokenopt.record import record_of

SMALL = dict(img_size=64, patch_size=8, depth=3, num_classes=10, embed_dim=96, num_heads=4)


def _model(name):
    torch.manual_seed(0)
    return timm.create_model(name, **SMALL).eval()


def _recipe(r, outputs="logits"):
    return {"version": 1, "outputs": outputs, "rules": [{"pass": "tome", "r": r}]}


def test_tokens_without_merging_equal_the_features():
    m = _model("vit_small_patch16_224")
    x = torch.randn(2, 3, 64, 64)
    fast = tokenopt.optimize(m, _recipe(0, "tokens"), report=False)
    with torch.no_grad():
        assert torch.equal(fast(x), m.forward_features(x)[:, 1:])


def test_unmerged_tokens_cover_the_grid():
    m = _model("vit_small_patch16_224")
    x = torch.randn(2, 3, 64, 64)
    fast = tokenopt.optimize(m, _recipe(8, "tokens"), report=False)
    with torch.no_grad():
        out = fast(x)
    assert out.shape == (2, 64, 96)
    kept = record_of(fast).plan.layers[-1].tokens_out - 1        # non-prefix tokens after 3 merges
    assert kept == 64 - 24
    for img in out:
        assert len(torch.unique(img, dim=0)) == kept


def test_unmerge_agrees_with_size_weighted_pooling():
    """Averaging the unmerged grid counts each merged token once per patch it stands for: exactly
    the size-weighted average pooling the logits path uses."""
    m = _model("vit_medium_patch16_reg4_gap_256")
    x = torch.randn(2, 3, 64, 64)
    logits = tokenopt.optimize(m, _recipe(8), report=False)
    tokens = tokenopt.optimize(m, _recipe(8, "tokens"), report=False)
    with torch.no_grad():
        via_tokens = m.head(m.fc_norm(tokens(x).mean(1)))
        assert torch.allclose(via_tokens, logits(x), atol=1e-5)


@pytest.mark.parametrize("name,kw,order", [
    ("vit_small_patch16_224", {}, "original"),                        # cls token
    ("deit_small_distilled_patch16_224", {}, "original"),             # a prefix token in B
    ("vit_small_patch16_224", dict(class_token=False, global_pool="avg"), "rank"),   # none, rank order
], ids=["cls", "distilled", "no-prefix-rank"])
def test_tokens_land_where_the_reference_puts_them(name, kw, order):
    """Position by position: every original patch holds the token that stands for it in the
    per-image reference (which tracks each token's original positions in plain lists), on the
    native step and on the PyTorch operators."""
    m = unit_gain_model(name, **{**SMALL, **kw})
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    rs = [12, 8, 4]
    recipe = {"version": 1, "outputs": "tokens", "rules": [{"pass": "tome", "r": rs, "order": order}]}
    fast = tokenopt.optimize(m, recipe, report=False)
    want = tome_reference(m, x, rs, order=order, outputs="tokens")
    assert want.shape == (2, 64, 96)
    with torch.no_grad():
        got = fast(x)
        with native.disabled():
            got_pytorch = fast(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_pytorch, want, rtol=0, atol=1e-5)
    for img in want:                       # the merges happened: 24 tokens stand for 2+ patches
        assert len(torch.unique(img, dim=0)) == 64 - sum(rs)
