"""The analysis and the ToMe pass on the models tokenopt must handle (tiny configurations)."""
import pytest
import timm
import torch

import tokenopt
from tokenopt.analysis import analyse
from tokenopt.errors import AnalysisError, RecipeError
from tokenopt.record import record_of
from reference_tome import tome_reference, unit_gain_model
from vit_models import ExplicitViT, MHAViT, SmallCNN

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=10)


def timm_model(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, **kw}).eval()


def tome(r, layers="all"):
    return {"version": 1, "rules": [{"pass": "tome", "layers": layers, "r": r}]}


@pytest.mark.parametrize("name,prefix,pooling", [
    ("vit_small_patch16_224", 1, ["cls"]),
    ("deit_small_distilled_patch16_224", 2, ["cls", "cls"]),
    ("deit3_small_patch16_224", 1, ["cls"]),
    ("vit_medium_patch16_reg4_gap_256", 4, ["avg"]),
])
def test_timm_vits_are_found(name, prefix, pooling):
    a = analyse(timm_model(name))
    assert [b.path for b in a.blocks] == ["blocks.0", "blocks.1"]
    assert all(b.refusal is None and b.attention.kind == "sdpa" for b in a.blocks)
    assert a.prefix_tokens == prefix
    assert [p.kind for p in a.pooling] == pooling
    assert a.blocks[0].tokens == 16 + prefix


def test_layerscale_is_preserved():
    """deit3's LayerScale sits on both residual branches; with r=0 nothing changes, with r>0 the
    merged model equals the per-image reference, which applies ls1 before the merge and ls2 after."""
    m = timm_model("deit3_small_patch16_224")
    with torch.no_grad():
        m.blocks[0].ls1.gamma.fill_(3.0)
    x = torch.randn(2, 3, 32, 32)
    fast = tokenopt.optimize(m, tome(0), report=False)
    with torch.no_grad():
        assert torch.equal(fast(x), m(x))

    m = unit_gain_model("deit3_small_patch16_224", **SMALL)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():        # per-channel scales far from 1 (and from deit3's 1e-6 init)
        for blk in m.blocks:
            for ls in (blk.ls1, blk.ls2):
                ls.gamma.copy_(torch.empty(ls.gamma.shape).uniform_(0.3, 3.0, generator=g))
    fast = tokenopt.optimize(m, tome(4), report=False)
    with torch.no_grad():
        got = fast(x)
    assert [lp.tokens_out for lp in record_of(fast).plan.layers] == [13, 9]
    assert (got - tome_reference(m, x, [4, 4])).abs().max().item() < 1e-5


@pytest.mark.parametrize("name,kw,reason", [
    ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=14), "RoPE"),
    ("beit_base_patch16_224", dict(embed_dim=64, num_heads=2), "relative-position bias"),
])
def test_position_tied_blocks_are_refused(name, kw, reason):
    m = timm_model(name, **kw)
    a = analyse(m)
    assert len(a.blocks) == 2 and all(reason in b.refusal for b in a.blocks)
    with pytest.raises(RecipeError, match=reason) as e:
        tokenopt.optimize(m, tome(1), report=False)
    assert str(e.value).endswith("None of tokenopt's passes (spa, tofu, tome, tosa) can reduce these blocks yet, "
                                 "for the reason above; no block of this model can be reduced.")


def test_swin_is_merged_in_windows_and_refused_by_passes_that_do_not_know_windows():
    m = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1, 1, 1), embed_dim=32,
                          num_heads=(1, 2, 2, 2), num_classes=10).eval()
    a = analyse(m)
    assert a.blocks and all(b.window is not None and "window" in b.refusal for b in a.blocks)
    recipe = {"version": 1, "rules": [{"pass": "tosa", "layers": "1-3", "keep": 0.5}]}
    with pytest.raises(RecipeError, match="window") as e:
        tokenopt.optimize(m, recipe, report=False)
    # one reason, counted once, and the passes that do take these blocks (inside windows: ToMe, ToFu, SPA)
    msg = str(e.value)
    assert msg.count("windowed attention (as in Swin)") == 1 and "(3 selected): 3 blocks" in msg
    assert "Use spa or tofu or tome for these blocks" in msg
    # ToMe: 14x14 at 56 px is padded to windows of 7 only where the grid does not tile: those blocks are refused
    gm = tokenopt.optimize(m, tome(2), report=False)
    x = torch.randn(1, 3, 56, 56)
    assert gm(x).shape == (1, 10)


@pytest.mark.parametrize("cls,kind,prefix,pool", [(ExplicitViT, "softmax", 1, "cls"), (MHAViT, "mha", 0, "avg")])
def test_user_written_vits(cls, kind, prefix, pool):
    torch.manual_seed(0)
    m = cls().eval()
    a = analyse(m)
    assert len(a.blocks) == 3 and all(b.attention.kind == kind and b.refusal is None for b in a.blocks)
    assert a.prefix_tokens == prefix and [p.kind for p in a.pooling] == [pool]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tokenopt.optimize(m, tome(0), report=False)(x), m(x))
    fast = tokenopt.optimize(m, tome(3), report=True)
    assert [l.tokens_out for l in record_of(fast).report.rows] == [16 + prefix - 3 * i for i in (1, 2, 3)]
    assert record_of(fast).report.flops_after < record_of(fast).report.flops_before
    with torch.no_grad():
        assert fast(x).shape == (2, 10)


def test_no_blocks_is_an_analysis_error():
    with pytest.raises(AnalysisError, match="no transformer blocks"):
        analyse(SmallCNN(), torch.randn(1, 3, 32, 32))


