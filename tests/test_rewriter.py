"""GraphRewriter primitives on tiny graphs, for each attention kind.

One small ViT is written three ways with the same weights: explicit softmax(q k^T * scale) v,
fused SDPA, and nn.MultiheadAttention. Whatever a primitive does must give the same numbers on
all three, and equal a reference written out here.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import tokenopt
from tokenopt.analysis import ShapeRecorder, analyse, analyse_graph
from tokenopt.errors import PlanError
from tokenopt.rewrite import GraphRewriter
from tokenopt.record import record_of

DIM, HEADS, DEPTH = 32, 4, 4


class Attention(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "mha":
            self.mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        else:
            self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        if self.kind == "mha":
            return self.mha(x, x, x, need_weights=False)[0]
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        if self.kind == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = ((q @ k.transpose(-2, -1)) * (c // HEADS) ** -0.5).softmax(dim=-1) @ v
        return self.proj(a.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = Attention(kind)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class ViT(nn.Module):
    def __init__(self, kind: str, depth: int = DEPTH):
        super().__init__()
        self.embed = nn.Conv2d(3, DIM, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, DIM) * 0.02)
        self.blocks = nn.ModuleList(Block(kind) for _ in range(depth))
        self.head = nn.Linear(DIM, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(x[:, 0])


def three_vits(depth=DEPTH):
    """The same weights as explicit, sdpa and mha models (MHA's in_proj is the qkv linear)."""
    torch.manual_seed(0)
    base = ViT("softmax", depth).eval()
    models = {"softmax": base}
    for kind in ("sdpa", "mha"):
        m = ViT(kind, depth).eval()
        state = base.state_dict()
        if kind == "mha":
            for i in range(depth):
                p = f"blocks.{i}.attn."
                state[p + "mha.in_proj_weight"] = state.pop(p + "qkv.weight")
                state[p + "mha.in_proj_bias"] = state.pop(p + "qkv.bias")
                state[p + "mha.out_proj.weight"] = state.pop(p + "proj.weight")
                state[p + "mha.out_proj.bias"] = state.pop(p + "proj.bias")
        m.load_state_dict(state)
        models[kind] = m
    return models


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def key_ramp(x: torch.Tensor) -> torch.Tensor:
    """A (B, N) bias per key from the token stream (B, N, C): -0.1 * key position, per image offset."""
    b, n, _ = x.shape
    return -0.1 * torch.arange(n, dtype=x.dtype)[None, :] + 0.05 * torch.arange(b, dtype=x.dtype)[:, None]


def by_hand(model: ViT, x: torch.Tensor, bias_block: int | None = None) -> torch.Tensor:
    """The explicit model's forward, with key_ramp added to one block's logits before the softmax."""
    h = model.embed(x).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls.expand(h.shape[0], -1, -1), h], dim=1) + model.pos
    for i, blk in enumerate(model.blocks):
        t = blk.n1(h)
        b, n, c = t.shape
        q, k, v = blk.attn.qkv(t).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * (c // HEADS) ** -0.5
        if i == bias_block:
            logits = logits + key_ramp(h)[:, None, None, :]
        h = h + blk.attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))
        h = h + blk.mlp(blk.n2(h))
    return model.head(h[:, 0])


def rewriter(model, x):
    a = analyse(model, x)
    return GraphRewriter(a), a


# ------------------------------------------------------------------------------------------------
# generic primitives


def test_region_and_reroute_move_only_the_consumers_inside():
    class F2(nn.Module):
        def forward(self, x):
            a = x + 1
            b = a * 2          # inside the region a -> c
            c = b - 3
            d = a / 4          # outside: reads a, not on the way to c
            return c + d

    gm = fx.symbolic_trace(F2())
    g = GraphRewriter(type("Analysis", (), {"graph": gm})())   # the primitives need only the graph
    a, c = g.node("add"), g.node("sub")
    region = g.region(a, c)
    assert {n.name for n in region} == {"mul", "sub"}
    zero = g.insert_after(a, torch.zeros_like, a, label="zeros")
    assert g.reroute(a, zero, region) == 1
    gm = g.finish()
    x = torch.tensor([1.0, 2.0])
    # b = 0 * 2, c = -3; d = (x + 1) / 4 still reads a
    assert torch.equal(gm(x), torch.tensor([-3.0, -3.0]) + (x + 1) / 4)


