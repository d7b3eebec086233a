"""The passes (tokenopt/passes) value by value: options, plans, messages and rewritten graphs.

Written to kill the mutants that survived the mutation run of tokenopt/passes (docs/testing.md).
The ToSA tests recompute, from each block's own weights, the logits its selector must read.
"""
from __future__ import annotations

import operator
import os
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import tokenopt
from tokenopt.analysis import AttentionCore, BlockRecord
from tokenopt.errors import PlanError, RecipeError
from tokenopt.rewrite import learned
from tokenopt.ops import attention as attn_ops
from tokenopt.ops import selection
from tokenopt.ops import tome as tome_ops
from tokenopt.passes import available_passes, get_pass, register_pass
from tokenopt.passes import base as passes_base
from tokenopt.passes import tosa as tosa_pass
from tokenopt.passes.base import Pass, PassOptions
from tokenopt.passes.tofu import ToFu, ToFuOptions, ToFuParams
from tokenopt.passes.tome import DecreasingSchedule, ToMe, ToMeOptions, ToMeParams, expand_r
from tokenopt.passes.tosa import ToSA, ToSAOptions, UntrainedSelectorWarning
from tokenopt.tokens import TokenCount
from tokenopt.record import record_of, update_record

# ------------------------------------------------------------------------------------------------
# tiny ViTs in the three attention styles the analysis matches (16 patches, 2 heads of 8)


class Block(nn.Module):
    """style: sdpa (scale "kw": a non-default scale by keyword; "pos6": all six positional arguments),
    softmax, mha (random in-projection biases: nn.MultiheadAttention starts them at zero)."""

    def __init__(self, dim, heads, style, scale=None):
        super().__init__()
        self.heads, self.style, self.scale = heads, style, scale
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if style == "mha":
            self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
            with torch.no_grad():
                self.mha.in_proj_bias.normal_()
        else:
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def qk(self, h):
        """Queries and keys (B, H, N, d) and the logits' scale, by hand from the weights."""
        b, n, c = h.shape
        if self.style == "mha":
            w, bias = self.mha.in_proj_weight, self.mha.in_proj_bias
            q, k = (F.linear(h, w[i * c:(i + 1) * c], bias[i * c:(i + 1) * c]) for i in (0, 1))
            q, k = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k))
            return q, k, (c // self.heads) ** -0.5
        q, k, _ = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.style == "softmax":
            return q, k, (c // self.heads) ** -0.5
        return q, k, 0.3 if self.scale == "kw" else (c // self.heads) ** -0.5

    def forward(self, x):
        b, n, c = x.shape
        h = self.n1(x)
        if self.style == "mha":
            a = self.mha(h, h, h, need_weights=False)[0]
        else:
            q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            if self.style == "softmax":
                a = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1) @ v
            elif self.scale == "kw":
                a = F.scaled_dot_product_attention(q, k, v, scale=0.3)
            elif self.scale == "pos6":
                a = F.scaled_dot_product_attention(q, k, v, None, 0.0, False)
            else:
                a = F.scaled_dot_product_attention(q, k, v)
            a = self.proj(a.transpose(1, 2).reshape(b, n, c))
        x = x + a
        return x + self.mlp(self.n2(x))


class ViT(nn.Module):
    def __init__(self, style="sdpa", scale=None, cls=True, heads=(2, 2, 2), dim=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim)) if cls else None
        self.pos = nn.Parameter(torch.randn(1, 16 + cls, dim) * 0.5)
        self.blocks = nn.ModuleList(Block(dim, h, style, scale) for h in heads)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.cls is not None else x.mean(1))


def vit(style="sdpa", **kw):
    torch.manual_seed(0)
    return ViT(style, **kw).eval()


def images(n=2, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


class Values(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.values[n] = out
        return out


def node_values(gm, x):
    it = Values(gm)
    it.values = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedSelectorWarning)
        it.run(x)
    return it.values


def tosa_recipe(*inputs, keep=8, layers=None, **top):
    layers = layers or [[i + 1] for i in range(len(inputs))]
    return {"version": 1, **top, "rules": [
        {"pass": "tosa", "layers": lay, "keep": keep, "selector": {"input": inp, "hidden": 4}}
        for inp, lay in zip(inputs, layers)]}


def selector_io(gm, layer):
    """(the selector's input node, the node holding the positions it selected) for ``layer``."""
    sel = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == f"tosa_selectors.{layer}")
    topk = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is selection.topk_tokens
                and n.args[0].args[0] is sel)
    return sel.args[0], topk


def stats_rows(logits, prefix):
    """(B, H, M, N) logits -> (B, H, 2, N): the mean query row and the prefix queries' row."""
    mean = sum(logits[:, :, i] for i in range(logits.shape[2])) / logits.shape[2]
    first = sum(logits[:, :, i] for i in range(prefix)) / prefix if prefix else mean
    return torch.stack([mean, first], 2)


