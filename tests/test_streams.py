"""Token streams, Downsample steps and a block's branches, on models written here.

A toy hierarchical ViT (two streams: an 8 x 8 grid, then a 4 x 4 one after a patch merging), a
toy diffusion-style block (self-attention, cross-attention to text states, feed-forward, each with
its own residual add), and the plain ViTs the rest of the suite uses (one stream, two branches).
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import tokenopt
from tokenopt.analysis import ShapeRecorder, analyse, analyse_graph
from tokenopt.errors import PlanError
from tokenopt.record import record_of
from vit_models import ExplicitBlock, ExplicitViT, GridConvViT, MHAViT

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------- a hierarchical ViT

class PatchMerging(nn.Module):
    """Swin's patch merging on a (B, N, C) stream: each 2 x 2 neighbourhood concatenated (4C), then
    a linear 4C -> 2C. An H x W grid becomes H/2 x W/2."""

    def __init__(self, dim: int, side: int):
        super().__init__()
        self.side = side
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim)

    def forward(self, x):
        b, n, c = x.shape
        g = x.view(b, self.side, self.side, c)
        g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(g.reshape(b, n // 4, 4 * c)))


class HierarchicalViT(nn.Module):
    """32 px -> 8 x 8 patches of 32 channels, 2 blocks, merging to 4 x 4 of 64, 2 blocks, mean pool."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, 4)
        self.stage1 = nn.ModuleList(ExplicitBlock(32, 2) for _ in range(2))
        self.merge = PatchMerging(32, 8)
        self.stage2 = nn.ModuleList(ExplicitBlock(64, 4) for _ in range(2))
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        for blk in self.stage1:
            x = blk(x)
        x = self.merge(x)
        for blk in self.stage2:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


def hierarchical():
    torch.manual_seed(0)
    return HierarchicalViT().eval()


def test_a_patch_merging_splits_the_blocks_into_two_streams():
    a = analyse(hierarchical(), X32)
    assert [(s.index, s.blocks, s.grid, s.layout, s.prefix_tokens, s.tokens, s.dim) for s in a.streams] == [
        (0, (0, 1), (8, 8), "bnc", 0, 64, 32), (1, (2, 3), (4, 4), "bnc", 0, 16, 64)]
    assert [b.stream for b in a.blocks] == [0, 0, 1, 1]
    [step] = a.downsamples
    assert (step.source, step.target, step.kind) == (0, 1, "merge")
    assert a.index.node(step.node).target == "merge.reduction"      # the linear that makes the new stream
    assert "stream 1: blocks 2-3, 16 tokens (grid 4x4, bnc), dim 64" in a.summary()
    assert "stream 0 -> 1: merge at merge_reduction" in a.summary()


def test_tome_walks_the_later_stream_from_its_own_count_and_runs():
    model = hierarchical()
    recipe = {"version": 1, "rules": [{"pass": "tome", "layers": "2-3", "r": 2}]}
    fast = tokenopt.optimize(model, recipe, example_input=X32)
    assert [(int(lp.tokens_in.max), int(lp.tokens_out.max)) for lp in record_of(fast).plan.layers] == [
        (64, 64), (64, 64), (16, 14), (14, 12)]
    with torch.no_grad():
        out, ref = fast(X32), model(X32)
    assert out.shape == (2, 10) and torch.isfinite(out).all() and not torch.equal(out, ref)


def test_a_reduction_before_the_patch_merging_is_refused_naming_the_later_stream():
    recipe = {"version": 1, "rules": [{"pass": "tome", "layers": "0", "r": 2}]}
    with pytest.raises(PlanError) as e:
        tokenopt.optimize(hierarchical(), recipe, example_input=X32)
    assert str(e.value) == (
        "<dict> (rule 1, pass tome): reducing tokens at stage1.0 breaks stage2.0, which needs the original token "
        "grid (it is on token stream 1: a merge at merge_reduction makes it from the whole grid of stream 0).\n"
        "  Select only layers on the last token stream (from stage2.0 on).")


# ------------------------------------------------------------------------- self, cross, feed-forward

