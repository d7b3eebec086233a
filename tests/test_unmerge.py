"""Dense outputs: the token index map puts every merged token back at its original positions."""
import timm
import torch

import tokenopt

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
    kept = fast.tokenopt_plan.layers[-1].tokens_out - 1        # non-prefix tokens after 3 merges
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
