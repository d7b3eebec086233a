"""ToSA picks the right tokens, and learns from the right attention.

Every reference here is computed by hand in the test: q and k from the model's own weights,
``softmax(q k^T / sqrt(d))`` in float64, column sums and top-k by sorting, per image. Nothing
below calls tokenopt's ops to build an expected value; tokenopt is only run and observed (its
selector outputs, the positions its blocks changed, its training target and KL).
"""
from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F

import tokenopt
from tokenopt.passes.tosa import UntrainedSelectorWarning, selectors
from tokenopt.record import record_of
from vit_models import ExplicitViT, MHAViT

B = 4


def peaked_timm():
    """Tiny timm ViT (fused SDPA). timm's init gives near-uniform attention, where column sums
    tie to a few 1e-4 and any top-k is a coin toss; sharper q/k weights make the answer clear."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, depth=3, num_classes=10,
                              embed_dim=48, num_heads=4).eval()
    with torch.no_grad():
        for blk in model.blocks:
            assert isinstance(blk.attn.q_norm, torch.nn.Identity) and isinstance(blk.attn.k_norm, torch.nn.Identity)
            blk.attn.qkv.weight[:96] *= 4
    return model


def own_vit(kind):
    torch.manual_seed(0)
    model = (ExplicitViT(img=32, patch=4, dim=48, depth=3) if kind == "softmax" else
             MHAViT(img=32, patch=4, dim=48, depth=3)).eval()
    if kind == "mha":
        with torch.no_grad():
            for blk in model.blocks:
                blk.mha.in_proj_weight[:96] *= 2
    return model


MODELS = {"sdpa": peaked_timm, "softmax": lambda: own_vit("softmax"), "mha": lambda: own_vit("mha")}
PREFIX = {"sdpa": 1, "softmax": 1, "mha": 0}


def recipe(input):
    return {"version": 1, "rules": [{"pass": "tosa", "layers": "1-2", "keep": 0.5, "bypass": "block",
                                     "selector": {"input": input, "hidden": 8}}]}


_CACHE: dict = {}


def rewritten(kind, input):
    """(model, its ToSA rewrite on layers 1-2, keep 0.5 = 32 of 64 patch tokens), built once per module.
    Tests that change the selectors put them back."""
    if (kind, input) not in _CACHE:
        model = MODELS[kind]()
        _CACHE[kind, input] = model, tokenopt.optimize(model, recipe(input), images(2), report=False)
    return _CACHE[kind, input]


def images(n=B, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# references by hand


def blocks_of(model):
    return model.blocks if hasattr(model, "blocks") else model.layers


def block_inputs(model, x) -> list[torch.Tensor]:
    """The token stream entering each block of the original model (forward pre-hooks)."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for b in blocks_of(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def logits_by_hand(model, kind, i, h) -> torch.Tensor:
    """q k^T / sqrt(d) of block i on token stream h (B, n, C), per head, float64: (B, H, n, n)."""
    blk = blocks_of(model)[i]
    b, n, c = h.shape
    if kind == "sdpa":
        heads, qkv = blk.attn.num_heads, blk.attn.qkv(blk.norm1(h))
    elif kind == "softmax":
        heads, qkv = blk.attn.heads, blk.attn.to_qkv(blk.ln1(h))
    else:
        heads, qkv = blk.mha.num_heads, F.linear(blk.n1(h), blk.mha.in_proj_weight, blk.mha.in_proj_bias)
    q, k, _ = qkv.double().reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    return q @ k.transpose(-2, -1) / math.sqrt(c // heads)


def pooled_rows(logits, prefix):
    """(B, H, n, n) -> (B, H, 2, n): mean query row, and prefix query row (mean row without prefix)."""
    mean = logits.mean(-2, keepdim=True)
    first = logits[..., :prefix, :].mean(-2, keepdim=True) if prefix else mean
    return torch.cat([mean, first], -2)


def top_k_by_hand(scores, k, prefix) -> list[list[int]]:
    """Per image: prefix positions, then the k highest-scoring others in ascending position.

    Asserts a clear gap at the k-th place so a float32 vs float64 difference cannot flip it."""
    out = []
    for s in scores.double():
        order = sorted(range(prefix, len(s)), key=lambda j: -float(s[j]))
        assert float(s[order[k - 1]] - s[order[k]]) > 1e-5 * float(s.abs().max()), "ill-posed: near tie at k"
        out.append(list(range(prefix)) + sorted(order[:k]))
    return out


def run_keeping(gm, x, targets: set[str]) -> dict:
    """Run gm with an fx Interpreter and keep the values of the named nodes."""
    kept = {}

    class Keep(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in targets:
                kept[n.name] = out
            return out

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedSelectorWarning)
        Keep(gm).run(x)
    return kept


def selector_node(gm, i):
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == f"tosa_selectors.{i}")


def observe(gm, x, layers):
    """Per selective layer: (selector output, block input, block output) as the rewritten model ran."""
    blocks = record_of(gm).analysis.blocks
    names = {i: (selector_node(gm, i).name, blocks[i].input, blocks[i].output) for i in layers}
    kept = run_keeping(gm, x, {n for t in names.values() for n in t})
    return {i: tuple(kept[n] for n in t) for i, t in names.items()}


def positions_run(block_in, block_out) -> list[list[int]]:
    """Per image, the positions the block changed: the tokens that actually went through it."""
    return [torch.nonzero((o != i).any(-1)).flatten().tolist() for i, o in zip(block_in, block_out)]


def expected_prediction(logits, input, prefix):
    """What an untrained residual selector (conv2 = 0) predicts: the softmax of what it reads."""
    if input == "map":
        return logits.softmax(-1)
    return pooled_rows(logits, prefix)[:, :, 0].softmax(-1)