def expected_inputs(model, gm, values, kinds, prefix):
    """The selector inputs of layers 1, 2, ... computed from the blocks' weights by hand."""
    out, full_map, full_stats, idx_prev = [], None, None, None
    for layer, kind in enumerate(kinds, start=1):
        prev = model.blocks[layer - 1]
        x_prev = values[next(n for n in gm.graph.nodes if n.name == record_of(gm).analysis.blocks[layer - 1].input)]
        if idx_prev is not None:         # layer - 1 was selective: its attention saw its selected tokens only
            x_prev = x_prev.gather(1, idx_prev[..., None].expand(-1, -1, x_prev.shape[-1]))
        q, k, s = prev.qk(prev.n1(x_prev))
        logits = (q @ k.transpose(-2, -1)) * s
        if idx_prev is None:
            full_map, full_stats = logits, stats_rows(logits, prefix)
        else:
            if kinds[layer - 2] == "map":
                new_map = full_map.clone()
                b, h = logits.shape[:2]
                for bi in range(b):
                    sel = idx_prev[bi]
                    new_map[bi, :, sel[:, None], sel[None, :]] = logits[bi]
                full_map, full_stats = new_map, stats_rows(new_map, prefix)
            else:
                new_stats = full_stats.clone()
                sub = stats_rows(logits, prefix)
                for bi in range(logits.shape[0]):
                    new_stats[bi, :, :, idx_prev[bi]] = sub[bi]
                full_stats = new_stats
        out.append(full_map if kind == "map" else full_stats)
        idx_prev = values[selector_io(gm, layer)[1]]
    return out


CHAINS = [("sdpa", None, ("map", "pooled")), ("sdpa", None, ("pooled", "pooled")), ("sdpa", "kw", ("pooled", "map")),
          ("sdpa", "kw", ("map", "map")), ("sdpa", "pos6", ("pooled",)),
          ("softmax", None, ("map", "pooled")), ("softmax", None, ("pooled", "pooled")),
          ("mha", None, ("map", "pooled")), ("mha", None, ("pooled", "pooled")), ("mha", "cls", ("pooled", "pooled"))]


@pytest.mark.parametrize("style,scale,kinds", CHAINS, ids=lambda v: str(v))
def test_selectors_read_the_previous_layers_logits(style, scale, kinds):
    cls = style != "mha" or scale == "cls"
    model = vit(style, scale=scale, cls=cls)
    prefix = int(cls)
    if kinds == ("pooled", "map"):       # no full map exists after a pooled selector
        with pytest.raises(PlanError) as e:
            tokenopt.optimize(model, tosa_recipe(*kinds), report=False)
        assert str(e.value) == ("blocks.1 (the layer before a tosa layer): its selector read pooled statistics, so no "
                                "full attention map exists for the map selector after it.\n  Use the same selector "
                                "input in consecutive tosa layers.")
        kinds = ("pooled",)
    gm = tokenopt.optimize(model, tosa_recipe(*kinds), report=False)
    x = images()
    values = node_values(gm, x)
    want = expected_inputs(model, gm, values, kinds, prefix)
    for layer, w in enumerate(want, start=1):
        got = values[selector_io(gm, layer)[0]]
        assert got.shape == w.shape
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4)
        idx = values[selector_io(gm, layer)[1]]
        assert idx.shape == (2, prefix + 8)


class WindowBlock(Block):
    """Attention within 4 fixed windows of 4 tokens: no attention map over all tokens exists."""

    def forward(self, x):
        b, n, c = x.shape
        h = self.n1(x).reshape(b * 4, n // 4, c)
        q, k, v = self.qkv(h).reshape(b * 4, n // 4, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.n2(x))


def test_a_windowed_layer_before_a_selective_one_is_refused():
    model = vit("sdpa", cls=False)
    model.blocks[0] = WindowBlock(16, 2, "sdpa")
    from tokenopt.analysis import analyse
    model_refusal = analyse(model, images()).blocks[0].refusal
    assert model_refusal.startswith("windowed attention")
    with pytest.raises(PlanError) as e:
        tokenopt.optimize(model, tosa_recipe("map"), report=False)
    assert str(e.value) == ("blocks.0 (the layer before a tosa layer): its attention runs in windows, so it has no "
                            f"attention map over all tokens ({model_refusal}).")
    tokenopt.optimize(model, tosa_recipe("map", layers=[[2]]), report=False)     # after a global layer: fine


def test_selectors_are_submodules_with_the_recipes_shape():
    model = vit("sdpa")
    gm = tokenopt.optimize(model, {"version": 1, "rules": [
        {"pass": "tosa", "layers": 1, "keep": 4, "selector": {"input": "map", "hidden": 3, "kernel": 5,
                                                              "residual": False}},
        {"pass": "tosa", "layers": 2, "keep": 0.5, "selector": {"input": "map"}}]}, report=False)
    sel = tosa_pass.selectors(gm)
    assert sorted(sel) == [1, 2] and all(isinstance(s, selection.MapSelector) for s in sel.values())
    assert (sel[1].conv1.out_channels, sel[1].conv1.kernel_size, sel[1].residual, sel[1].heads) == (3, (5,), False, 2)
    assert (sel[2].conv1.out_channels, sel[2].conv1.kernel_size, sel[2].residual) == (64, (3,), True)
    assert gm.get_submodule("tosa_selectors.1") is sel[1]
    assert {k for k in gm.state_dict() if k.startswith("tosa_selectors.1.")} == {
        "tosa_selectors.1.trained", "tosa_selectors.1.conv1.weight", "tosa_selectors.1.conv1.bias",
        "tosa_selectors.1.conv2.weight", "tosa_selectors.1.conv2.bias"}
    # one check of the selectors before the first forward, however many tosa layers there are
    assert list(gm._forward_pre_hooks.values()).count(learned.check_trained) == 1
    # the selected tokens: every prefix token, then the top 4 (layer 1) and 8 of 16 (layer 2)
    values = node_values(gm, images())
    assert values[selector_io(gm, 1)[1]].shape == (2, 5) and values[selector_io(gm, 2)[1]].shape == (2, 9)


def test_bypassed_tokens_skip_the_block_or_only_the_attention():
    model = vit("sdpa")
    x = images()
    for bypass in ("block", "attention"):
        gm = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tosa", "layers": 1, "keep": 6,
                                                                "bypass": bypass}]}, report=False)
        values = node_values(gm, x)
        block = record_of(gm).analysis.blocks[1]
        x_in = values[next(n for n in gm.graph.nodes if n.name == block.input)]
        out = values[next(n for n in gm.graph.nodes if n.name == block.output)]
        idx = values[selector_io(gm, 1)[1]]
        blk = model.blocks[1]
        with torch.no_grad():
            want = x_in.clone()
            if bypass == "block":
                xs = x_in.gather(1, idx[..., None].expand(-1, -1, 16))
                want.scatter_(1, idx[..., None].expand(-1, -1, 16), blk(xs))
            else:        # attention among the selected, the MLP for every token
                xs = x_in.gather(1, idx[..., None].expand(-1, -1, 16))
                h = blk.n1(xs)
                b, n, c = h.shape
                q, k, v = blk.qkv(h).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
                a = blk.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
                mid = x_in.clone()
                mid.scatter_(1, idx[..., None].expand(-1, -1, 16), xs + a)
                want = mid + blk.mlp(blk.n2(mid))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        labels = set(record_of(gm).inserted.values())
        assert f"restore: bypassed tokens skip the {bypass}" in labels