class CrossAttention(nn.Module):
    """Queries from the tokens; keys and values from ``context`` when given (else the tokens)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        b, n, c = x.shape
        context = x if context is None else context
        split = lambda t: t.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)   # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(context)), split(self.v(context)))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """As diffusers' BasicTransformerBlock: x + attn1(norm1(x)), + attn2(norm2(x), text), + ff(norm3(x))."""

    def __init__(self, dim: int = 32, heads: int = 2):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1, self.attn2 = CrossAttention(dim, heads), CrossAttention(dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Conditioned(nn.Module):
    def __init__(self, depth: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 8, 8)
        self.layers = nn.ModuleList(TransformerBlock() for _ in range(depth))

    def forward(self, x, context):
        x = self.embed(x).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x, context)
        return x.mean(1)


def conditioned_analysis():
    torch.manual_seed(0)
    model = Conditioned().eval()
    gm = fx.symbolic_trace(model)
    ctx = torch.randn(2, 7, 32)
    with torch.no_grad():
        ShapeRecorder(gm).run(X32, ctx)
    return model, ctx, analyse_graph(gm, model, tuple(X32.shape))


def test_self_attention_cross_attention_and_mlp_are_one_block_of_three_branches():
    _, _, a = conditioned_analysis()
    assert [b.path for b in a.blocks] == ["layers.0", "layers.1"]
    for b in a.blocks:
        self_, cross, mlp = b.branches
        assert [br.kind for br in b.branches] == ["self_attention", "cross_attention", "mlp"]
        assert (self_.core.kv_source, cross.core.kv_source, mlp.core) == ("tokens", "context", None)
        assert b.attention == self_.core and b.refusal is None and b.tokens == 16
        # each branch reads the stream where the one before left it; the block ends at the last add
        assert (b.input, cross.entry, mlp.entry, b.output) == (self_.entry, self_.residual, cross.residual,
                                                                mlp.residual)
        assert b.merge_point == cross.residual and b.attn_residual == self_.residual
        exits = [a.index.node(br.exit).target for br in b.branches]
        assert exits == [f"{b.path}.attn1.proj", f"{b.path}.attn2.proj", f"{b.path}.ff.2"]
    assert [(s.blocks, s.grid) for s in a.streams] == [((0, 1), (4, 4))] and a.downsamples == []


def test_the_cross_attention_branch_computes_attn2_on_the_text_states():
    model, ctx, a = conditioned_analysis()
    wanted = {br.entry for br in a.blocks[0].branches} | {br.exit for br in a.blocks[0].branches}
    seen = {}

    class Keep(fx.Interpreter):
        def run_node(self, n):
            seen[n.name] = out = super().run_node(n)
            return out

    with torch.no_grad():
        Keep(a.graph).run(X32, ctx)
        _, cross, _ = a.blocks[0].branches
        blk = model.layers[0]
        assert wanted <= set(seen)
        assert torch.allclose(seen[cross.exit], blk.attn2(blk.norm2(seen[cross.entry]), ctx), atol=1e-6)


# ------------------------------------------------------------------------- the models the suite uses

def _timm(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **{**dict(img_size=32, patch_size=8, depth=2, num_classes=10), **kw}).eval()


PLAIN = {
    "explicit": ExplicitViT, "mha": MHAViT, "grid_conv": GridConvViT,
    "timm_vit": lambda: _timm("vit_small_patch16_224", embed_dim=64, num_heads=2),
    "timm_deit_distilled": lambda: _timm("deit_small_distilled_patch16_224", embed_dim=64, num_heads=2),
    "timm_cait": lambda: _timm("cait_xxs24_224", embed_dim=48, num_heads=2, depth_token_only=1),
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_a_plain_vit_is_one_stream_of_self_attention_and_mlp_blocks(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = analyse(PLAIN[name]().eval(), X32)
    [stream] = a.streams
    assert stream.blocks == tuple(range(len(a.blocks))) and a.downsamples == []
    assert (stream.tokens, stream.prefix_tokens, stream.grid, stream.layout) == (
        a.blocks[0].tokens, a.prefix_tokens, (4, 4), "bnc")
    assert all([br.kind for br in b.branches] == ["self_attention", "mlp"] and b.stream == 0 for b in a.blocks)
    assert all(b.attention.kv_source == "tokens" for b in a.blocks)
    assert "stream 0" not in a.summary()


def test_class_attention_reads_the_stream_and_stays_on_it():
    # CaiT: the class-attention block carries the class token alone and reads the patch tokens as
    # keys; that is not cross-attention, and it is still refused as class attention
    a = analyse(PLAIN["timm_cait"](), X32)
    last = a.blocks[-1]
    assert last.refused_by == "class_attention" and last.attention.kv_source == "tokens"
    assert last.tokens == 1 and last.stream == 0
