"""feature_maps: a stage's dense map read out of a model, rewritten or not, equals what the model
itself computes there; probe: per-patch F1 against a hand count, and a probe that finds a
separable answer."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

import tokenopt
from tokenopt.errors import PlanError
from tokenopt.feature_maps import block_map, patch_map, stream_map
from tokenopt.probe import f1_counts, f1_score, fit_linear_probe

from test_windows import X, spa, tiny_swin, tome


def _hooked(module, submodule, x):
    """What ``submodule`` returns when ``module`` runs on ``x`` (a forward hook on the unrewritten model)."""
    seen = {}
    handle = submodule.register_forward_hook(lambda mod, args, out: seen.setdefault("out", out))
    try:
        with torch.no_grad():
            module(x)
    finally:
        handle.remove()
    return seen["out"]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_swin_stage_map_is_the_stage_timm_runs(capture):
    m = tiny_swin()
    want = _hooked(m, m.layers[1], X)                       # timm's forward_features path: stage 2's output
    assert want.shape == (2, 8, 8, 64)
    assert torch.equal(stream_map(m, X, 1), want)           # the unrewritten model, captured here
    gm = tokenopt.optimize(m, spa("stage2", threshold=0.0, min_keep=1.0, mode="bypass"), X, report=False,
                           capture=capture)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = stream_map(gm, X, 1)                          # keep-all SPA: the original's map
        assert (got - want).abs().max() <= 1e-5
        assert torch.equal(stream_map(gm, X, 0), block_map(gm, X, 1))   # stream 0's last block is block 1
        assert (stream_map(gm, X, 0) - _hooked(m, m.layers[0], X)).abs().max() <= 1e-5


def test_a_reduced_swin_map_stays_whole_and_differs():
    m = tiny_swin()
    want = _hooked(m, m.layers[1], X)
    for recipe in (spa("stage2", threshold=0.5, min_keep=0.25, gate={"hidden": 0, "noise": 0.0}, mode="bypass"),
                   tome(2, layers="stage2")):
        gm = tokenopt.optimize(m, recipe, X, report=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = stream_map(gm, X, 1)
        assert got.shape == want.shape
        assert (got - want).abs().max() > 1e-3, recipe    # tokens skipped or merged: not the original's map


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=3, num_heads=2, num_classes=10).eval()


def test_a_plain_vit_block_map_drops_the_class_token_and_refuses_merged_tokens():
    m = _vit()
    x = torch.randn(3, 3, 32, 32)
    want = _hooked(m, m.blocks[1], x)[:, 1:].reshape(3, 4, 4, 32)
    assert torch.equal(block_map(m, x, 1), want)
    gm = tokenopt.optimize(m, tome(2), x[:2], report=False)
    with pytest.raises(PlanError, match=r"block 1 \(blocks.1\) gives 12 patch tokens, not one per patch of its 4x4 "
                                        r"grid .*outputs: tokens"):
        block_map(gm, x, 1)
    with pytest.raises(PlanError, match="has 1 token streams"):
        stream_map(m, x, 1)


def test_f1_against_a_hand_count():
    pred = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    target = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    # tp: (0,0), (1,1), (1,2) = 3; fp: (0,1) = 1; fn: (0,3), (1,3) = 2
    assert f1_counts(pred, target) == (3, 1, 2)
    assert f1_score(pred, target) == pytest.approx(6 / 9)
    assert f1_score(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)) == 0.0
    assert f1_score(target, target) == 1.0


def test_the_probe_finds_a_separable_answer_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(40, 2, 2, 8, generator=g) * 3 + 5
    labels = (maps[..., 3] > 5).reshape(40, 4)               # one channel says it
    probe = fit_linear_probe(maps[:30], labels[:30], steps=300)
    assert f1_score(probe.predict(maps[30:]), labels[30:]) > 0.9
    again = fit_linear_probe(maps[:30], labels[:30], steps=300)
    assert torch.equal(probe.weight, again.weight)
    assert int(probe.weight.abs().argmax()) == 3


@pytest.mark.filterwarnings("ignore:SPA gates of layer")    # untrained gates: their state is what is tested
def test_a_plain_vit_patch_map_is_its_features_and_carries_the_rewritten_state():
    m = _vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = m.forward_features(x)[:, 1:].reshape(3, 4, 4, 32)     # after the final norm, class token dropped
    assert (patch_map(m, x) - want).abs().max() <= 1e-5
    merged = tokenopt.optimize(m, tome(2), x[:2], report=False)
    got = patch_map(merged, x, base=m)
    assert got.shape == want.shape and (got - want).abs().max() > 1e-3   # merged tokens put back: one per patch
    with torch.no_grad():
        direct = tokenopt.optimize(m, tome(2), x[:2], report=False, outputs="tokens")(x).reshape(3, 4, 4, 32)
    assert torch.equal(got, direct)
    # SPA gates that keep every token only through the state the rebuilt graph loads: a threshold of 0
    gm = tokenopt.optimize(m, spa("1-2", threshold=0.9, min_keep=1, gate={"hidden": 0, "noise": 0.0},
                                  mode="bypass"), x[:2], report=False)
    assert (patch_map(gm, x, base=m) - want).abs().max() > 1e-3
    for name, buf in gm.named_buffers():
        if name.endswith("threshold"):
            buf.fill_(0.0)
    assert (patch_map(gm, x, base=m) - want).abs().max() <= 1e-5
    with pytest.raises(PlanError, match="give base="):
        patch_map(gm, x)
