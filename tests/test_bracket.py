"""GraphRewriter.bracket (reduce -> region -> restore) and the token state's obligations.

Each test rewrites one small ViT written three ways (explicit softmax, fused SDPA,
nn.MultiheadAttention; the same weights, tests/test_rewriter.py) and compares the result with the
same computation written out by hand on the explicit model, one image at a time.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from test_rewriter import HEADS, images, key_ramp, rewriter, three_vits
from tokenopt.errors import PlanError
from tokenopt.ops import selection
from tokenopt.rewrite.state import AttendWithinImages, KeyBias, TokenState
from tokenopt.tokens import Packed

KEEP = [0, 1, 4, 6, 9, 13, 16]        # the tokens the bracketed attention runs on (cls included)


def keep_index(x: torch.Tensor) -> torch.Tensor:
    """(B, k) the kept positions, the same for every image: KEEP."""
    return torch.tensor(KEEP)[None, :].expand(x.shape[0], -1)


def attention(blk, t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit block's attention branch on tokens t (N, C) of ONE image; bias: (N,) per key."""
    n, c = t.shape
    q, k, v = blk.attn.qkv(blk.n1(t)).reshape(n, 3, HEADS, c // HEADS).permute(1, 2, 0, 3)
    logits = (q @ k.transpose(-2, -1)) * (c // HEADS) ** -0.5
    if bias is not None:
        logits = logits + bias[None, None, :]
    return blk.attn.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, c))


def by_hand(model, x: torch.Tensor, at: int, bias_inside: bool = False) -> torch.Tensor:
    """Block ``at``'s attention runs on the KEEP tokens of each image (with key_ramp on its logits when
    ``bias_inside``); the other tokens skip the attention; every token goes through the MLP."""
    h = model.embed(x).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls.expand(h.shape[0], -1, -1), h], dim=1) + model.pos
    for i, blk in enumerate(model.blocks):
        rows = []
        for b in range(h.shape[0]):                # one image at a time
            img = h[b]
            if i == at:
                sel = img[KEEP]
                bias = key_ramp(sel[None])[0] if bias_inside else None
                out = img.clone()
                out[KEEP] = sel + attention(blk, sel, bias)
            else:
                out = img + attention(blk, img)
            rows.append(out + blk.mlp(blk.n2(out)))
        h = torch.stack(rows)
    return model.head(h[:, 0])


def bracket_attention(g, a, at: int, oblige=None):
    """Bracket block ``at``'s attention branch (its input to its attention residual): gather the KEEP
    tokens on entry, put them back on exit; ``oblige(g, inner)`` may record obligations inside."""
    blk = a.blocks[at]
    for b in a.blocks[:at + 1]:
        g.begin_block(b)
    x = g.node(blk.input)
    idx = g.insert_after(x, keep_index, x, label="kept positions")

    def enter(start):
        inner = g.insert_after(idx, selection.gather_tokens, start, idx, label="kept tokens")
        if oblige is not None:
            oblige(g, inner)
        return inner

    inner = g.bracket(x, g.node(blk.merge_point), blocks=(blk,), enter=enter,
                      exit=lambda start, end: (selection.restore_tokens, (start, idx), "restore"))
    for b in a.blocks[at + 1:]:
        g.begin_block(b)
    return inner


@pytest.mark.parametrize("kind", ["softmax", "sdpa", "mha"])
def test_bracket_runs_the_region_on_the_reduced_tokens_and_restores_every_position(kind):
    models = three_vits()
    x = images()
    g, a = rewriter(models[kind], x)
    inner = bracket_attention(g, a, at=1)
    assert inner is not None and inner.name in g.inserted
    gm = g.finish()
    with torch.no_grad():
        got = gm(x)
        torch.testing.assert_close(got, by_hand(models["softmax"], x, at=1), rtol=0, atol=2e-5)
        assert (got - models[kind](x)).abs().max() > 1e-3       # the reduction changed the result


@pytest.mark.parametrize("kind", ["softmax", "sdpa", "mha"])
def test_an_obligation_made_inside_a_bracket_applies_there_and_nowhere_else(kind):
    """A key bias recorded on entry is carried out on the bracketed attention only: the blocks after
    the bracket see the state from before it (no bias)."""
    models = three_vits()
    x = images()
    g, a = rewriter(models[kind], x)
    state_before = g.state
    bracket_attention(g, a, at=1,
                      oblige=lambda g, inner: g.state.oblige(KeyBias("test ramp", key_ramp, (inner,))))
    assert g.state.obligations == {} and state_before.obligations == {}     # nothing leaked
    gm = g.finish()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), by_hand(models["softmax"], x, at=1, bias_inside=True),
                                   rtol=0, atol=2e-5)


def test_a_bracket_closed_late_restores_the_state_its_region_started_from():
    """The stream-level placement: blocks rewritten one by one change the state; a bracket closed at
    the end (exit only) gives back the state recorded when its first block began."""
    models = three_vits()
    x = images()
    g, a = rewriter(models["sdpa"], x)
    g.begin_block(a.blocks[0])
    g.state.reduced = True
    g.state.oblige(KeyBias("ramp", key_ramp, (g.node(a.blocks[0].input),)))
    g.begin_block(a.blocks[1])                   # the ramp is added to block 1's logits
    end = g.node(a.blocks[1].output)
    g.bracket(g.node(a.blocks[0].input), end, exit=lambda start, end: (torch.mul, (1.0,), "times one"))
    assert g.state.reduced is False and g.state.obligations == {}
    assert g.inserted[end.name] == "times one"


def test_obligations_replace_by_key_and_release():
    s = TokenState()
    first, second = KeyBias("bias", key_ramp, ("a",)), KeyBias("bias", key_ramp, ("b",))
    s.oblige(first)
    s.oblige(KeyBias("other", key_ramp, ("c",)))
    s.oblige(second)
    assert list(s.obligations) == ["other", "bias"] and s.obligations["bias"] is second
    copy = s.copy()
    copy.release("bias")
    assert "bias" in s.obligations and "bias" not in copy.obligations
    s.release("missing")                          # releasing nothing is not an error


def test_attend_within_images_refuses_a_refused_block_with_the_passes_words():
    models = three_vits()
    x = images()
    g, a = rewriter(models["sdpa"], x)
    blk = dataclasses.replace(a.blocks[2], refusal="a relative position bias table")
    g.state.oblige(AttendWithinImages(Packed("n", "n"), why="tokens were pruned per image (TEST)",
                                      fix="Do something else."))
    with pytest.raises(PlanError) as e:
        g.begin_block(blk)
    assert str(e.value) == ("blocks.2 runs after tokens were pruned per image (TEST) but cannot attend over a "
                            "packed batch (a relative position bias table).\n  Do something else.")