def test_report_counts_fused_attention():
    """The report's FLOPs include SDPA: the original ViT-S is about 4.6 GFLOPs."""
    m = timm.create_model("vit_small_patch16_224").eval()
    fast = tokenopt.optimize(m, tome(13))
    rep = record_of(fast).report
    assert 4.5e9 < rep.flops_before < 4.7e9
    assert [r.tokens_out for r in rep.rows][-1] == 197 - 13 * 12
    assert 1.6 < rep.flops_ratio < 1.8


@pytest.mark.parametrize("model", [
    lambda: timm_model("vit_small_patch16_224"), lambda: ExplicitViT().eval(), lambda: MHAViT().eval()])
def test_dynamo_sees_one_graph(model):
    fast = tokenopt.optimize(model(), tome(3), report=False)
    with torch.no_grad():
        e = torch._dynamo.explain(fast)(torch.randn(2, 3, 32, 32))
    assert e.graph_count == 1 and e.graph_break_count == 0


@pytest.mark.slow   # > 10 s on 2 cores: CI runs it with -m slow
def test_compiled_matches_eager():
    from tokenopt.ops import native
    fast = tokenopt.optimize(timm_model("vit_small_patch16_224"), tome(3), report=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        compiled = torch.compile(fast)(x)
        with native.disabled():        # the definition: PyTorch operators, eager
            assert torch.allclose(compiled, fast(x), atol=1e-4)


def test_compiled_inference_calls_the_native_step_and_training_does_not():
    from tokenopt.ops import native
    if native.status().startswith("off"):
        pytest.skip(f"native step {native.status()}")
    fast = tokenopt.optimize(timm_model("vit_small_patch16_224"), tome(3), report=False)

    def our_ops(explained):
        return [str(n.target) for g in explained.graphs for n in g.graph.nodes if str(n.target).startswith("tokenopt.")]
    with torch.no_grad():
        inference = our_ops(torch._dynamo.explain(fast)(torch.randn(2, 3, 32, 32)))
    assert inference == ["tokenopt.bipartite_reduce.default"] * len(record_of(fast).plan.layers)
    training = our_ops(torch._dynamo.explain(fast)(torch.randn(2, 3, 32, 32)))
    assert training == []   # autograd needs the operators


def test_cait_reduces_patch_blocks_and_keeps_class_attention():
    """CaiT: talking-heads attention (explicit softmax with head mixing) is matched; the class-attention
    block is left alone but keeps working on the restored grid."""
    m = timm_model("cait_xxs24_224", depth_token_only=1)
    a = analyse(m)
    assert [b.attention.kind for b in a.blocks] == ["softmax", "softmax", "sdpa"]
    assert a.blocks[2].refusal.startswith("class attention") and not a.blocks[2].grid_bound
    assert a.prefix_tokens == 0                      # the class token joins after the patch blocks
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tokenopt.optimize(m, tome(0), report=False)(x), m(x))
        fast = tokenopt.optimize(m, tome(2, layers="0-1"))
        assert fast(x).shape == (2, 10)
    assert [r.tokens_out for r in record_of(fast).report.rows][:2] == [14, 12]


def test_xcit_is_refused_with_reason():
    m = timm.create_model("xcit_nano_12_p16_224", img_size=32, depth=2, num_classes=10).eval()
    a = analyse(m)
    assert "cross-covariance" in a.blocks[0].refusal and a.blocks[0].grid_bound
    with pytest.raises(RecipeError, match="cross-covariance"):
        tokenopt.optimize(m, tome(1), report=False)


def test_attention_pool_head_reads_the_restored_grid():
    m = timm_model("vit_small_patch16_224", global_pool="map")
    fast = tokenopt.optimize(m, tome(2))
    assert record_of(fast).report.flops_after < record_of(fast).report.flops_before
    with torch.no_grad():
        assert fast(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_hidden_grid_dependency_fails_once_with_the_place_named(tmp_path):
    # GridConvViT reshapes its tokens to 4 x 4 after block 0; merging in block 0 cannot run
    from typer.testing import CliRunner

    from tokenopt.cli import app
    from tokenopt.errors import PlanError
    from vit_models import GridConvViT

    recipe = {"version": 1, "rules": [{"pass": "tome", "r": 2}]}
    with pytest.raises(PlanError, match=r"fails on the example batch at reshape.*\n.*Leave its blocks out"):
        tokenopt.optimize(GridConvViT().eval(), recipe)
    later = {"version": 1, "rules": [{"pass": "tome", "layers": "1-2", "r": 2}]}   # after the grid: fine
    assert [lp.tokens_out for lp in record_of(tokenopt.optimize(GridConvViT().eval(), later)).plan.layers] == [17, 15, 13]
    (tmp_path / "r.yaml").write_text("version: 1\nrules:\n  - pass: tome\n    r: 2\n")
    out = tmp_path / "out.pt"
    res = CliRunner().invoke(app, ["apply", str(tmp_path / "r.yaml"), "vit_models:grid_conv_vit", "-o", str(out)])
    assert res.exit_code == 2 and "fails on the example batch" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_example_input_falls_back_when_the_config_size_does_not_run():
    # timm keeps pretrained_cfg at 224 for a LeViT built at 64 px; the 224 batch cannot run
    from tokenopt.analysis import example_input_for

    model = timm.create_model("levit_128s", pretrained=False, img_size=64).eval()
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert tuple(example_input_for(model).shape) == (2, 3, 64, 64)
