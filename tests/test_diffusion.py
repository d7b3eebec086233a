"""Diffusion denoisers: the diffusers:DIR source, the UNet's analysis, and op-level merging (tomesd's
placement) against a plain per-image reference and against tomesd itself."""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from tokenopt.analysis import Example, analyse, example_input_for
from tokenopt.cli import app
from tokenopt.errors import RecipeError
from tokenopt.ops import grid_merge
from tokenopt.pipeline import apply_plan
from tokenopt.plan import make_plan
from tokenopt.recipe import load_recipe

runner = CliRunner()

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=8)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def unet_dir(diffusers, tmp_path_factory):
    """A random-init SD-shaped tiny UNet: two resolutions of spatial transformers, cross-attention to text."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unet")
    diffusers.UNet2DConditionModel(**TINY_UNET).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def unet(unet_dir):
    from tokenopt.sources import load_model

    model, _ = load_model(f"diffusers:{unet_dir}")
    return model


@pytest.fixture(scope="module")
def unet_analysis(unet):
    return analyse(unet)


def op_recipe(**options):
    return load_recipe({"version": 1, "rules": [{"pass": "tome", "placement": "op", **options}]})


def optimized(analysis, **options):
    return apply_plan(analysis, make_plan(op_recipe(**options), analysis))


# ------------------------------------------------------------------------------------------ the op

def reference_merge_op_unmerge(x, n, grid, sx, sy, r, op, rule="merge"):
    """Per image, with Python loops: destinations are the top-left token of each sx x sy cell; each
    other token's best destination by cosine similarity of ``x``; the r best-matched sources are
    reduced into their destination by ``rule`` (merge: the group's mean; mlerp: its mean direction
    at the norm of its largest member; prune: the destination alone); ``op`` runs on the kept tokens
    of ``n``; every position gets the output of the token that stands for it."""
    h, w = grid
    out = []
    for xi, ni in zip(x, n):
        dst = [i * w + j for i in range(0, h, sy) for j in range(0, w, sx)]
        src = [p for p in range(h * w) if p not in dst]
        unit = xi / xi.norm(dim=-1, keepdim=True)
        best = {s: max(dst, key=lambda d: float(unit[s] @ unit[d])) for s in src}
        sim = {s: float(unit[s] @ unit[best[s]]) for s in src}
        merged = sorted(src, key=lambda s: -sim[s])[:r]
        groups = {d: [d] + [s for s in merged if best[s] == d] for d in dst}
        kept = [s for s in src if s not in merged]

        def reduce(d):
            members = ni[groups[d]]
            if rule == "prune":
                return ni[d]
            mean = members.mean(0)
            if rule == "mlerp":
                return mean / mean.norm() * max(float(v.norm()) for v in members)
            return mean

        tokens = torch.stack([ni[s] for s in kept] + [reduce(d) for d in dst])
        y = op(tokens)
        res = torch.empty(h * w, y.shape[-1], dtype=y.dtype)
        for i, s in enumerate(kept):
            res[s] = y[i]
        for j, d in enumerate(dst):
            res[groups[d]] = y[len(kept) + j]
        out.append(res)
    return torch.stack(out)


@pytest.mark.parametrize("grid,sx,sy,r", [((4, 4), 2, 2, 5), ((6, 4), 2, 3, 9), ((4, 6), 3, 2, 0)])
def test_op_equals_the_per_image_reference(grid, sx, sy, r):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, grid[0] * grid[1], 8, generator=gen)
    n = torch.randn(3, grid[0] * grid[1], 8, generator=gen)
    lin = torch.nn.Linear(8, 5)
    m = grid_merge.grid_matching(x, grid, sx, sy, r)
    with torch.no_grad():
        got = grid_merge.unmerge_tokens(m, lin(grid_merge.merge_tokens(n, m)))
        want = reference_merge_op_unmerge(x, n, grid, sx, sy, r, lin)
    assert grid_merge.merge_tokens(n, m).shape == (3, grid[0] * grid[1] - r, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", ["merge", "mlerp", "prune"])
@pytest.mark.parametrize("grid,sx,sy,r", [((4, 4), 2, 2, 7), ((6, 4), 2, 3, 12)])
def test_tofu_rules_equal_the_per_image_reference_in_float64(rule, grid, sx, sy, r):
    """ToFu around an op: the group is pruned or fused by MLERP, the output copied to its positions."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, grid[0] * grid[1], 6, generator=gen, dtype=torch.float64)
    # norms that differ a lot, so MLERP's largest member is not the destination by chance
    n = torch.randn(2, grid[0] * grid[1], 6, generator=gen, dtype=torch.float64) \
        * torch.rand(2, grid[0] * grid[1], 1, generator=gen, dtype=torch.float64) * 4
    lin = torch.nn.Linear(6, 3).double()
    m = grid_merge.grid_matching(x, grid, sx, sy, r)
    with torch.no_grad():
        reduced = grid_merge.merge_tokens(n, m, rule)
        got = grid_merge.unmerge_tokens(m, lin(reduced))
        want = reference_merge_op_unmerge(x, n, grid, sx, sy, r, lin, rule)
    assert reduced.shape == (2, grid[0] * grid[1] - r, 6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the rules differ from each other on these tokens (the test can tell them apart)
    other = {"merge": "mlerp", "mlerp": "prune", "prune": "merge"}[rule]
    assert (grid_merge.merge_tokens(n, m, other) - reduced).abs().max() > 1e-3
    if rule == "mlerp":   # each fused token has its group's largest norm, above the mean's
        means = grid_merge.merge_tokens(n, m, "merge")
        assert (reduced.norm(dim=-1) >= means.norm(dim=-1) - 1e-12).all()


def test_unknown_merge_rule_is_named():
    m = grid_merge.grid_matching(torch.randn(1, 16, 4), (4, 4), 2, 2, 3)
    with pytest.raises(ValueError, match="unknown merge rule 'avg'; expected one of merge, mlerp, prune"):
        grid_merge.merge_tokens(torch.randn(1, 16, 4), m, "avg")


def test_prefix_tokens_are_never_merged_and_use_rand_is_seeded():
    src, dst = grid_merge.destination_positions((4, 4), 2, 2, prefix=1)
    assert dst.tolist() == [0, 1, 3, 9, 11]          # the class token, then each cell's top-left
    assert sorted(src.tolist() + dst.tolist()) == list(range(17))
    a = grid_merge.destination_positions((8, 8), 2, 2, use_rand=True, seed=3)[1]
    assert torch.equal(a, grid_merge.destination_positions((8, 8), 2, 2, use_rand=True, seed=3)[1])
    assert not torch.equal(a, grid_merge.destination_positions((8, 8), 2, 2, use_rand=True, seed=4)[1])
    assert a.numel() == 16 and len({(int(p) // 8 // 2, int(p) % 8 // 2) for p in a}) == 16   # one per cell


# ------------------------------------------------------------------------------------------ source

def test_unet_folder_gives_its_example_and_input_size_overrides_it(unet):
    ex = example_input_for(unet)
    assert isinstance(ex, Example)
    assert [tuple(t.shape) for t in ex.tensors()] == [(2, 4, 16, 16), (2,), (2, 77, 32)]
    assert ex.kwargs.keys() == {"encoder_hidden_states"} and ex.batch_dims == (0, 0, 0)
    small = example_input_for(unet, size=(8, 8))
    assert tuple(small.image.shape) == (2, 4, 8, 8)
    from tokenopt.cli.common import example_input
    assert tuple(example_input(unet, (4, 24, 24)).image.shape) == (2, 4, 24, 24)


def test_inspect_finds_the_unet_transformer_blocks(unet_dir):
    res = run("inspect", f"diffusers:{unet_dir}")
    assert res.exit_code == 0, res.output
    assert "7 transformer block(s), input (2, 4, 16, 16)" in res.output
    for path in ("down_blocks.0.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.0",
                 "up_blocks.1.attentions.1.transformer_blocks.0"):
        assert path in res.output


def test_unet_analysis_branches_and_streams(unet_analysis):
    a = unet_analysis
    assert [b.tokens for b in a.blocks] == [256, 64, 64, 64, 64, 256, 256]
    assert [s.grid for s in a.streams] == [(16, 16), (8, 8), (16, 16)]
    for b in a.blocks:
        assert [br.kind for br in b.branches] == ["self_attention", "cross_attention", "mlp"]
        assert b.branches[1].core.kv_source == "encoder_hidden_states"
        assert b.keeps_tokens and "feature map" in b.keeps_tokens


def test_stream_level_merge_is_refused_on_unet_blocks(unet_analysis):
    rec = load_recipe({"version": 1, "rules": [{"pass": "tome", "r": 4}]})
    with pytest.raises(RecipeError, match="tokens go back to a 16x16 feature map.*use placement: op"):
        make_plan(rec, unet_analysis)


def _write(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))


def test_missing_diffusers_names_the_extra(monkeypatch, tmp_path):
    _write(tmp_path, "config.json", {"_class_name": "UNet2DConditionModel"})
    monkeypatch.setitem(sys.modules, "diffusers", None)   # `import diffusers` now raises ImportError
    res = run("inspect", f"diffusers:{tmp_path}")
    assert res.exit_code == 2, res.output
    assert "needs the Python package 'diffusers', which is not installed" in res.output
    assert "pip install 'tokenopt[diffusion]'" in res.output and "Traceback" not in res.output


def test_unsupported_class_and_pipeline_without_denoiser(tmp_path):
    _write(tmp_path / "vae", "config.json", {"_class_name": "AutoencoderKL"})
    res = run("inspect", f"diffusers:{tmp_path / 'vae'}")
    assert res.exit_code == 2, res.output
    assert "holds a AutoencoderKL, which tokenopt does not support" in res.output
    assert "UNet2DConditionModel, UNet2DModel, DiTTransformer2DModel, PixArtTransformer2DModel" in res.output
    _write(tmp_path, "model_index.json", {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]})
    res = run("inspect", f"diffusers:{tmp_path}")
    assert res.exit_code == 2, res.output
    assert "has neither unet/ nor transformer/" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------ parity

def test_ratio_zero_is_the_original_exactly(unet, unet_analysis):
    ex = unet_analysis.example
    gm = optimized(unet_analysis, ratio=0.0, merge_crossattn=True, merge_mlp=True)
    with torch.no_grad():
        assert torch.equal(ex.call(gm).sample, ex.call(unet).sample)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("flags", [{}, {"merge_crossattn": True}, {"merge_mlp": True},
                                   {"merge_attn": False, "merge_crossattn": True, "merge_mlp": True}])
def test_matches_tomesd(unet, unet_analysis, ratio, flags):
    tomesd = pytest.importorskip("tomesd")
    ex = unet_analysis.example
    gm = optimized(unet_analysis, ratio=ratio, **flags)
    patched = copy.deepcopy(unet)
    tomesd.apply_patch(patched, ratio=ratio, use_rand=False, **flags)
    with torch.no_grad():
        got, want, original = ex.call(gm).sample, ex.call(patched).sample, ex.call(unet).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - original).abs().max() > 1e-3       # it did merge


def test_max_downsample_two_merges_the_lower_resolution_too(unet, unet_analysis):
    tomesd = pytest.importorskip("tomesd")
    ex = unet_analysis.example
    plan = make_plan(op_recipe(ratio=0.5, max_downsample=2), unet_analysis)
    assert [lp.step.params.r for lp in plan.layers] == [128, 32, 32, 32, 32, 128, 128]
    patched = copy.deepcopy(unet)
    tomesd.apply_patch(patched, ratio=0.5, use_rand=False, max_downsample=2)
    with torch.no_grad():
        torch.testing.assert_close(ex.call(apply_plan(unet_analysis, plan)).sample, ex.call(patched).sample,
                                   rtol=0, atol=1e-5)
    left = make_plan(op_recipe(ratio=0.5), unet_analysis)
    assert [lp.step is not None for lp in left.layers] == [True, False, False, False, False, True, True]
    assert "beyond max_downsample=1" in left.skipped[0][1]


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_zero_one(ratio):
    with pytest.raises(RecipeError, match="option 'ratio' = .*: input should be (less than 1|greater than or equal to 0)"):
        op_recipe(ratio=ratio)


def test_sx_sy_that_do_not_tile_the_grid(unet_analysis):
    with pytest.raises(RecipeError, match=r"sx=3, sy=2 do not tile its 16x16 token grid"):
        make_plan(op_recipe(ratio=0.5, sx=3), unet_analysis)


def test_op_keys_need_placement_op_and_r_does_not_go_with_it(unet_analysis):
    with pytest.raises(RecipeError, match="option 'ratio' only goes with placement: op"):
        load_recipe({"version": 1, "rules": [{"pass": "tome", "r": 2, "ratio": 0.5}]})
    with pytest.raises(RecipeError, match="option 'r' does not go with placement: op; give 'ratio'"):
        op_recipe(r=2, ratio=0.5)
    with pytest.raises(RecipeError, match="option 'ratio' is required with placement: op"):
        op_recipe()
    with pytest.raises(RecipeError, match="tofu op: auto does not go with placement: op"):
        make_plan(load_recipe({"version": 1, "rules": [{"pass": "tofu", "placement": "op", "ratio": 0.5,
                                                         "op": "auto"}]}), unet_analysis)


# ------------------------------------------------------------------------------------------ plain ViTs

def test_op_level_on_a_plain_vit_equals_merge_op_unmerge_by_hand():
    """The same placement on a cls-token ViT: the class token is a destination, never merged away."""
    from tests.vit_models import ExplicitViT

    torch.manual_seed(0)
    vit = ExplicitViT().eval()              # 32x32 images, 8x8 patches: a 4x4 grid and a class token
    x = torch.randn(2, 3, 32, 32)
    analysis = analyse(vit, x)
    plan = make_plan(op_recipe(ratio=0.4, merge_mlp=True), analysis)
    assert [lp.step.params.r for lp in plan.layers] == [6, 6, 6]
    gm = apply_plan(analysis, plan)

    def by_hand(img):
        t = vit.embed(img).flatten(2).transpose(1, 2)
        t = torch.cat([vit.cls.expand(t.shape[0], -1, -1), t], dim=1) + vit.pos
        for layer in vit.layers:
            m = grid_merge.grid_matching(t, (4, 4), 2, 2, 6, prefix=1)
            t = t + grid_merge.unmerge_tokens(m, layer.attn(grid_merge.merge_tokens(layer.ln1(t), m)))
            t = t + grid_merge.unmerge_tokens(m, layer.ff(grid_merge.merge_tokens(layer.ln2(t), m)))
        return vit.fc(vit.norm(t)[:, 0])

    with torch.no_grad():
        torch.testing.assert_close(gm(x), by_hand(x), rtol=0, atol=1e-5)
        assert torch.equal(apply_plan(analysis, make_plan(op_recipe(ratio=0.0), analysis))(x), vit(x))


def test_op_level_r_is_capped_at_the_sources_the_matching_has():
    """int(17 * 0.9) = 15, but a 4x4 grid in 2x2 cells has 4 destinations and the class token: 12 sources.
    The plan says 12 (the tuner reads this cap), and the model is the one ratio 0.75 (int(12.75) = 12) makes."""
    from tests.vit_models import ExplicitViT
    from tokenopt.passes.op_level import op_level_cap

    torch.manual_seed(0)
    vit = ExplicitViT().eval()
    x = torch.randn(2, 3, 32, 32)
    analysis = analyse(vit, x)
    plan = make_plan(op_recipe(ratio=0.9), analysis)
    assert op_level_cap(17, 1, 2, 2) == 12 and op_level_cap(17, 1, 4, 4) == 15
    assert [lp.step.params.r for lp in plan.layers] == [12, 12, 12]
    assert plan.layers[0].step.describe == "op-level merge r=12 around attn"
    with torch.no_grad():
        assert torch.equal(apply_plan(analysis, plan)(x),
                           apply_plan(analysis, make_plan(op_recipe(ratio=0.75), analysis))(x))


def test_op_level_after_a_stream_level_merge_is_refused_by_name():
    """The op-level matching tiles the block's whole grid: after ToMe shortened the stream it is gone (the
    rewritten model used to fail on the example batch with an IndexError)."""
    from tests.vit_models import ExplicitViT
    from tokenopt.errors import PlanError

    vit = ExplicitViT().eval()
    analysis = analyse(vit, torch.randn(2, 3, 32, 32))
    recipe = load_recipe({"version": 1, "rules": [{"pass": "tome", "layers": [0], "r": 2},
                                                  {"pass": "tome", "layers": [1], "placement": "op", "ratio": 0.5}]})
    with pytest.raises(PlanError) as e:
        make_plan(recipe, analysis)
    assert "(rule 2, pass tome): layers.1: placement: op needs the block's whole token grid (17 tokens), but an " \
           "earlier stream-level reduction leaves it 15." in str(e.value)
    assert "Put op-level rules only on blocks before the first stream-level one" in str(e.value)
    # before the stream-level merge it plans: layer 0 merges around its op, layer 1 shortens the stream
    fine = load_recipe({"version": 1, "rules": [{"pass": "tome", "layers": [1], "r": 2},
                                                {"pass": "tome", "layers": [0], "placement": "op", "ratio": 0.5}]})
    assert [lp.tokens_out.max for lp in make_plan(fine, analysis).layers] == [17, 15, 15]


class TokensIn(torch.nn.Module):
    """Blocks over tokens given as the input: no conv map, so no grid."""

    def __init__(self):
        super().__init__()
        from tests.vit_models import ExplicitBlock
        self.layers = torch.nn.ModuleList(ExplicitBlock(32, 4) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.mean(1)


class FlatTokens(torch.nn.Module):
    """15 tokens of width 32 projected from the flattened image: no (B, C, H, W) map turned into
    tokens and no square count, so no grid; built by the CLI as package.module:factory."""

    def __init__(self):
        super().__init__()
        from tests.vit_models import ExplicitBlock
        self.embed = torch.nn.Linear(3 * 32 * 32, 15 * 32)
        self.layers = torch.nn.ModuleList(ExplicitBlock(32, 4) for _ in range(2))

    def forward(self, x):
        x = self.embed(x.flatten(1)).reshape(x.shape[0], 15, 32)
        for layer in self.layers:
            x = layer(x)
        return x.mean(1)


def test_op_level_on_a_block_without_grid_is_refused_by_name():
    analysis = analyse(TokensIn().eval(), torch.randn(2, 15, 32))     # 15 tokens: no square grid either
    with pytest.raises(RecipeError, match=r"layers\.0: tome placement: op needs the block's token grid"):
        make_plan(op_recipe(ratio=0.5), analysis)


# ------------------------------------------------------------------------------------------ ToFu around an op

@pytest.mark.parametrize("rule", ["prune", "mlerp"])
def test_tofu_op_level_on_a_plain_vit_equals_merge_op_unmerge_by_hand(rule):
    from tests.vit_models import ExplicitViT

    torch.manual_seed(0)
    vit = ExplicitViT().eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    analysis = analyse(vit, x)
    rec = load_recipe({"version": 1, "rules": [{"pass": "tofu", "placement": "op", "ratio": 0.4, "op": rule,
                                                "merge_mlp": True}]})
    plan = make_plan(rec, analysis)
    assert [lp.step.describe for lp in plan.layers] == [f"op-level {rule} r=6 around attn/mlp"] * 3
    gm = apply_plan(analysis, plan)

    def by_hand(img):
        t = vit.embed(img).flatten(2).transpose(1, 2)
        t = torch.cat([vit.cls.expand(t.shape[0], -1, -1), t], dim=1) + vit.pos
        for layer in vit.layers:
            m = grid_merge.grid_matching(t, (4, 4), 2, 2, 6, prefix=1)
            t = t + grid_merge.unmerge_tokens(m, layer.attn(grid_merge.merge_tokens(layer.ln1(t), m, rule)))
            t = t + grid_merge.unmerge_tokens(m, layer.ff(grid_merge.merge_tokens(layer.ln2(t), m, rule)))
        return vit.fc(vit.norm(t)[:, 0])

    with torch.no_grad():
        got = gm(x)
        torch.testing.assert_close(got, by_hand(x), rtol=0, atol=1e-10)
        tome = apply_plan(analysis, make_plan(op_recipe(ratio=0.4, merge_mlp=True), analysis))(x)
        assert (got - tome).abs().max() > 1e-6          # not ToMe's mean


def test_tofu_op_level_on_the_unet_prunes_first_half_and_mlerps_second(unet, unet_analysis):
    rec = load_recipe({"version": 1, "rules": [
        {"pass": "tofu", "layers": "first-half", "placement": "op", "ratio": 0.5, "op": "prune"},
        {"pass": "tofu", "layers": "second-half", "placement": "op", "ratio": 0.5, "op": "mlerp"}]})
    plan = make_plan(rec, unet_analysis)
    assert [lp.step.describe if lp.step else None for lp in plan.layers] == [
        "op-level prune r=128 around attn", None, None, None, None,
        "op-level mlerp r=128 around attn", "op-level mlerp r=128 around attn"]
    ex = unet_analysis.example
    with torch.no_grad():
        got, original = ex.call(apply_plan(unet_analysis, plan)).sample, ex.call(unet).sample
        as_tome = ex.call(optimized(unet_analysis, ratio=0.5)).sample
        merge_rule = load_recipe({"version": 1, "rules": [{"pass": "tofu", "placement": "op", "ratio": 0.5,
                                                           "op": "merge"}]})
        tofu_merge = ex.call(apply_plan(unet_analysis, make_plan(merge_rule, unet_analysis))).sample
    assert got.shape == original.shape
    assert (got - original).abs().max() > 1e-3 and (got - as_tome).abs().max() > 1e-4
    assert torch.equal(tofu_merge, as_tome)          # op: merge is ToMe's placement exactly


# ------------------------------------------------------------------------------------------ timm ViT

def test_op_level_on_a_timm_vit_keeps_every_token_and_never_merges_the_class_token():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10,
                            embed_dim=32, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    analysis = analyse(vit, x)
    assert analysis.prefix_tokens == 1 and analysis.streams[0].grid == (4, 4)
    plan = make_plan(op_recipe(ratio=0.5), analysis)
    assert [lp.step.params.r for lp in plan.layers] == [8, 8]
    assert [lp.step.tokens_out.max for lp in plan.layers] == [17, 17]      # the stream keeps all 17 tokens
    gm = apply_plan(analysis, plan)
    matchings = [n for n in gm.graph.nodes if n.target is grid_merge.grid_matching]
    assert len(matchings) == 2 and all(n.args[5] == 1 for n in matchings)  # one prefix token: a destination

    def by_hand(img):
        t = vit._pos_embed(vit.patch_embed(img))
        for blk in vit.blocks:
            m = grid_merge.grid_matching(t, (4, 4), 2, 2, 8, prefix=1)
            assert 0 in m.destinations.tolist() and 0 not in m.sources.tolist()
            t = t + blk.ls1(grid_merge.unmerge_tokens(m, blk.attn(grid_merge.merge_tokens(blk.norm1(t), m))))
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        return vit.forward_head(vit.norm(t))

    with torch.no_grad():
        got = gm(x)
        torch.testing.assert_close(got, by_hand(x), rtol=0, atol=1e-5)
        assert (got - vit(x)).abs().max() > 1e-4
        assert torch.equal(apply_plan(analysis, make_plan(op_recipe(ratio=0.0), analysis))(x), vit(x))


# ------------------------------------------------------------------------------------------ bad input, CLI

def _apply_refused(tmp_path, rule: str, model: str, *extra) -> str:
    """`tokenopt apply` of a one-rule recipe: exit 2, one message, no traceback, nothing written."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nrules:\n  - {rule}\n")
    out = tmp_path / "x.tokenopt.pt"
    before = sorted(tmp_path.rglob("*"))
    res = run("apply", recipe, model, "-o", out, *extra)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.output.count("error") <= 1
    assert sorted(tmp_path.rglob("*")) == before          # nothing written, not even a temporary file
    return " ".join(res.output.split())


@pytest.mark.parametrize("ratio", ["1.0", "-0.2"])
def test_cli_ratio_outside_zero_one(tmp_path, unet_dir, ratio):
    msg = _apply_refused(tmp_path, f"{{pass: tome, placement: op, ratio: {ratio}}}", f"diffusers:{unet_dir}")
    assert "option 'ratio' = " + ratio in msg
    assert ("less than 1" if ratio == "1.0" else "greater than or equal to 0") in msg


def test_cli_sx_sy_that_do_not_tile_name_the_block_grid_and_fix(tmp_path, unet_dir):
    msg = _apply_refused(tmp_path, "{pass: tofu, placement: op, ratio: 0.5, op: mlerp, sy: 3}", f"diffusers:{unet_dir}")
    assert ("down_blocks.0.attentions.0.transformer_blocks.0: sx=2, sy=3 do not tile its 16x16 token grid "
            "(H must divide by sy, W by sx). Choose sx dividing 16 and sy dividing 16.") in msg


def test_cli_unsupported_class_and_pipeline_without_denoiser(tmp_path):
    _write(tmp_path / "vae", "config.json", {"_class_name": "AutoencoderKL"})
    msg = _apply_refused(tmp_path, "{pass: tome, placement: op, ratio: 0.5}", f"diffusers:{tmp_path / 'vae'}")
    assert "holds a AutoencoderKL, which tokenopt does not support" in msg
    _write(tmp_path / "pipe", "model_index.json", {"_class_name": "StableDiffusionPipeline"})
    _write(tmp_path / "pipe" / "vae", "config.json", {"_class_name": "AutoencoderKL"})
    msg = _apply_refused(tmp_path, "{pass: tome, placement: op, ratio: 0.5}", f"diffusers:{tmp_path / 'pipe'}")
    assert "has neither unet/ nor transformer/" in msg


def test_cli_placement_op_on_a_block_without_grid(tmp_path):
    msg = _apply_refused(tmp_path, "{pass: tome, placement: op, ratio: 0.5}", "tests.test_diffusion:FlatTokens",
                         "--input-size", "3,32,32")
    assert ("layers.0: tome placement: op needs the block's token grid (H x W), and the shapes do not show one. "
            "Use placement: stream for this block") in msg


# ------------------------------------------------------------------------------------------ shipped recipes

def test_shipped_tomesd_50_is_tomesd_at_its_defaults_but_use_rand(unet, unet_analysis):
    tomesd = pytest.importorskip("tomesd")
    from tokenopt.paths import SHIPPED_RECIPES

    plan = make_plan(load_recipe(SHIPPED_RECIPES / "tomesd-50.yaml"), unet_analysis)
    assert [lp.step.params.r if lp.step else None for lp in plan.layers] == [128, None, None, None, None, 128, 128]
    patched = copy.deepcopy(unet)
    tomesd.apply_patch(patched, ratio=0.5, use_rand=False)     # every other option at tomesd's default
    ex = unet_analysis.example
    with torch.no_grad():
        torch.testing.assert_close(ex.call(apply_plan(unet_analysis, plan)).sample, ex.call(patched).sample,
                                   rtol=0, atol=1e-5)


def test_shipped_tofu_gen_50_prunes_the_down_path_and_mlerps_the_up_path(unet_analysis):
    from tokenopt.paths import SHIPPED_RECIPES

    plan = make_plan(load_recipe(SHIPPED_RECIPES / "tofu-gen-50.yaml"), unet_analysis)
    assert [(lp.step.params.op, lp.step.params.r) if lp.step else None for lp in plan.layers] == [
        ("prune", 128), None, None, None, None, ("mlerp", 128), ("mlerp", 128)]