def test_tosa_labels_and_overhead_name_the_selector_path():
    gm = tokenopt.optimize(vit("sdpa"), tosa_recipe("map", "pooled", keep=8), report=False)
    labels = sorted(record_of(gm).inserted.values())
    assert labels == sorted([
        "blocks.0 logits q k^T", "ToSA selector (map)", "token scores", "top-8 tokens (+ prefix)", "selected tokens",
        "restore: bypassed tokens skip the block",
        "blocks.1 logits q k^T", "logits of the selected tokens over the previous map", "blocks.1 logit stats",
        "ToSA selector (pooled)", "token scores", "top-8 tokens (+ prefix)", "selected tokens",
        "restore: bypassed tokens skip the block"])
    by_label = {}
    for name, site in record_of(gm).overhead.items():
        by_label.setdefault(site.block, set()).add(record_of(gm).inserted[name])
    assert by_label == {1: {"blocks.0 logits q k^T", "ToSA selector (map)", "token scores", "top-8 tokens (+ prefix)"},
                        2: {"blocks.1 logits q k^T", "logits of the selected tokens over the previous map",
                            "blocks.1 logit stats", "ToSA selector (pooled)", "token scores",
                            "top-8 tokens (+ prefix)"}}
    gm = tokenopt.optimize(vit("sdpa"), tosa_recipe("pooled"), report=False)
    assert sorted(record_of(gm).inserted.values()) == sorted([
        "blocks.0 logit stats", "ToSA selector (pooled)", "token scores", "top-8 tokens (+ prefix)", "selected tokens",
        "restore: bypassed tokens skip the block"])
    gm = tokenopt.optimize(vit("softmax"), tosa_recipe("pooled", "pooled"), report=False)
    labels = set(record_of(gm).inserted.values())
    assert {"blocks.0 logits", "blocks.0 logit stats", "blocks.1 logit stats",
            "logit stats of the selected tokens over the previous ones"} <= labels
    # an nn.MultiheadAttention is written out first (GraphRewriter.decompose_mha), then its q and k
    # are read like an SDPA's: logits q k^T for a map (or a map after a map), logit stats otherwise
    gm = tokenopt.optimize(vit("mha", cls=False), tosa_recipe("map", "pooled"), report=False)
    labels = set(record_of(gm).inserted.values())
    assert {"blocks.0 logits q k^T", "blocks.1 logits q k^T", "blocks.0.mha written out: k",
            "blocks.1.mha written out: k"} <= labels
    assert "blocks.1 logit stats" in labels and "blocks.0 logit stats" not in labels
    # writing the MHA out is the previous block's own work, not what choosing tokens costs
    overhead = {record_of(gm).inserted[n] for n in record_of(gm).overhead}
    assert "blocks.0 logits q k^T" in overhead and not any("written out" in o for o in overhead)
    gm = tokenopt.optimize(vit("mha", cls=False), tosa_recipe("pooled"), report=False)
    labels = set(record_of(gm).inserted.values())
    assert "blocks.0 logit stats" in labels and "blocks.0 logits q k^T" not in labels


