"""The analysis package: the graph index, the three attention kinds (nodes checked by value), every
refusal check on a model that needs it, and NoMatch for what is not a block."""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from tokenopt.analysis import (CHECKS, AttentionCore, BlockRecord, CheckContext, GraphIndex, NoMatch, analyse,
                               explicit_core, first_refusal, record_shapes)
from tokenopt.analysis.blocks import NO_RESIDUAL, block_for
from tokenopt.analysis.cores import NOT_ATTENTION
from tokenopt.analysis.refusals import check_named
from tokenopt.errors import AnalysisError
from vit_models import ExplicitBlock, ExplicitViT, MHAViT

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def values(gm: fx.GraphModule, x: torch.Tensor) -> dict:
    """Every node's value on ``x``, by node name."""
    out = {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            out[n.name] = super().run_node(n)
            return out[n.name]
    with torch.no_grad():
        Capture(gm).run(x)
    return out


def heads_split(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------- index

def _tiny_graph():
    def f(x, y):
        a = x + y
        b = a * 2
        c = torch.relu(x)
        return b + c
    return fx.symbolic_trace(f)


def test_index_lookup_order_and_reachability():
    gm = _tiny_graph()
    idx = GraphIndex(gm.graph)
    names = [n.name for n in gm.graph.nodes]
    assert names == ["x", "y", "add", "mul", "relu", "add_1", "output"]
    n = {name: idx.node(name) for name in names}
    assert all(n[k].name == k for k in names) and idx.node(n["mul"]) is n["mul"]
    assert [idx.position(k) for k in names] == list(range(7)) and idx.after("relu") == [n["add_1"], n["output"]]
    assert idx.ancestors("add_1") == {n["x"], n["y"], n["add"], n["mul"], n["relu"]}
    assert idx.descendants("y") == {n["add"], n["mul"], n["add_1"], n["output"]}
    assert idx.ancestors("add_1", stop="add") == {n["mul"], n["relu"], n["x"]}   # not past add (so not y)
    assert idx.descendants("x", stop=["relu", "add"]) == set()
    assert idx.between("add", "add_1") == {n["mul"]} and idx.reaches("y", "add_1") and not idx.reaches("relu", "mul")
    assert idx.ancestors("add_1") is idx.ancestors("add_1")                        # cached
    assert idx.users("add") == [n["mul"]] and idx.inputs("add") == [n["x"], n["y"]]
    assert [p.name for p in idx.placeholders()] == ["x", "y"] and "relu" in idx and "nope" not in idx
    assert set(idx.digraph.successors(n["x"])) == {n["add"], n["relu"]}
    with pytest.raises(KeyError, match="no node named 'nope'"):
        idx.node("nope")
    assert not idx.stale
    with gm.graph.inserting_after(n["relu"]):
        neg = gm.graph.call_function(torch.neg, (n["relu"],))
    n["add_1"].replace_input_with(n["relu"], neg)
    assert idx.stale and GraphIndex(gm).node("neg") is neg
    assert idx.ancestors("add_1", stop="add") == {neg, n["mul"], n["relu"], n["x"]}   # walks with stop: live
    assert neg not in idx.ancestors("add_1")                                          # cached: the snapshot


def test_analysis_carries_its_index():
    a = analyse(ExplicitViT().eval())
    assert a.index.graph is a.graph.graph and not a.index.stale
    assert a.index.node(a.blocks[0].output).name == a.blocks[0].output
    assert "GraphIndex" not in repr(a) and "no_matches" not in repr(a)


# ---------------------------------------------------------------------------------------- cores

def test_explicit_attention_nodes_hold_q_k_v_logits_and_output():
    torch.manual_seed(0)
    m = ExplicitViT().eval()
    a = analyse(m, X32)
    val = values(a.graph, X32)
    for blk, rec in zip(m.layers, a.blocks):
        core = rec.attention
        assert core.kind == "softmax" and core.heads == 4
        h = blk.ln1(val[rec.input])
        w, bias = blk.attn.to_qkv.weight.chunk(3), blk.attn.to_qkv.bias.chunk(3)
        q, k, v = (heads_split(h @ wi.T + bi, 4) for wi, bi in zip(w, bias))
        logits = q @ k.transpose(-2, -1) * blk.attn.scale
        assert close(val[core.q], q) and close(val[core.k], k) and close(val[core.v], v)
        assert close(val[core.logits], logits)
        assert close(val[core.output], logits.softmax(-1) @ v)
        assert core.node != core.output                      # the softmax, then the attn @ v product


def test_fused_attention_nodes_hold_q_k_v_and_output():
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10,
                          embed_dim=48, num_heads=3).eval()
    a = analyse(m, X32)
    val = values(a.graph, X32)
    for blk, rec in zip(m.blocks, a.blocks):
        core = rec.attention
        assert core.kind == "sdpa" and core.output == core.node and core.logits is None and core.heads == 3
        h = blk.norm1(val[rec.input])
        w, bias = blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)
        q, k, v = (heads_split(h @ wi.T + bi, 3) for wi, bi in zip(w, bias))
        assert close(val[core.q], q) and close(val[core.k], k) and close(val[core.v], v)
        assert close(val[core.output], F.scaled_dot_product_attention(q, k, v))


