"""DiT and PixArt (diffusers transformers with adaLN): their analysis, ratio 0 exact, op-level ToMe
and ToFu against a reference that merges around each diffusers module with hooks (tomesd's way),
and stream-level ToMe (merge early, unmerge at the end) keeping the output's shape."""
from __future__ import annotations

import copy
import operator

import pytest
import torch

from tokenopt.analysis import analyse
from tokenopt.analysis.nodes import is_layer_norm
from tokenopt.ops import grid_merge
from tokenopt.passes.op_level import op_input
from tokenopt.pipeline import apply_plan
from tokenopt.plan import make_plan
from tokenopt.recipe import load_recipe
from tokenopt.rewrite.rewriter import GraphRewriter

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2, sample_size=16,
                patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8)
TINY_PIXART = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                   sample_size=16, patch_size=2, cross_attention_dim=32, caption_channels=24, norm_num_groups=8)


def _load(tmp_path_factory, cls_name, config):
    diffusers = pytest.importorskip("diffusers")
    from tokenopt.sources import load_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(cls_name)
    model = getattr(diffusers, cls_name)(**config)
    with torch.no_grad():     # adaLN-zero starts with zero gates: give them weights so every branch counts
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    model, _ = load_model(f"diffusers:{folder}")
    return model, analyse(model)


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return _load(tmp_path_factory, "DiTTransformer2DModel", TINY_DIT)


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    return _load(tmp_path_factory, "PixArtTransformer2DModel", TINY_PIXART)


def recipe(*rules, **top):
    return load_recipe({"version": 1, **top, "rules": list(rules)})


def output(analysis, model_or_gm):
    with torch.no_grad():
        return analysis.example.call(model_or_gm).sample


def hooked(model, ratio, rule="merge", modules=("attn1",), sx=2, sy=2):
    """The reference: each diffusers block matches its input tokens on the 8x8 grid; each named
    module (attn1, attn2, ff) of it reads merged tokens and gives back unmerged ones (tomesd's
    placement, with forward hooks instead of the graph rewrite)."""
    model = copy.deepcopy(model)
    for block in model.transformer_blocks:
        state = {}

        def match(mod, args, kwargs, state=state):
            h = args[0] if args else kwargs["hidden_states"]
            state["m"] = grid_merge.grid_matching(h, (8, 8), sx, sy, int(h.shape[1] * ratio))

        block.register_forward_pre_hook(match, with_kwargs=True)
        for name in modules:
            sub = getattr(block, name)
            sub.register_forward_pre_hook(
                lambda mod, args, kwargs, state=state: ((grid_merge.merge_tokens(args[0], state["m"], rule),
                                                         *args[1:]), kwargs), with_kwargs=True)
            sub.register_forward_hook(lambda mod, args, out, state=state: grid_merge.unmerge_tokens(state["m"], out))
    return model


# ------------------------------------------------------------------------------------------ analysis

def test_dit_blocks_and_their_adaln_modulation(dit):
    model, a = dit
    assert [b.tokens for b in a.blocks] == [64, 64] and [s.grid for s in a.streams] == [(8, 8)]
    for b in a.blocks:
        assert [br.kind for br in b.branches] == ["self_attention", "mlp"]
    # the op reads norm(x) * (1 + scale) + shift: the merge goes after the shift, as tomesd's does
    g = GraphRewriter(a)
    for b in a.blocks:
        for br in b.branches:
            shift = op_input(g, b, br)
            assert shift.target is operator.add
            scale = next(x for x in shift.args if getattr(x, "target", None) is operator.mul)
            assert any(is_layer_norm(x, g.gm) for x in scale.args)


def test_pixart_cross_attends_to_the_caption_states(pixart):
    model, a = pixart
    assert [b.tokens for b in a.blocks] == [64, 64]
    g = GraphRewriter(a)
    for b in a.blocks:
        assert [br.kind for br in b.branches] == ["self_attention", "cross_attention", "mlp"]
        cross = b.branches[1]
        assert cross.core.kv_source == "encoder_hidden_states"
        # PixArt applies no norm before its cross-attention: the op reads the stream as it is
        assert op_input(g, b, cross) is g.node(cross.entry)


# ------------------------------------------------------------------------------------------ r = 0

@pytest.mark.parametrize("which", ["dit", "pixart"])
def test_ratio_zero_is_the_original_exactly(which, request):
    model, a = request.getfixturevalue(which)
    original = output(a, model)
    for rule in ({"pass": "tome", "placement": "op", "ratio": 0.0, "merge_crossattn": True, "merge_mlp": True},
                 {"pass": "tofu", "placement": "op", "ratio": 0.0, "op": "mlerp", "merge_mlp": True},
                 {"pass": "tome", "r": 0}):
        assert torch.equal(output(a, apply_plan(a, make_plan(recipe(rule), a))), original), rule


# ------------------------------------------------------------------------------------------ op-level

@pytest.mark.parametrize("which,flags,modules", [
    ("dit", {}, ("attn1",)),
    ("dit", {"merge_mlp": True}, ("attn1", "ff")),
    ("pixart", {}, ("attn1",)),
    ("pixart", {"merge_crossattn": True, "merge_mlp": True}, ("attn1", "attn2", "ff")),
])
@pytest.mark.parametrize("pass_,rule", [("tome", "merge"), ("tofu", "mlerp"), ("tofu", "prune")])
def test_op_level_equals_merging_around_each_module(which, flags, modules, pass_, rule, request):
    model, a = request.getfixturevalue(which)
    extra = {} if pass_ == "tome" else {"op": rule}
    plan = make_plan(recipe({"pass": pass_, "placement": "op", "ratio": 0.5, **flags, **extra}), a)
    assert [lp.step.params.r for lp in plan.layers] == [32, 32]
    got = output(a, apply_plan(a, plan))
    want = output(a, hooked(model, 0.5, rule, modules))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - output(a, model)).abs().max() > 1e-3          # it did merge


# ------------------------------------------------------------------------------------------ stream-level

def test_stream_level_tome_on_a_dit_merges_early_and_unmerges_at_the_end(dit):
    model, a = dit
    original = output(a, model)
    plan = make_plan(recipe({"pass": "tome", "layers": [0], "r": 16}, outputs="tokens"), a)
    assert [lp.step.describe if lp.step else None for lp in plan.layers] == ["merge r=16", None]
    assert [lp.step.tokens_out.max for lp in plan.layers if lp.step] == [48]
    gm = apply_plan(a, plan)
    with torch.no_grad():
        out = a.example.call(gm)
    assert type(out).__name__ == "Transformer2DModelOutput"
    assert out.sample.shape == original.shape == (2, 4, 16, 16)
    assert (out.sample - original).abs().max() > 1e-3


def test_shipped_tome_dit_merges_around_attention_and_feed_forward(dit):
    from tokenopt.paths import SHIPPED_RECIPES

    model, a = dit
    plan = make_plan(load_recipe(SHIPPED_RECIPES / "tome-dit.yaml"), a)
    assert [lp.step.describe for lp in plan.layers] == ["op-level merge r=32 around attn/mlp"] * 2
    torch.testing.assert_close(output(a, apply_plan(a, plan)), output(a, hooked(model, 0.5, "merge", ("attn1", "ff"))),
                               rtol=0, atol=1e-5)