def test_selectors_need_the_same_number_of_heads():
    model = vit("softmax", heads=(4, 2, 2))
    with pytest.raises(PlanError) as e:
        tokenopt.optimize(model, tosa_recipe("map"), report=False)
    assert str(e.value) == ("blocks.1: it has 2 attention heads and the layer before it 4; a ToSA selector predicts "
                            "one layer's heads from the other's.")
    tokenopt.optimize(model, tosa_recipe("map", layers=[[2]]), report=False)      # 2 after 2: fine


def test_heads_come_from_the_analysis():
    # (the old fallback to an nn.MultiheadAttention's num_heads is gone: ToSA writes an MHA out first
    # and reads block.attention.heads only)
    assert tosa_pass._heads(None, SimpleNamespace(attention=AttentionCore("sdpa", "n", heads=6))) == 6
    with pytest.raises(PlanError) as e:
        tosa_pass._heads(None, SimpleNamespace(path="blocks.4", attention=AttentionCore("sdpa", "n")))
    assert str(e.value) == ("blocks.4: cannot tell how many heads its attention has (needed by the ToSA selector of "
                            "the next layer)")


def test_region_stops_at_the_block_input():
    # ToSA's _ancestors became GraphRewriter.region(start, end): the same walk, end included
    from tokenopt.rewrite.rewriter import GraphRewriter
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,))
    b = g.call_function(torch.add, (a, x))
    c = g.call_function(torch.mul, (b, a))
    region = GraphRewriter.region(None, x, c)
    assert region == {a, b, c}
    assert GraphRewriter.region(None, a, c) == {b, x, c}


# ------------------------------------------------------------------------------------------------
# ToSA: options, plans, messages


def block(i, tokens=17, path=None):
    return BlockRecord(i, path or f"blocks.{i}", "x", AttentionCore("sdpa", "s", heads=2), "r", "m", "o", tokens, 16)


def test_tosa_layer_options_and_resolve():
    opts = ToSAOptions(keep=0.5)
    where = "r.yaml, line 3 (rule 1, pass tosa)"
    per = ToSA().layer_options(opts, 2, where)
    assert per == [tosa_pass.ToSAParams(0.5, "block", opts.selector, 0)] * 2
    assert ToSA().resolve(opts, per, [block(1), block(2)], {}, where) is per
    with pytest.raises(RecipeError) as e:
        ToSA().resolve(opts, per, [block(2), block(0, path="enc.0")], {}, where)
    assert str(e.value) == ("r.yaml, line 3 (rule 1, pass tosa): layer 0 (enc.0) cannot be selective: its selector reads "
                            "the attention of the layer before it, and there is none.\n  Start the layers at 1 "
                            "(e.g. \"1-11\") or use second-half.")
    assert ToSA.changes_token_count is False and ToSA().needs_calibration(opts) is False


@pytest.mark.parametrize("keep,prefix,k,describe", [
    (0.5, 1, 8, "attend 8/16 + 1 prefix, bypass block, selector map"),
    (0.3, 1, 5, "attend 5/16 + 1 prefix, bypass block, selector map"),     # round(4.8)
    (0.01, 0, 1, "attend 1/17, bypass block, selector map"),                # at least one token
    (16, 1, 16, "attend 16/16 + 1 prefix, bypass block, selector map"),
    (3, 2, 3, "attend 3/15 + 2 prefix, bypass block, selector map"),
])
def test_tosa_plan_layer(keep, prefix, k, describe):
    tokens = TokenCount.fixed(17)
    (params,) = ToSA().layer_options(ToSAOptions(keep=keep), 1, "w")
    step = ToSA().plan_layer(block(3), params, tokens, prefix)
    assert (step.tokens_out, step.describe, step.shortfall) == (17, describe, "")
    assert step.params == tosa_pass.ToSAParams(keep, "block", params.selector, k)
    (params,) = ToSA().layer_options(ToSAOptions(keep=keep, bypass="attention", selector={"input": "pooled"}), 1, "w")
    step = ToSA().plan_layer(block(3), params, tokens, prefix)
    assert step.describe == describe.replace("block", "attention").replace("map", "pooled")
    assert step.params.bypass == "attention" and step.params.selector.input == "pooled" and step.params.k == k


def test_tosa_plan_layer_errors():
    # (plan_layer's errors no longer carry the recipe line: make_plan prefixes it)
    (params,) = ToSA().layer_options(ToSAOptions(keep=17), 1, "w")
    with pytest.raises(RecipeError) as e:
        ToSA().plan_layer(block(3), params, TokenCount.fixed(17), 1)
    assert str(e.value) == ("keep=17 at blocks.3 (3), but it has only 16 tokens to select from (17 with 1 prefix "
                            "token(s), which always attend).\n  Use keep <= 16, or a fraction such as 0.5.")
    with pytest.raises(RecipeError) as e:
        ToSA().plan_layer(block(3), params, TokenCount.fixed(15), 1)
    assert str(e.value) == ("blocks.3 (3) gets 15 of its 17 tokens after an earlier merge; ToSA needs every token "
                            "in place (its selector reads the full attention of the layer before).\n  Apply tosa to "
                            "layers before the merging ones.")