def column_sums(p):
    """Attention each token receives, summed over heads (and queries): (B, N)."""
    return p.sum(dim=(1, 2)) if p.dim() == 4 else p.sum(dim=1)


# ------------------------------------------------------------------------------------------------
# which tokens run


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("input", ["map", "pooled"])
def test_untrained_selector_runs_the_top_k_of_the_previous_layers_attention(kind, input):
    """A residual selector with conv2 = 0 predicts exactly layer 0's attention (hand-computed
    from q and k, so a wrong logit scale fails here), and the tokens layer 1 actually changed are
    the prefix plus the k most attended ones (so running the least attended fails here)."""
    model, gm = rewritten(kind, input)
    assert all(not m.conv2.weight.any() and not m.conv2.bias.any() for m in selectors(gm).values())
    x, prefix = images(), PREFIX[kind]
    logits0 = logits_by_hand(model, kind, 0, block_inputs(model, x)[0])
    want = expected_prediction(logits0, input, prefix)
    logp, block_in, block_out = observe(gm, x, [1])[1]
    torch.testing.assert_close(logp.exp().double(), want, rtol=1e-4, atol=1e-6)
    expect = top_k_by_hand(column_sums(want), 32, prefix)      # keep 0.5 of 64 patch tokens
    assert positions_run(block_in, block_out) == expect


def test_selected_tokens_are_the_top_k_of_the_selectors_own_scores():
    """With a selector that is not the identity (random conv2), the tokens run are still the
    top-k (largest) of the column sums of what *that selector* predicts, not of the attention."""
    for input in ("map", "pooled"):
        model, gm = rewritten("sdpa", input)
        torch.manual_seed(3)
        try:
            with torch.no_grad():
                for m in selectors(gm).values():
                    m.conv2.weight.normal_(0, 0.5)
            seen = observe(gm, images(), [1, 2])
        finally:
            with torch.no_grad():
                for m in selectors(gm).values():
                    m.conv2.weight.zero_()
        for i, (logp, block_in, block_out) in seen.items():
            expect = top_k_by_hand(column_sums(logp.exp()), 32, 1)
            assert positions_run(block_in, block_out) == expect, (input, i)
        # the random selector really chose differently from the plain previous-layer attention
        logits0 = logits_by_hand(model, "sdpa", 0, block_inputs(model, images())[0])
        plain = top_k_by_hand(column_sums(expected_prediction(logits0, input, 1)), 32, 1)
        assert positions_run(*seen[1][1:]) != plain


@pytest.mark.parametrize("input", ["map", "pooled"])
def test_chained_layer_reads_the_selected_logits_written_over_the_older_ones(input):
    """Layer 2's selector reads layer 0's logits with layer 1's logits among layer 1's selected
    tokens written over them (computed by hand from what layer 1 attended among); untrained, it
    runs the top-k of that."""
    model, gm = rewritten("sdpa", input)
    x = images()
    logits0 = logits_by_hand(model, "sdpa", 0, block_inputs(model, x)[0])
    seen = observe(gm, x, [1, 2])
    _, in1, out1 = seen[1]
    run1 = positions_run(in1, out1)
    known = logits0 if input == "map" else pooled_rows(logits0, 1)
    for b, idx in enumerate(run1):
        sub = logits_by_hand(model, "sdpa", 1, in1[b:b + 1, idx])[0]       # layer 1 among its own tokens
        ix = torch.tensor(idx)
        if input == "map":
            known[b][:, ix[:, None], ix[None, :]] = sub
        else:
            known[b][:, :, ix] = pooled_rows(sub[None], 1)[0]
    logp2, in2, out2 = seen[2]
    want = known.softmax(-1) if input == "map" else known[:, :, 0].softmax(-1)
    torch.testing.assert_close(logp2.exp().double(), want, rtol=1e-4, atol=1e-6)
    assert positions_run(in2, out2) == top_k_by_hand(column_sums(want), 32, 1)


# ------------------------------------------------------------------------------------------------
# what the selectors learn from


@pytest.mark.parametrize("kind", list(MODELS))
def test_training_target_is_the_attention_from_q_and_k(kind):
    """The teacher's attention of every block equals softmax(q k^T / sqrt(d)) computed from the
    model's own weights; for fused SDPA this is the logits tokenopt recomputes, which the model hides."""
    from tokenopt.train.selector import AttentionTeacher

    model = rewritten(kind, "map")[0]
    x = images()
    out, att = AttentionTeacher(model, images(2))(x, [0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
    for i, h in enumerate(block_inputs(model, x)):
        torch.testing.assert_close(att[i].double(), logits_by_hand(model, kind, i, h).softmax(-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("input", ["map", "pooled"])
def test_held_out_kl_is_the_kl_to_the_real_next_layer_attention(kind, input):
    """held_out_kl (the training loss, evaluated) is KL(real || predicted) per attention row, the
    real attention of the selective layer by hand; for a pooled selector, of its mean row."""
    from tokenopt.train.selector import held_out_kl

    model, gm = rewritten(kind, input)
    x = images()
    seen = observe(gm, x, [1, 2])
    got = held_out_kl(gm, model, x)
    real_inputs = block_inputs(model, x)
    assert set(got) == {1, 2}
    for i in (1, 2):
        p = logits_by_hand(model, kind, i, real_inputs[i]).softmax(-1)
        if input == "pooled":
            p = p.mean(-2)
        logq = seen[i][0].double()
        kl = (p * (p.log() - logq)).sum() / logq[..., 0].numel()
        assert got[i] == pytest.approx(float(kl), rel=1e-4, abs=1e-6), (i, got[i], float(kl))