@pytest.mark.parametrize("kind", ["softmax", "sdpa", "mha"])
def test_add_attention_bias_equals_the_reference_for_every_kind(kind):
    models = three_vits()
    x = images()
    g, a = rewriter(models[kind], x)
    blk = a.blocks[2]
    g.add_attention_bias(blk, key_ramp, g.node(blk.input))
    gm = g.finish()
    with torch.no_grad():
        want = by_hand(models["softmax"], x, bias_block=2)
        torch.testing.assert_close(gm(x), want, rtol=0, atol=2e-5)
        assert (gm(x) - models[kind](x)).abs().max() > 1e-3          # the bias changed something


@pytest.mark.parametrize("kind", ["sdpa", "mha"])
def test_attention_bias_keeps_the_models_own_boolean_mask(kind):
    """A boolean mask of the model stays in force: SDPA True = attend, MHA True = ignore."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.qkv, self.mha = nn.Linear(DIM, 3 * DIM), nn.MultiheadAttention(DIM, HEADS, batch_first=True)
            self.mlp = nn.Linear(DIM, DIM)

        def forward(self, x, allowed):
            b, n, c = x.shape
            if kind == "sdpa":
                q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :])
                h = x + a.transpose(1, 2).reshape(b, n, c)
            else:
                h = x + self.mha(x, x, x, key_padding_mask=~allowed, need_weights=False)[0]
            return h + self.mlp(h)

    m = Masked().eval()
    gm = fx.symbolic_trace(m)
    x = torch.randn(2, 6, DIM)
    allowed = torch.ones(2, 6, dtype=torch.bool)
    allowed[0, 2] = allowed[1, 5] = False
    ShapeRecorder(gm).run(x, allowed)            # a graph with two inputs: analysed as captured
    a = analyse_graph(gm, m, tuple(x.shape), prefix_tokens=0)
    g = GraphRewriter(a)
    g.add_attention_bias(a.blocks[0], key_ramp, g.node(a.blocks[0].input))
    out = g.finish()(x, allowed)
    # reference: the bias and the mask together, by hand
    with torch.no_grad():
        if kind == "sdpa":
            q, k, v = m.qkv(x).reshape(2, 6, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = F.linear(x, m.mha.in_proj_weight, m.mha.in_proj_bias).reshape(2, 6, 3, HEADS, -1).permute(
                2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) * (DIM // HEADS) ** -0.5 + key_ramp(x)[:, None, None, :]
        logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
        a_ = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, DIM)
        h = x + (a_ if kind == "sdpa" else m.mha.out_proj(a_))
        torch.testing.assert_close(out, h + m.mlp(h), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "sdpa", "mha"])
def test_replace_attention_with_a_written_out_attention_is_the_original(kind):
    calls = []

    def reference_attention(q, k, v, attn_mask=None, scale=None, **kw):
        calls.append(scale)
        s = q.shape[-1] ** -0.5 if scale is None else scale
        logits = (q @ k.transpose(-2, -1)) * s
        if attn_mask is not None:
            logits = logits + attn_mask
        return logits.softmax(-1) @ v

    models = three_vits()
    x = images()
    g, a = rewriter(models[kind], x)
    for blk in a.blocks:
        g.replace_attention(blk, reference_attention)
    gm = g.finish()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), models[kind](x), rtol=0, atol=2e-5)
    assert len(calls) == DEPTH
    # the explicit chain's scale is read from the graph; SDPA's default (None) is kept
    assert calls == [pytest.approx((DIM // HEADS) ** -0.5)] * DEPTH if kind == "softmax" else calls == [None] * DEPTH
    assert all(g.core(b).kind == "sdpa" for b in a.blocks)
    assert all(b.attention.kind == kind for b in a.blocks)     # the analysis's records stay as analysed


def test_replace_attention_really_replaces_the_core():
    models = three_vits()
    x = images()
    g, a = rewriter(models["softmax"], x)
    g.replace_attention(a.blocks[1], lambda q, k, v, attn_mask=None, scale=None: torch.zeros_like(v))
    gm = g.finish()
    assert not any(n.op == "call_method" and n.target == "softmax" and "blocks_1" in n.name for n in gm.graph.nodes)
    with torch.no_grad():
        m = models["softmax"]
        h = m.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([m.cls.expand(3, -1, -1), h], 1) + m.pos
        h = m.blocks[0](h)
        h = h + m.blocks[1].attn.proj(torch.zeros_like(h))
        h = h + m.blocks[1].mlp(m.blocks[1].n2(h))
        for blk in m.blocks[2:]:
            h = blk(h)
        torch.testing.assert_close(gm(x), m.head(h[:, 0]), rtol=0, atol=1e-5)


def test_scale_that_is_not_a_constant_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(DIM, 3 * DIM)
            self.t = nn.Parameter(torch.ones(1))

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
            a = ((q @ k.transpose(-2, -1)) * self.t).softmax(-1) @ v
            h = x + a.transpose(1, 2).reshape(b, n, c)
            return h + h.relu()

    m = Odd()
    a = analyse(m, torch.randn(2, 5, DIM))
    g = GraphRewriter(a)
    with pytest.raises(PlanError, match="constant scale"):
        g.attention_scale(a.blocks[0])


# ------------------------------------------------------------------------------------------------
# nn.MultiheadAttention written out


@pytest.mark.parametrize("use", ["output", "weights", "weights-per-head"])
def test_decomposed_mha_equals_the_module(use):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
            self.mlp = nn.Linear(DIM, DIM)

        def forward(self, x, allowed, bias):
            o, w = self.mha(x, x, x, key_padding_mask=~allowed, attn_mask=bias, need_weights=use != "output",
                            average_attn_weights=use == "weights")
            h = x + o
            h = h + self.mlp(h)
            return (h, w) if use != "output" else h

    m = M().eval()
    x = torch.randn(2, 7, DIM)
    allowed = torch.ones(2, 7, dtype=torch.bool)
    allowed[1, 3] = False
    bias = torch.randn(7, 7)
    gm = fx.symbolic_trace(m)
    ShapeRecorder(gm).run(x, allowed, bias)
    a = analyse_graph(gm, m, tuple(x.shape), prefix_tokens=0)
    g = GraphRewriter(a)
    g.decompose_mha(a.blocks[0])
    assert g.core(a.blocks[0]).kind == ("sdpa" if use == "output" else "softmax")
    out = g.finish()
    assert not any(n.op == "call_module" and n.target == "mha" for n in out.graph.nodes)
    with torch.no_grad():
        got, want = out(x, allowed, bias), m(x, allowed, bias)
    if use == "output":
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
        assert got[1].shape == want[1].shape
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)


def test_decomposed_mha_keeps_dropout_in_training_only():
    torch.manual_seed(0)
    m = nn.Sequential()
    blk = Block("mha")
    blk.attn.mha.dropout = 0.5
    m = ViT("mha", depth=1)
    m.blocks[0].attn.mha.dropout = 0.5
    x = images(2)
    g, a = rewriter(m.eval(), x)
    g.decompose_mha(a.blocks[0])
    gm = g.finish().eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=0, atol=1e-6)
        gm.train()
        torch.manual_seed(1)
        first = gm(x)
        torch.manual_seed(2)
        assert not torch.equal(first, gm(x))                   # dropout draws differ: it is on


def test_tome_cuts_the_same_flops_with_mha_as_with_explicit_attention():
    """ToMe needs the keys: with the MHA written out they are the attention's own, no second
    projection, so the FLOP cut equals the explicit model's (within 0.5 point)."""
    models = three_vits()
    cut = {}
    for kind, m in models.items():
        rep = record_of(tokenopt.optimize(m, {"version": 1, "rules": [{"pass": "tome", "r": 4}]})).report
        cut[kind] = 100 * (1 - rep.flops_after / rep.flops_before)
    assert cut["softmax"] > 10
    assert abs(cut["mha"] - cut["softmax"]) < 0.5, cut
    assert abs(cut["sdpa"] - cut["softmax"]) < 0.5, cut
    # and the merged models agree with each other (same weights, same merges)
    x = images()
    outs = {k: tokenopt.optimize(m, {"version": 1, "rules": [{"pass": "tome", "r": 4}]}, report=False)
            for k, m in models.items()}
    with torch.no_grad():
        ref = outs["softmax"](x)
        for k in ("sdpa", "mha"):
            torch.testing.assert_close(outs[k](x), ref, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# isolate_attention (SPA): attention over per-image token sets


def first_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B,) tokens per image for the isolate_attention test: all 17, then 10, then 5."""
    return torch.tensor([17, 10, 5][: x.shape[0]])


def by_hand_first_tokens(model: ViT, x: torch.Tensor) -> torch.Tensor:
    """The explicit model where image i's keys past its first lengths[i] tokens are never attended."""
    lengths = first_tokens(x)
    h = model.embed(x).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls.expand(h.shape[0], -1, -1), h], dim=1) + model.pos
    allowed = torch.arange(17)[None, :] < lengths[:, None]
    for blk in model.blocks:
        t = blk.n1(h)
        b, n, c = t.shape
        q, k, v = blk.attn.qkv(t).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        logits = ((q @ k.transpose(-2, -1)) * (c // HEADS) ** -0.5).masked_fill(~allowed[:, None, None, :],
                                                                                  float("-inf"))
        h = h + blk.attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))
        h = h + blk.mlp(blk.n2(h))
    return model.head(h[:, 0])