# ------------------------------------------------------------------------------------------------
# ToSA: the check that selectors were trained


def test_untrained_selectors_warn_once_naming_the_layers():
    gm = tokenopt.optimize(vit("sdpa"), tosa_recipe("map", "map"), report=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            gm(images())
            gm(images())
    assert [w.category for w in caught] == [UntrainedSelectorWarning]
    assert str(caught[0].message) == (
        "ToSA selectors of layer(s) 1, 2 were never trained: they pick tokens by the previous layer's attention alone, "
        "which loses accuracy.\n  Train them: `tokenopt train RECIPE MODEL --data ...` "
        "(API: tokenopt.train.selector.train_selectors).")
    if "MUTANT_UNDER_TEST" not in os.environ:      # (mutmut's trampolines add stack frames)
        assert caught[0].filename == __file__       # points at the caller of model(x)


def test_untrained_selector_check_skips_and_refuses():
    def module(trained=(False,), **attrs):
        m = nn.Module()
        m.tosa_selectors = nn.Module()
        for i, t in enumerate(trained, start=1):
            s = selection.MapSelector(2, 4)
            s.trained.fill_(t)
            m.tosa_selectors.add_module(str(i), s)
        for k, v in attrs.items():
            if k == "recipe":
                update_record(m, recipe=v)      # what optimize() records on the module it returns
            else:
                setattr(m, k, v)
        return m

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained = module((True, True))
        tosa_pass.check_selectors_trained(trained, ())
        assert trained._tosa_checked is True
        tosa_pass.check_selectors_trained(module(_tosa_checked=True), ())
        tosa_pass.check_selectors_trained(module(tokenopt_training=True), ())
    strict = module((True, False), recipe=SimpleNamespace(strict=True))
    with pytest.raises(PlanError, match=r"(?s)layer\(s\) 2 were never trained.*\(refused because the recipe sets strict: "
                                        r"true\)$"):
        tosa_pass.check_selectors_trained(strict, ())
    assert not getattr(strict, "_tosa_checked", False)
    bare = module((False,))                       # a module that never went through optimize()
    with pytest.warns(UntrainedSelectorWarning):
        tosa_pass.check_selectors_trained(bare, ())
    lax = module((False,), recipe=SimpleNamespace(strict=False))
    with pytest.warns(UntrainedSelectorWarning, match=r"^ToSA selectors of layer\(s\) 1 were never trained"):
        tosa_pass.check_selectors_trained(lax, ())
    assert lax._tosa_checked is True


def test_untrained_selector_check_is_skipped_while_compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    m = nn.Module()
    m.tosa_selectors = nn.Module()
    m.tosa_selectors.add_module("1", selection.MapSelector(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tosa_pass.check_selectors_trained(m, ())
    assert not getattr(m, "_tosa_checked", False)


def test_selectors_are_found_by_name_and_type():
    m = nn.Module()
    m.tosa_selectors = nn.Module()
    a, b = selection.MapSelector(2, 4), selection.PooledSelector(2, 4)
    m.tosa_selectors.add_module("3", a)
    m.tosa_selectors.add_module("11", b)
    m.tosa_selectors.add_module("12", nn.Linear(2, 2))
    m.other = nn.Module()
    m.other.add_module("5", selection.MapSelector(2, 4))
    assert tosa_pass.selectors(m) == {3: a, 11: b}
    assert tosa_pass.SELECTOR_PREFIX == "tosa_selectors"


# ------------------------------------------------------------------------------------------------
# ToMe and ToFu: options, schedules, plans


def test_expand_r():
    assert expand_r(0, 3, "w") == [0, 0, 0] and expand_r(4, 2, "w") == [4, 4]
    r = [3, 0, 5]
    assert expand_r(r, 3, "w") == [3, 0, 5]
    assert expand_r(DecreasingSchedule(start=12, end=3), 4, "w") == [12, 9, 6, 3]
    assert expand_r(DecreasingSchedule(start=0, end=3), 3, "w") == [0, 2, 3]              # round(1.5) == 2
    assert expand_r(DecreasingSchedule(start=10, end=0), 5, "w") == [10, 8, 5, 2, 0]    # round(7.5), round(2.5)
    assert expand_r(DecreasingSchedule(start=7, end=1), 1, "w") == [7]
    with pytest.raises(RecipeError) as e:
        expand_r(-1, 3, "here")
    assert str(e.value) == "here: r must be >= 0, got -1"
    with pytest.raises(RecipeError) as e:
        expand_r([1, 2], 3, "here")
    assert str(e.value) == ("here: r lists 2 values but the rule selects 3 layers; give one value per selected layer")
    with pytest.raises(RecipeError) as e:
        expand_r([1, -2, 0], 3, "here")
    assert str(e.value) == "here: every r must be >= 0, got [1, -2, 0]"


def test_tome_layer_options_and_plan_layer():
    opts = ToMeOptions(r=[5, 1], prop_attn=False)
    per = ToMe().layer_options(opts, 2, "w")
    assert [(o.r, o.prop_attn) for o in per] == [(5, False), (1, False)]
    params = ToMe().layer_options(ToMeOptions(r=5), 1, "w")[0]
    assert params == ToMeParams(5, True, "original")
    step = ToMe().plan_layer(block(0), params, TokenCount.fixed(17), 1)
    assert (step.tokens_out, step.params.r, step.params.prop_attn, step.describe, step.shortfall) == (
        12, 5, True, "merge r=5", "")
    step = ToMe().plan_layer(block(0), replace(per[0], r=9), TokenCount.fixed(17), 2)
    assert (step.tokens_out, step.params.r, step.params.prop_attn, step.describe) == (10, 7, False, "merge r=7")
    assert step.shortfall == ("r=9 asked, but only 7 of its 17 tokens can merge (2 prefix token(s) are protected); "
                              "it merges 7")
    assert ToMe.changes_token_count is True and ToMe().needs_calibration(opts) is False
    assert ToMe.calibration_key is None and ToMe().calibrate(None, None, None) == {}


def test_tofu_options_resolve_and_plan():
    tofu = ToFu()
    assert tofu.needs_calibration(ToFuOptions(r=2, op="auto")) is True
    assert tofu.needs_calibration(ToFuOptions(r=2, op="prune")) is False
    assert ToFu.calibration_key == "linearity"
    auto = ToFuOptions(r=[3, 2, 1], op="auto", threshold=0.2, prop_attn=False)
    per = tofu.layer_options(auto, 3, "w")
    assert per == [ToFuParams(3, False, "original", "auto"), ToFuParams(2, False, "original", "auto"),
                   ToFuParams(1, False, "original", "auto")]
    prune = ToFuOptions(r=2, op="prune")
    fixed = tofu.layer_options(prune, 2, "w")
    assert tofu.resolve(prune, fixed, [block(0), block(1)], {}, "w") is fixed
    assert tofu.resolve(auto, [], [], {}, "w") == []
    blocks = [block(1), block(3), block(4)]
    profile = [9.0, 0.5, 9.0, 0.1, 0.2]          # indexed by block, not by position among the selected
    got = tofu.resolve(auto, per, blocks, {"linearity": profile}, "w")
    assert [(o.op, o.linearity, o.r) for o in got] == [("prune", 0.5, 3), ("mlerp", 0.1, 2), ("prune", 0.2, 1)]
    median_opts = ToFuOptions(r=1, op="auto")
    median = tofu.layer_options(median_opts, 3, "w")
    got = tofu.resolve(median_opts, median, blocks, {"linearity": profile}, "w")   # median 0.2: at or above it prunes
    assert [o.op for o in got] == ["prune", "mlerp", "prune"]
    with pytest.raises(RecipeError) as e:
        tofu.resolve(median_opts, median, blocks, {}, "w")
    assert str(e.value) == (
        "w: op: auto needs calibration images to measure each block's linearity.\n"
        "  API: tokenopt.optimize(model, recipe, calibration=images); CLI: --calibration digits|DIR; "
        "or run `tokenopt probe MODEL --data ...` and use the recipe it writes.")
    step = tofu.plan_layer(block(0), replace(got[0], r=3), TokenCount.fixed(17), 1)
    assert (step.params.op, step.params.r, step.describe) == ("prune", 3, "prune r=3 (linearity error 0.500)")
    step = tofu.plan_layer(block(0), tofu.layer_options(ToFuOptions(r=20, op="mlerp"), 1, "w")[0], TokenCount.fixed(17), 1)
    assert (step.params.op, step.describe, step.tokens_out) == ("mlerp", "mlerp r=8", 9)


def test_one_selected_layer_and_where_errors_point():
    tofu = ToFu()
    opts = ToFuOptions(r=2, op="auto")
    one = tofu.layer_options(opts, 1, "w")
    assert [o.op for o in tofu.resolve(opts, one, [block(2)], {"linearity": [0, 0, 0.4]}, "w")] == ["prune"]   # its own median
    opts = ToFuOptions(r=2, op="auto", threshold=0.5)
    one = tofu.layer_options(opts, 1, "w")
    assert [o.op for o in tofu.resolve(opts, one, [block(2)], {"linearity": [0, 0, 0.4]}, "w")] == ["mlerp"]
    with pytest.raises(RecipeError, match=r"^w: op: auto needs calibration"):
        tofu.resolve(opts, one, [block(2)], {}, "w")
    opts = ToFuOptions(r=2, op="mlerp")
    fixed = tofu.layer_options(opts, 1, "w")
    assert tofu.resolve(opts, fixed, [block(0)], {}, "w") is fixed
    for p, opts in ((ToMe(), ToMeOptions(r=[1, 2])), (ToFu(), ToFuOptions(r=[1, 2]))):
        with pytest.raises(RecipeError, match=r"^rule 7: r lists 2 values but the rule selects 3 layers"):
            p.layer_options(opts, 3, "rule 7")


def test_tofu_steps_use_the_recipes_order():
    """order: rank reaches the ToFu step of every layer (prefix-free model: the order changes results)."""
    model = vit("sdpa", cls=False)
    x = images()
    for order in ("original", "rank"):
        gm = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tofu", "r": 3, "op": "prune", "order": order}]},
                               report=False)
        values = node_values(gm, x)
        steps = [n for n in gm.graph.nodes if n.target is tome_ops.tofu_reduce]
        assert len(steps) == 3
        for n in steps:
            args = [values[a] if isinstance(a, fx.Node) else a for a in n.args]
            with torch.no_grad():
                want = tome_ops.tofu_reduce(*args, order=order)
            assert torch.equal(values[n][0], want[0])


def test_tome_and_tofu_rewrites_insert_their_steps():
    x = images()
    model = vit("sdpa")
    for rules, want in (
            ([{"pass": "tome", "r": 3}], ["ToMe merge r=3"] * 3),
            ([{"pass": "tofu", "r": [2, 1, 3], "op": "prune"}], ["ToFu prune r=2", "ToFu prune r=1", "ToFu prune r=3"]),
            ([{"pass": "tofu", "r": 2, "op": "mlerp", "layers": [0, 2]}], ["ToFu mlerp r=2"] * 2)):
        gm = tokenopt.optimize(model, {"version": 1, "rules": rules}, outputs="tokens", report=False)
        steps = [n for n in gm.graph.nodes if n.target in (tome_ops.tome_merge, tome_ops.tofu_reduce)]
        assert [record_of(gm).inserted[n.name] for n in steps] == want
        labels = list(record_of(gm).inserted.values())
        assert labels.count("merged tokens") == labels.count("token sizes") == labels.count("token index map") - 1 \
            == len(want)
        op = rules[0].get("op")
        for n in steps:   # tokens, metric, size, index, r, prefix (, op)
            assert n.args[5] == 1 and isinstance(n.args[4], int)
            if op:
                assert n.args[6] == op
        with torch.no_grad():
            out = gm(x)
        assert out.shape == (2, 16, 16)
        # logits only: no token index map is tracked, so no step hands one on
        gm = tokenopt.optimize(model, {"version": 1, "rules": rules}, report=False)
        assert "token index map" not in record_of(gm).inserted.values()
        steps = [n for n in gm.graph.nodes if n.target in (tome_ops.tome_merge, tome_ops.tofu_reduce)]
        assert len(steps) == len(want)
        assert all(u.target is operator.getitem for n in steps for u in n.users)
        assert 2 not in [u.args[1] for n in steps for u in n.users]


def test_tome_r0_leaves_the_graph_untouched_but_sets_proportional_attention():
    model = vit("sdpa")
    gm = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tome", "r": 0}]}, report=False)
    assert record_of(gm).inserted == {}
    with torch.no_grad():
        assert torch.equal(gm(images()), model(images()))
    # after a real merge, later blocks add log(size) to their attention unless prop_attn is off
    for prop_attn in (True, False):
        gm = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tome", "r": 2, "prop_attn": prop_attn}]},
                               report=False)
        # (GraphRewriter.begin_block: key_log_size(size) per key, merged into SDPA's attn_mask)
        masks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is attn_ops.sdpa_mask_with_key_bias]
        biases = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is tome_ops.key_log_size]
        assert len(masks) == len(biases) == (2 if prop_attn else 0)
        assert all(m.args[0] is b for m, b in zip(masks, biases))