def test_multihead_attention_core_is_the_module_call():
    torch.manual_seed(0)
    m = MHAViT().eval()
    a = analyse(m, X32)
    val = values(a.graph, X32)
    for blk, rec in zip(m.blocks, a.blocks):
        core = rec.attention
        assert core.kind == "mha" and core.heads == 4 and a.graph.get_submodule(core.module) is blk.mha
        assert core.output == core.node and core.q is core.k is core.v is None
        h = blk.n1(val[rec.input])
        mha = blk.mha
        q, k, v = (heads_split(h @ wi.T + bi, 4) for wi, bi in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(h.shape)
        assert close(val[core.output][0], mha.out_proj(attn))


def test_old_constructors_still_work():
    core = AttentionCore("sdpa", "attn")
    assert core.v is None and core.output is None
    rec = BlockRecord(0, "blocks.0", "x", core, "add", "add", "add_1", 17, 64, None)
    assert rec.refused_by is None and not rec.grid_bound


# ---------------------------------------------------------------------------------------- NoMatch

def test_no_match_is_falsy_and_reads_as_its_reason():
    nm = NoMatch("no residual")
    assert not nm and bool(nm) is False and str(nm) == "no residual" and f"{nm}" == "no residual"
    assert nm.at("blocks.3").where == "blocks.3" and nm.where is None and nm.near_miss
    with pytest.raises(dataclasses.FrozenInstanceError):
        nm.reason = "other"


class GatedBlock(ExplicitBlock):
    """An MLP gated by a softmax over channels: a softmax that is not attention."""

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        h = self.ff[0](self.ln2(x))
        return x + self.ff[2](h * h.softmax(-1))


class LearnedMixer(nn.Module):
    """softmax over a learned token-mixing table, times values: attention-shaped, but no q @ k^T."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(tokens, tokens))
        self.v = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.mix.softmax(-1) @ self.v(x)


class NoResidual(ExplicitBlock):
    def forward(self, x):
        x = self.attn(self.ln1(x))               # the residual is missing
        return x + self.ff(self.ln2(x))


class Tokens(nn.Module):
    """Patch tokens of a 32 px image (16 of them, 64 channels) through ``layers``."""

    def __init__(self, *layers, dim=64):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return x.mean(1)


def test_a_softmax_gate_is_not_attention_and_not_reported():
    a = analyse(Tokens(GatedBlock(64, 4)).eval(), X32)
    assert len(a.blocks) == 1 and a.unmatched == []
    gate = [m for m in a.no_matches if m.reason == NOT_ATTENTION]
    assert len(gate) == 1 and not gate[0].near_miss and a.index.node(gate[0].where).target == "softmax"
    assert not explicit_core(a.index.node(gate[0].where))


def test_attention_without_q_k_product_is_a_reported_near_miss():
    a = analyse(Tokens(ExplicitBlock(64, 4), LearnedMixer(16, 64)).eval(), X32)
    assert len(a.blocks) == 1
    assert a.unmatched == [("softmax_1", "softmax does not follow a q @ k^T product")]


def test_attention_without_residual_is_no_match():
    a = analyse(Tokens(NoResidual(64, 4), ExplicitBlock(64, 4)).eval(), X32)
    assert [b.path for b in a.blocks] == ["layers.1"]
    assert a.unmatched == [("layers.0.attn", NO_RESIDUAL)]
    core = explicit_core(a.index.node("softmax"))
    miss = block_for(core, 0, a.graph, a.index)
    assert not miss and isinstance(miss, NoMatch) and str(miss) == NO_RESIDUAL and miss.where == "layers.0.attn"
    with pytest.raises(AnalysisError, match=r"layers.0.attn: no residual add around the attention"):
        analyse(Tokens(NoResidual(64, 4)).eval(), X32)


# ---------------------------------------------------------------------------------------- refusals

class SeqFirstMHA(nn.Module):
    """nn.MultiheadAttention as older code writes it: (tokens, batch, channels)."""

    def __init__(self, dim=64, cross=False):
        super().__init__()
        self.n1, self.cross = nn.LayerNorm(dim), cross
        self.mha = nn.MultiheadAttention(dim, 4, batch_first=cross)

    def forward(self, x):
        h = self.n1(x)
        if self.cross:                          # batch first, but keys/values are the un-normed tokens
            return x + self.mha(h, x, x, need_weights=False)[0]
        h = h.transpose(0, 1)
        return x + self.mha(h, h, h, need_weights=False)[0].transpose(0, 1)


class Windowed(nn.Module):
    """Attention inside 4 windows of 4 tokens each, on a (B, N, C) stream."""

    def __init__(self, dim=64):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b * 4, n // 4, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return x + out


class PooledQueries(nn.Module):
    """Queries, keys and values from tokens pooled 2:1 (as in MViT); the result is upsampled."""

    def __init__(self, dim=64):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, c = x.shape
        pooled = F.avg_pool1d(x.transpose(1, 2), 2).transpose(1, 2)
        q, k, v = self.qkv(pooled).reshape(b, n // 2, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n // 2, c)
        return x + out.repeat_interleave(2, dim=1)


class GridAttention(nn.Module):
    """Global attention on a (B, H, W, C) stream: no windows, but no (B, N, C) stream either."""

    def __init__(self, dim=64):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h, w, c)


class GridTokens(Tokens):
    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        for layer in self.layers:
            x = layer(x)
        return x.mean((1, 2))


def _timm(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **{**dict(img_size=32, patch_size=8, depth=2, num_classes=10), **kw}).eval()


REFUSING = {   # check name: (model, example input, words of the reason)
    "windowed": (lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 2, 2),
        num_classes=10).eval(), torch.randn(1, 3, 56, 56), "windowed attention (as in Swin): tokens can be reduced "
                                                           "only inside each window"),
    "token_stream": (lambda: GridTokens(GridAttention()).eval(), X32,
                     "not (batch, tokens, channels) but (2, 4, 4, 64)"),
    "mha_batch_first": (lambda: Tokens(SeqFirstMHA()).eval(), X32, "batch_first=False"),
    "mha_cross_attention": (lambda: Tokens(SeqFirstMHA(cross=True)).eval(), X32, "cross-attention"),
    "windowed_attention": (lambda: Tokens(Windowed()).eval(), X32, "runs over 4 fixed windows"),
    "cross_covariance": (lambda: timm.create_model("xcit_nano_12_p16_224", img_size=32, depth=2,
                                                   num_classes=10).eval(), X32, "cross-covariance attention (XCiT)"),
    "class_attention": (lambda: _timm("cait_xxs24_224", depth_token_only=1), X32,
                        "class attention: 1 class token query reads 17 tokens"),
    "pooled_queries": (lambda: Tokens(PooledQueries()).eval(), X32, "attention sees 8 queries but the block has 16"),
    "spatial_reduction": (lambda: timm.create_model("pvt_v2_b0", depths=(1, 1, 1, 1), num_classes=10).eval(),
                          torch.randn(1, 3, 64, 64), "(4 keys for 256 queries)"),
    "relative_position_bias": (lambda: _timm("beit_base_patch16_224", embed_dim=64, num_heads=2), X32,
                               "relative-position bias"),
    "rope": (lambda: _timm("eva02_tiny_patch14_224", img_size=28, patch_size=14), torch.randn(1, 3, 28, 28),
             "rotary position embedding (RoPE)"),
}


def test_checks_run_in_the_documented_order():
    import tokenopt.analysis.refusals as refusals
    names = [c.name for c in CHECKS]
    assert names == ["windowed", "token_stream", "mha_batch_first", "mha_cross_attention", "qk_shapes", "windowed_attention",
                     "cross_covariance", "class_attention", "pooled_queries", "spatial_reduction",
                     "relative_position_bias", "rope"]
    assert all(name in refusals.__doc__ for name in names)
    assert set(REFUSING) == set(names) - {"qk_shapes"}          # qk_shapes: tested below, by hand


@pytest.mark.parametrize("name", list(REFUSING))
def test_each_check_refuses_the_model_that_needs_it(name):
    make, x, words = REFUSING[name]
    a = analyse(make(), x)
    refused = [b for b in a.blocks if b.refused_by == name]
    assert refused, a.summary()
    b = refused[0]
    assert words in b.refusal
    why = check_named(name)(b, CheckContext(a.graph, a.index, a.prefix_tokens))
    assert isinstance(why, NoMatch) and str(why) == b.refusal


def test_qk_shapes_refuses_when_q_has_no_shape():
    a = analyse(ExplicitViT().eval(), X32)
    b = a.blocks[0]
    assert b.refusal is None and b.refused_by is None
    a.index.node(b.attention.q).meta.pop("tensor_meta")
    assert first_refusal(b, CheckContext(a.graph, a.index, a.prefix_tokens)) == (
        "qk_shapes", NoMatch("cannot read the shapes of q and k", where=b.path))


def test_accepted_blocks_pass_every_check():
    for model in (ExplicitViT(), MHAViT(), _timm("vit_small_patch16_224")):
        a = analyse(model.eval(), X32)
        ctx = CheckContext(a.graph, a.index, a.prefix_tokens)
        assert all(b.refused_by is None and all(c(b, ctx) is None for c in CHECKS) for b in a.blocks)


# ---------------------------------------------------------------------------------------- shapes

def test_fake_shapes_equal_real_shapes_and_the_model_is_untouched():
    from tokenopt.analysis import ShapeRecorder

    class Caching(nn.Module):          # a leaf that stores a tensor on itself while it runs
        def forward(self, x):
            self.last = x.detach()
            return x

    m = Tokens(ExplicitBlock(64, 4)).eval()
    m.layers.append(Caching())
    a = analyse(m, X32, leaf_modules=(Caching,))
    assert not hasattr(m.layers[1], "last")
    fake = {n.name: n.meta["tensor_meta"] for n in a.graph.graph.nodes if "tensor_meta" in n.meta}
    with torch.no_grad():
        ShapeRecorder(a.graph).run(X32)
    real = {n.name: n.meta["tensor_meta"] for n in a.graph.graph.nodes if "tensor_meta" in n.meta}
    assert fake == real and len(real) > 20
    assert type(m.layers[1].last) is torch.Tensor


def test_values_the_shapes_depend_on_run_for_real():
    class Item(nn.Module):             # a leaf whose output length depends on the input's values
        def forward(self, x):
            return x[:, : int((x[0, :, 0] > -1e9).sum().item())]

    m = Tokens(Item(), ExplicitBlock(64, 4)).eval()
    a = analyse(m, X32, leaf_modules=(Item,))
    assert a.blocks[0].tokens == 16


def test_an_input_of_the_wrong_size_names_its_shape():
    with pytest.raises(AnalysisError, match=r"running ExplicitViT on an example batch of shape \(2, 3, 48, 48\) "
                                            r"failed: RuntimeError: The size of tensor a \(37\)"):
        analyse(ExplicitViT().eval(), torch.randn(2, 3, 48, 48))
    gm = fx.symbolic_trace(ExplicitViT().eval())
    with pytest.raises(AnalysisError, match="--input-size"):
        record_shapes(gm, torch.randn(1, 3, 40, 40), "ExplicitViT")


def test_imports_inside_the_package_point_one_way():
    """records/nodes <- aten_vocabulary/constant_masks/token_axis/batch_size/index/example
    <- cores/capture/branches <- blocks/windows <- refusals <- prefix/pooling/streams/dense <- __init__,
    and nothing from the layers above the analysis."""
    import ast
    import pathlib

    import tokenopt.analysis as pkg
    layer = {"records": 0, "nodes": 0, "aten_vocabulary": 1, "constant_masks": 1, "token_axis": 1, "batch_size": 1,
             "index": 1, "example": 1, "capture": 2, "cores": 2, "branches": 2,
             "blocks": 3, "windows": 3, "refusals": 4,
             "prefix": 5, "pooling": 5, "streams": 5, "dense": 5, "__init__": 6}
    above = ("tokenopt.rewrite", "tokenopt.passes", "tokenopt.plan", "tokenopt.pipeline", "tokenopt.cli",
             "tokenopt.report", "tokenopt.recipe", "tokenopt.sources", "tokenopt.files", "tokenopt.demo")
    folder = pathlib.Path(pkg.__file__).parent
    assert {p.stem for p in folder.glob("*.py")} == set(layer)
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for t in ast.walk(tree) if isinstance(t, ast.If) and ast.unparse(t.test) == "TYPE_CHECKING"
                       for n in ast.walk(t)}          # annotations only, never imported at run time
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert not name.startswith(above), f"{path.name} imports {name}"
                if name.startswith("tokenopt.analysis."):
                    dep = name.split(".")[2]
                    assert layer[dep] < layer[path.stem], f"{path.name} imports {name}, which is not below it"


def test_region_walks_back_to_the_start_and_with_an_order_stays_after_it():
    """nodes.region: GraphRewriter.region's walk (everything end reads, stopping at start) and the
    block body localise_batch needs (only nodes placed after start: not what the block reads from
    earlier, such as a bias computed from the image before the block)."""
    from tokenopt.analysis.nodes import region
    g = fx.Graph()
    image = g.placeholder("image")
    bias = g.call_function(torch.neg, (image,))          # before the block, read inside it
    x = g.call_function(torch.relu, (image,))           # the block's input
    a = g.call_function(torch.add, (x, bias))
    b = g.call_function(torch.mul, (a, x))
    g.output(b)
    assert region(x, b) == {a, b, bias, image}
    order = {n: i for i, n in enumerate(g.nodes)}
    assert region(x, b, order) == {a, b}


class _DtypeAndFlattenHead(ExplicitViT):
    """After the blocks: a norm that reads x.dtype (as open_clip's LayerNorm does) and a head on
    every token flattened (an nn.Flatten module)."""

    def __init__(self):
        super().__init__(depth=2)
        self.flat = nn.Flatten(1)
        self.fc = nn.Linear(17 * 64, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x).to(x.dtype)
        return self.fc(self.flat(x))


def test_token_consumers_are_worded_for_a_person():
    """The pooling line names the module (path and class) or the operation, never fx's node names:
    it read "call_function <built-in function getattr> consumes every token" on open_clip."""
    a = analyse(_DtypeAndFlattenHead().eval(), torch.randn(2, 3, 32, 32))
    assert sorted(p.detail for p in a.pooling) == ["flat (Flatten) reads every token", "the tokens' .dtype is read"]
    assert all(p.kind == "tokens" for p in a.pooling)