@pytest.mark.parametrize("kind", ["softmax", "sdpa", "mha"])
def test_isolate_attention_attends_within_each_images_tokens(kind):
    """Padded layout: image i's tokens are its first lengths[i] slots; the rest are never keys."""
    from tokenopt.ops import packing
    from tokenopt.tokens import Packed

    models = three_vits()
    x = images()
    g, a = rewriter(models[kind], x)
    x0 = g.node(a.blocks[0].input)
    lengths = g.insert_after(x0, first_tokens, x0, label="lengths")
    layout = Packed(lengths.name, lengths.name, capacity=17, layout="padded")
    cores = [g.isolate_attention(blk, lengths, layout) for blk in a.blocks]
    again = g.isolate_attention(a.blocks[0], lengths, Packed(lengths.name, lengths.name, capacity=17,
                                                               layout="padded", strategy="loop"))
    assert again is cores[0] and again.kwargs["strategy"] == "loop"      # updated in place, not wrapped twice
    assert all(c.target is packing.isolated_attention for c in cores)
    gm = g.finish()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), by_hand_first_tokens(models["softmax"], x), rtol=0, atol=1e-5)


def test_isolate_attention_refuses_a_models_own_mask():
    from tokenopt.tokens import Packed

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.mlp = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

        def forward(self, x, allowed):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
            h = x + F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :]).transpose(
                1, 2).reshape(b, n, c)
            return h + self.mlp(h)

    m = Masked().eval()
    gm = fx.symbolic_trace(m)
    x = torch.randn(2, 6, DIM)
    ShapeRecorder(gm).run(x, torch.ones(2, 6, dtype=torch.bool))
    a = analyse_graph(gm, m, tuple(x.shape), prefix_tokens=0)
    g = GraphRewriter(a)
    x0 = g.node(a.blocks[0].input)
    with pytest.raises(PlanError, match="mask of its own"):
        g.isolate_attention(a.blocks[0], x0, Packed("x", "x"))