def test_pass_registry():
    assert available_passes() == sorted(available_passes()) and {"tome", "tofu", "tosa"} <= set(available_passes())
    assert get_pass("tome") is ToMe and get_pass("tofu") is ToFu and get_pass("tosa") is ToSA
    assert (ToMe.name, ToFu.name, ToSA.name) == ("tome", "tofu", "tosa")
    saved = dict(passes_base._REGISTRY)
    try:
        @register_pass("zz-test")
        class Mine(Pass):
            pass
        assert Mine.name == "zz-test" and get_pass("zz-test") is Mine and available_passes()[-1] == "zz-test"
        assert Mine().needs_calibration(PassOptions()) is False
        assert Mine.calibration_key is None and Mine().calibrate(None, None, None) == {}
        with pytest.raises(NotImplementedError):
            Mine().layer_options(PassOptions(), 3, "w")
        per = [SimpleNamespace(a=1)]
        assert Mine().resolve(PassOptions(), per, [], {}, "w") is per
        assert Mine().refuse(SimpleNamespace(refusal="why")) == "why"
        with pytest.raises(NotImplementedError):
            Mine().plan_layer(None, None, TokenCount.fixed(1), 0)
        with pytest.raises(NotImplementedError):
            Mine().rewrite(None, None, None)
    finally:
        passes_base._REGISTRY.clear()
        passes_base._REGISTRY.update(saved)


# ------------------------------------------------------------------------------------------------
# ToFu's linearity probe (tokenopt.passes.linearity) and its use in planning


def block_inputs_by_hand(model, x):
    """The input of every block of a ``ViT`` above, by running its modules in order."""
    t = model.embed(x).flatten(2).transpose(1, 2)
    if model.cls is not None:
        t = torch.cat([model.cls.expand(t.shape[0], -1, -1), t], dim=1)
    t = t + model.pos
    inputs = []
    for blk in model.blocks:
        inputs.append(t)
        t = blk(t)
    return inputs


def linearity_by_hand(model, x, alphas):
    errors = []
    with torch.no_grad():
        for blk, t in zip(model.blocks, block_inputs_by_hand(model, x)):
            half = t.shape[0] // 2
            x1, x2 = t[:half], t[half:2 * half]
            total = 0.0
            for a in alphas:
                lin = a * blk(x1) + (1 - a) * blk(x2)
                total += float((blk(a * x1 + (1 - a) * x2) - lin).norm() / max(float(lin.norm()), 1e-12))
            errors.append(total / len(alphas))
    return errors


def test_linearity_profile_by_hand():
    from tokenopt.passes.linearity import linearity_profile
    model = vit("sdpa")
    x = images(5, seed=3)                          # odd: pairs are images (0, 2) and (1, 3); the 5th is unused
    prof = linearity_profile(model, x)
    assert prof.paths == ["blocks.0", "blocks.1", "blocks.2"] and prof.images == 5
    assert prof.alphas == (0.25, 0.5, 0.75)
    assert prof.errors == pytest.approx(linearity_by_hand(model, x, (0.25, 0.5, 0.75)), rel=1e-4)
    assert min(prof.errors) > 0
    prof = linearity_profile(model, x[:2], alphas=[0.1])
    assert prof.alphas == (0.1,) and prof.images == 2
    assert prof.errors == pytest.approx(linearity_by_hand(model, x[:2], (0.1,)), rel=1e-4)
    with pytest.raises(tokenopt.errors.AnalysisError) as e:
        linearity_profile(model, x[:1])
    assert str(e.value) == "the linearity probe needs at least 2 calibration images (it interpolates pairs)"


def test_linearity_profile_of_small_outputs():
    """Block outputs with a norm below 1: the error is divided by that norm, not by a floor."""
    from tokenopt.passes.linearity import linearity_profile
    model = vit("sdpa", cls=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-3)
    x = images(2, seed=4) * 1e-3
    prof = linearity_profile(model, x, alphas=(0.5,))
    with torch.no_grad():
        for blk, t in zip(model.blocks, block_inputs_by_hand(model, x)):
            assert float((0.5 * blk(t[:1]) + 0.5 * blk(t[1:])).norm()) < 1
    assert prof.errors == pytest.approx(linearity_by_hand(model, x, (0.5,)), rel=1e-3)


class BranchyMLP(nn.Module):
    """Python control flow on a tensor value: fx traces the model only with this as a leaf."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc(x) if bool(x.sum() > -1e9) else x


def test_calibration_measures_on_the_analysed_graph():
    """ToFu's calibrate probes the model as optimize analysed it (its leaf modules included)."""
    model = vit("sdpa")
    for blk in model.blocks:
        blk.mlp = BranchyMLP(16)
    x = images(4, seed=5)
    from tokenopt.analysis import analyse
    from tokenopt.passes.linearity import linearity_profile
    analysis = analyse(model, x[:2], leaf_modules=[BranchyMLP])
    got = ToFu().calibrate(model, analysis, x)
    assert list(got) == ["linearity"]
    assert got["linearity"] == pytest.approx(linearity_by_hand(model, x, (0.25, 0.5, 0.75)), rel=1e-4)
    assert linearity_profile(model, x, leaf_modules=[BranchyMLP]).errors == pytest.approx(got["linearity"])
    gm = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tofu", "r": 2, "op": "auto"}]},
                           leaf_modules=[BranchyMLP], calibration=x, report=False)
    assert record_of(gm).context["linearity"] == pytest.approx(got["linearity"])


def test_a_profile_shorter_than_the_model_is_refused():
    tofu = ToFu()
    opts = ToFuOptions(r=1, op="auto")
    per = tofu.layer_options(opts, 2, "w")
    assert [o.op for o in tofu.resolve(opts, per, [block(1), block(3)], {"linearity": [0, 1, 0, 2]}, "w")] \
        == ["mlerp", "prune"]
    for short in ([0, 1, 0], [0.5]):
        with pytest.raises(RecipeError) as e:
            tofu.resolve(opts, per, [block(1), block(3)], {"linearity": short}, "w")
        assert str(e.value) == (f"w: the linearity profile has {len(short)} values but the model has more blocks; it "
                                "was measured on another model. Measure it again on this one.")


def test_tome_metric_node_is_labelled():
    gm = tokenopt.optimize(vit("sdpa"), {"version": 1, "rules": [{"pass": "tome", "r": 2}]}, report=False)
    metrics = [n for n in gm.graph.nodes if n.target is tome_ops.keys_per_token]
    assert len(metrics) == 3
    assert {record_of(gm).inserted[n.name] for n in metrics} == {"metric: keys (mean over heads taken by the matching)"}


def test_linearity_profile_analyses_the_calibration_images():
    """A model that runs only on 8 x 16 images (no input size tokenopt could guess) is probed on
    the images given, not on a guessed example batch."""
    from tokenopt.passes.linearity import linearity_profile
    model = vit("sdpa")
    model.pos = nn.Parameter(torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(6)) * 0.5)
    x = torch.randn(4, 3, 8, 16, generator=torch.Generator().manual_seed(7))
    prof = linearity_profile(model, x)
    assert prof.errors == pytest.approx(linearity_by_hand(model, x, (0.25, 0.5, 0.75)), rel=1e-4)
