"""tokenopt.ops against references computed here, one image (and one token) at a time.

Written to kill the mutants that survived the mutation run of tokenopt/ops (docs/testing.md). The
references are plain Python loops over the definitions in the modules' docstrings; both the
PyTorch operators and the native C step are held to them.
"""
from __future__ import annotations

import math
import os
import platform
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tokenopt.ops import attention as attn_ops
from tokenopt.ops import matching, native, selection
from tokenopt.ops import tome as tome_ops
from tokenopt import paths as cache_paths
from tokenopt.ops.native import build

NATIVE_ON = native.status().startswith("on")
needs_native = pytest.mark.skipif(not NATIVE_ON, reason=f"native step {native.status()}")


# ------------------------------------------------------------------------------------------------
# the reference: bipartite soft matching, one image at a time


def ref_match(metric: torch.Tensor, r: int, prefix: int, order: str = "original"):
    """metric (N, d) -> (keep, pairs): input positions of the output tokens in output order, and the
    merged (A position, B partner position) pairs, most similar first. order="rank": the unmerged A
    tokens follow in rank order (most similar first) instead of their original order."""
    n = metric.shape[0]
    r = min(r, max((n - prefix) // 2, 0))
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True)
    a_pos = [p for p in range(0, n, 2) if p >= prefix]
    b_pos = [p for p in range(1, n, 2) if p >= prefix]
    best = []
    for p in a_pos:
        sims = [float(m[p] @ m[q]) for q in b_pos]
        j = max(range(len(sims)), key=sims.__getitem__)
        best.append((sims[j], p, b_pos[j]))
    ranked = sorted(best, key=lambda t: -t[0])
    pairs = [(p, q) for _, p, q in ranked[:r]]
    merged = {p for p, _ in pairs}
    unmerged = [p for _, p, _ in ranked[r:]] if order == "rank" else [p for p in a_pos if p not in merged]
    keep = list(range(prefix)) + unmerged + b_pos
    return keep, pairs


def margins_ok(metric: torch.Tensor, r: int, prefix: int, gap: float = 1e-3) -> bool:
    """No near-ties that float rounding could decide differently (best partner, and the rank cut)."""
    n = metric.shape[0]
    m = metric.double() / metric.double().norm(dim=-1, keepdim=True)
    a_pos = [p for p in range(0, n, 2) if p >= prefix]
    b_pos = [p for p in range(1, n, 2) if p >= prefix]
    best = []
    for p in a_pos:
        sims = sorted((float(m[p] @ m[q]) for q in b_pos), reverse=True)
        if len(sims) > 1 and sims[0] - sims[1] < gap:
            return False
        best.append(sims[0])
    best.sort(reverse=True)
    return all(best[i] - best[i + 1] >= gap for i in range(len(best) - 1))


def ref_reduce(x, size, metric, r, prefix, op, order="original"):
    """One image: x (N, C), size (N,), metric (N, d) -> (out (K, C), new size (K,), position of every
    input token in the output)."""
    keep, pairs = ref_match(metric, r, prefix, order)
    groups = {q: [q] for q in keep}
    for p, q in pairs:
        groups[q].append(p)
    out, new_size = [], []
    for q in keep:
        g = groups[q]
        if op == "prune" or len(g) == 1:
            out.append(x[q].double())
            new_size.append(float(size[q]) if op == "prune" else sum(float(size[i]) for i in g))
            continue
        if op == "merge":
            w = [float(size[i]) for i in g]
            out.append(sum(w_i * x[i].double() for w_i, i in zip(w, g)) / sum(w))
        elif op == "sum":
            out.append(sum(x[i].double() for i in g))
        elif op == "mlerp":
            mean = sum(x[i].double() for i in g) / len(g)
            out.append(mean / mean.norm() * max(x[i].double().norm() for i in g))
        new_size.append(sum(float(size[i]) for i in g))
    where = {q: j for j, q in enumerate(keep)}
    pos = [where[p] if p in where else None for p in range(x.shape[0])]
    for p, q in pairs:
        pos[p] = where[q]
    return torch.stack(out), torch.tensor(new_size, dtype=torch.float64), pos


def random_case(seed, b, n, c, d, prefix, r, heads=None):
    """Inputs whose matching has no near-ties (searched deterministically from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(b, n, c, generator=g)
        metric = torch.randn(b, n, heads, d, generator=g) if heads else torch.randn(b, n, d, generator=g)
        flat = metric.mean(2) if heads else metric
        if all(margins_ok(flat[i], r, prefix) for i in range(b)):
            size = torch.randint(1, 6, (b, n, 1), generator=g).float()
            index = torch.randint(0, n, (b, 2 * n + 1), generator=g)
            return x, metric, size, index


CASES = [  # b, n, c, d, prefix, r
    (2, 17, 6, 5, 1, 5), (1, 20, 4, 3, 0, 7), (3, 16, 5, 4, 2, 3), (2, 19, 3, 6, 3, 8), (2, 9, 4, 4, 1, 100),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}n{}p{}r{}".format(c[0], c[1], c[4], c[5]))
def test_bipartite_match_equals_the_reference(case):
    b, n, c, d, prefix, r = case
    _, metric, _, _ = random_case(sum(case), b, n, c, d, prefix, r)
    m = matching.bipartite_match(metric, r, prefix)
    rr = min(r, (n - prefix) // 2)
    k = n - rr
    assert m.keep.shape == (b, k) and m.src.shape == (b, rr) and m.dst.shape == (b, rr)
    for i in range(b):
        keep, pairs = ref_match(metric[i], r, prefix)
        assert m.keep[i].tolist() == keep
        assert m.src[i].tolist() == [p for p, _ in pairs]
        assert m.dst[i].tolist() == [keep.index(q) for _, q in pairs]
    # the same positions as row numbers of the flattened (B*N, C) input and (B*K, C) output
    assert m.keep_rows.tolist() == [int(p) + i * n for i in range(b) for p in m.keep[i]]
    assert m.src_rows.tolist() == [int(p) + i * n for i in range(b) for p in m.src[i]]
    assert m.dst_rows.tolist() == [int(p) + i * k for i in range(b) for p in m.dst[i]]


def test_per_head_metric_is_matched_on_its_mean_over_heads():
    _, metric, _, _ = random_case(7, 2, 15, 4, 3, 1, 4, heads=3)
    assert torch.equal(matching.head_mean(metric), metric.mean(2))
    flat = torch.randn(2, 5, 3)
    assert matching.head_mean(flat) is flat
    m = matching.bipartite_match(metric, 4, 1)
    for i in range(2):
        keep, pairs = ref_match(metric[i].mean(1), 4, 1)
        assert m.keep[i].tolist() == keep and m.src[i].tolist() == [p for p, _ in pairs]


def test_max_reduction_by_hand():
    assert [matching.max_reduction(n, p) for n, p in [(17, 1), (16, 0), (16, 2), (3, 1), (2, 2), (1, 3), (0, 0)]] \
        == [8, 8, 7, 1, 0, 0, 0]


@pytest.mark.parametrize("op", ["merge", "sum", "prune", "mlerp"])
@pytest.mark.parametrize("sized", [True, False])
def test_reductions_equal_the_reference(op, sized):
    for case in CASES:
        b, n, c, d, prefix, r = case
        x, metric, size, _ = random_case(sum(case) + 1, b, n, c, d, prefix, r)
        m = matching.bipartite_match(metric, r, prefix)
        s = size if sized else None
        ones = torch.ones(b, n, 1)
        if op == "merge":
            out, new_size = matching.merge_weighted(x, s, m)
        elif op == "sum":
            out, new_size = matching.merge_sum(x, m), matching.merge_sum(s if sized else ones, m)
        elif op == "prune":
            out, new_size = matching.prune(x, m), matching.prune(s if sized else ones, m)
        else:
            out, new_size = matching.merge_mlerp(x, m), matching.merge_sum(s if sized else ones, m)
        for i in range(b):
            want, want_size, _ = ref_reduce(x[i], (size if sized else ones)[i, :, 0], metric[i], r, prefix, op)
            torch.testing.assert_close(out[i].double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(new_size[i, :, 0].double(), want_size)


def test_merged_positions_equal_the_reference():
    for case in CASES:
        b, n, c, d, prefix, r = case
        _, metric, _, _ = random_case(sum(case) + 2, b, n, c, d, prefix, r)
        m = matching.bipartite_match(metric, r, prefix)
        pos = matching.merged_positions(n, m)
        assert pos.shape == (b, n)
        for i in range(b):
            assert pos[i].tolist() == ref_reduce(torch.zeros(n, 1), torch.ones(n), metric[i], r, prefix, "sum")[2]


def test_take_reads_rows_of_every_image():
    x = torch.arange(2 * 4 * 3.).reshape(2, 4, 3)
    got = matching.take(x, torch.tensor([1, 3, 4, 6]))
    assert torch.equal(got, torch.stack([x[0, [1, 3]], x[1, [0, 2]]]))


# ------------------------------------------------------------------------------------------------
# the ToMe / ToFu step (tokenopt.ops.tome): both paths against the reference


def paths():
    yield "pytorch"
    if NATIVE_ON:
        yield "native"


def run_step(path, fn, *args):
    with torch.no_grad():
        if path == "native":
            return fn(*args)
        with native.disabled():
            return fn(*args)


@pytest.mark.parametrize("op", ["merge", "prune", "mlerp"])
@pytest.mark.parametrize("path", list(paths()))
def test_tofu_reduce_and_tome_merge_equal_the_reference(op, path):
    for case in CASES:
        b, n, c, d, prefix, r = case
        x, metric, size, index = random_case(sum(case) + 3, b, n, c, d, prefix, r, heads=2)
        for sized in (True, False):
            s = size if sized else None
            got = run_step(path, tome_ops.tofu_reduce, x, metric, s, index, r, prefix, op)
            if op == "merge":
                again = run_step(path, tome_ops.tome_merge, x, metric, s, index, r, prefix)
                for a, g in zip(again, got):
                    assert torch.equal(a, g)
            k = n - min(r, (n - prefix) // 2)
            assert got[0].shape == (b, k, c) and got[1].shape == (b, k, 1) and got[2].shape == index.shape
            for i in range(b):
                ones = torch.ones(n)
                want, want_size, pos = ref_reduce(x[i], size[i, :, 0] if sized else ones, metric[i].mean(1), r,
                                                  prefix, op)
                torch.testing.assert_close(got[0][i].double(), want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got[1][i, :, 0].double(), want_size)
                assert got[2][i].tolist() == [pos[int(t)] for t in index[i]]
            without = run_step(path, tome_ops.tofu_reduce, x, metric, s, None, r, prefix, op)
            assert without[2] is None and torch.equal(without[0], got[0])


def test_unknown_tofu_op_is_refused():
    x, metric, _, _ = random_case(0, 1, 9, 4, 3, 1, 2)
    for path in paths():
        with pytest.raises(ValueError, match=r"^unknown ToFu op 'squash'$"):
            run_step(path, tome_ops.tofu_reduce, x, metric, None, None, 2, 1, "squash")


@pytest.mark.parametrize("op", ["merge", "prune", "mlerp"])
def test_rank_order_keeps_the_unmerged_tokens_in_rank_order(op):
    """order="rank" (the reference implementation's order for prefix-free models); PyTorch only."""
    for case in CASES:
        b, n, c, d, prefix, r = case
        x, metric, size, index = random_case(sum(case) + 4, b, n, c, d, prefix, r)
        m = matching.bipartite_match(metric, r, prefix, order="rank")
        with torch.no_grad():                          # the native step must not take it
            got = tome_ops.tofu_reduce(x, metric, size, index, r, prefix, op, order="rank")
            if op == "merge":
                again = tome_ops.tome_merge(x, metric, size, index, r, prefix, order="rank")
                assert all(torch.equal(a, g) for a, g in zip(again, got))
        for i in range(b):
            keep, pairs = ref_match(metric[i], r, prefix, "rank")
            assert m.keep[i].tolist() == keep and m.src[i].tolist() == [p for p, _ in pairs]
            want, want_size, pos = ref_reduce(x[i], size[i, :, 0], metric[i], r, prefix, op, "rank")
            torch.testing.assert_close(got[0][i].double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1][i, :, 0].double(), want_size)
            assert got[2][i].tolist() == [pos[int(t)] for t in index[i]]
    with pytest.raises(ValueError) as e:
        matching.bipartite_match(metric, 2, 1, order="reference")
    assert str(e.value) == "order must be one of ('original', 'rank'), got 'reference'"


def test_every_tensor_stays_on_the_inputs_device():
    """Index tensors are made on the input's device: fake CUDA tensors (no GPU needed) refuse to
    mix with CPU ones, as real ones do."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        metric = torch.empty(2, 11, 4, device="cuda")
        for order in ("original", "rank"):
            for prefix in (0, 2):
                m = matching.bipartite_match(metric, 3, prefix, order)
                assert all(t.device.type == "cuda" for t in m)
                assert m.keep.shape == (2, 8) and m.keep_rows.shape == (16,) and m.dst_rows.shape == (6,)
                pos = matching.merged_positions(11, m)
                assert pos.device.type == "cuda" and pos.shape == (2, 11)
        scores = torch.empty(2, 9, device="cuda")
        for prefix in (0, 1):
            idx = selection.topk_tokens(scores, 3, prefix)
            assert idx.device.type == "cuda" and idx.shape == (2, prefix + 3)
        idx = tome_ops.initial_index(torch.empty(2, 5, 3, device="cuda"))
        assert idx.device.type == "cuda" and idx.shape == (2, 5)


def test_the_native_step_checks_every_input(monkeypatch):
    """The decision is native.usable's, on all four inputs (x, metric, size, index)."""
    calls = []
    monkeypatch.setattr(native, "status", lambda: "on: test")
    monkeypatch.setattr(native, "prepare", lambda: "on: test")
    monkeypatch.setattr(native, "_enabled", True)
    monkeypatch.setattr(native, "reduce", lambda *a, **k: calls.append(a) or ("native", None, None))

    class Sub(torch.Tensor):
        pass

    x, metric, size, index = random_case(19, 2, 13, 4, 3, 1, 3)
    with torch.no_grad():
        assert tome_ops.tofu_reduce(x, metric, size, index, 2, 1, "prune")[0] == "native"
        assert tome_ops.tome_merge(x, metric, None, None, 2, 1)[0] == "native"
        assert len(calls) == 2
        for args in ((x, metric.double(), size, index), (x, metric, size.double(), index),
                     (x, metric, size, index.as_subclass(Sub)), (x, metric.as_subclass(Sub), size, index)):
            out = tome_ops.tofu_reduce(*args, 2, 1, "prune")
            assert isinstance(out[0], torch.Tensor)
        assert len(calls) == 2


def test_the_native_step_is_taken_exactly_when_it_may_be(monkeypatch):
    calls = []
    real = native.reduce

    def spy(x, metric, size, index, r, prefix, op="merge"):
        calls.append((x.shape, size is not None, index is not None, r, prefix, op))
        return real(x, metric, size, index, r, prefix, op)

    monkeypatch.setattr(native, "reduce", spy)
    monkeypatch.setattr(native, "usable", lambda x, metric, size, index: x.dtype == torch.float32)
    if not NATIVE_ON:
        monkeypatch.setattr(native, "reduce", lambda *a, **k: calls.append(a[4:]) or (None, None, None))
    x, metric, size, index = random_case(5, 2, 13, 4, 3, 1, 3)
    with torch.no_grad():
        tome_ops.tofu_reduce(x, metric, size, index, 0, 1, "prune")       # r = 0: nothing to do natively
        assert calls == []
        tome_ops.tofu_reduce(x, metric, size, index, 1, 1, "prune")
        tome_ops.tofu_reduce(x, metric, None, None, 50, 1, "mlerp")       # r capped at 6 before the call
        tome_ops.tome_merge(x, metric, size, None, 2, 1)
        if NATIVE_ON:
            assert calls == [((2, 13, 4), True, True, 1, 1, "prune"), ((2, 13, 4), False, False, 6, 1, "mlerp"),
                             ((2, 13, 4), True, False, 2, 1, "merge")]
        else:
            assert [c[0] for c in calls] == [1, 6, 2]
        calls.clear()
        with pytest.raises(ValueError):
            tome_ops.tofu_reduce(x, metric, size, None, 2, 1, "squash")   # not a native op
        tome_ops.tofu_reduce(x.double(), metric.double(), None, None, 2, 1, "merge")   # native.usable says no
    assert calls == []


def test_keys_per_token_is_a_view_of_the_keys_per_token():
    k = torch.randn(2, 3, 7, 4)                                   # (B, H, N, d)
    tokens = torch.randn(2, 7, 12)
    got = tome_ops.keys_per_token(k, tokens)
    assert got.shape == (2, 7, 3, 4) and got.data_ptr() == k.data_ptr()
    for b in range(2):
        for t in range(7):
            for h in range(3):
                assert torch.equal(got[b, t, h], k[b, h, t])
    flat = tome_ops.keys_per_token(k.reshape(6, 7, 4), tokens)    # (B*H, N, d)
    assert torch.equal(flat, got)


# (test_mha_metric_is_the_keys_averaged_over_heads is gone with ops.tome.mha_keys_mean_over_heads: an
# nn.MultiheadAttention is now written out by GraphRewriter.decompose_mha, covered by tests/test_rewriter.py)


def test_index_map_unmerge_and_size_weighted_pooling_by_hand():
    x = torch.zeros(2, 4, 3)
    assert tome_ops.initial_index(x).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    tokens = torch.tensor([[[1., 10.], [2., 20.]], [[3., 30.], [4., 40.]]])       # (2, 2, 2)
    index = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert tome_ops.unmerge(tokens, index).tolist() == [[[2., 20.], [1., 10.], [2., 20.]],
                                                        [[3., 30.], [3., 30.], [4., 40.]]]
    x = torch.tensor([[[9., 9.], [1., 2.], [3., 4.]]])
    size = torch.tensor([[[5.], [1.], [3.]]])
    # pooling reads the tokens after the prefix (start=1), whose sizes are 1 and 3
    assert tome_ops.size_weighted_mean(x[:, 1:], size, 1).tolist() == [[(1 + 9) / 4, (2 + 12) / 4]]
    assert tome_ops.size_weighted_mean(x, size, 0)[0].tolist() == pytest.approx([(45 + 1 + 9) / 9, (45 + 2 + 12) / 9])


# ------------------------------------------------------------------------------------------------
# proportional attention (tokenopt.ops.attention)


def test_key_log_size_is_log_size_along_the_keys():
    size = torch.tensor([[[1.], [2.], [4.]], [[3.], [1.], [5.]]])       # (B=2, N=3, 1)
    bias = tome_ops.key_log_size(size)
    assert bias.shape == (2, 3)
    for b in range(2):
        for j in range(3):
            assert bias[b, j].item() == pytest.approx(math.log(size[b, j, 0].item()))
    assert tome_ops.key_log_size(torch.ones(1, 1, 1)).shape == (1, 1)   # squeezes the size axis only


def test_sdpa_mask_with_key_bias_is_the_bias_along_the_keys():
    size = torch.tensor([[[1.], [2.], [4.]], [[3.], [1.], [5.]]])       # (B=2, N=3, 1)
    like = torch.zeros(2, 2, 3, 4, dtype=torch.float64)                  # the queries: only their dtype counts
    mask = attn_ops.sdpa_mask_with_key_bias(tome_ops.key_log_size(size), like)
    assert mask.shape == (2, 1, 1, 3) and mask.dtype == torch.float64
    for b in range(2):
        for j in range(3):
            assert mask[b, 0, 0, j].item() == pytest.approx(math.log(size[b, j, 0].item()))
    existing = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(attn_ops.sdpa_mask_with_key_bias(tome_ops.key_log_size(size), like, existing),
                               existing + mask)
    allowed = torch.tensor([[True, False, True], [False, True, True]])[:, None, None, :]   # SDPA: True = may attend
    got = attn_ops.sdpa_mask_with_key_bias(tome_ops.key_log_size(size), like, allowed)
    assert got.dtype == torch.float64 and got.shape == (2, 1, 1, 3)
    assert got[0, 0, 0, 1] == float("-inf") and got[1, 0, 0, 0] == float("-inf")
    keep = allowed.expand_as(got)
    torch.testing.assert_close(got[keep], mask[keep])


def test_sdpa_with_the_mask_is_proportional_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 5, generator=g) for _ in range(3))
    size = torch.randint(1, 6, (2, 4, 1), generator=g).float()
    mask = attn_ops.sdpa_mask_with_key_bias(tome_ops.key_log_size(size), q)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for b in range(2):
        for h in range(3):
            for i in range(4):
                logits = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(5) + math.log(size[b, j, 0]) for j in range(4)])
                want = (logits.softmax(0)[:, None] * v[b, h]).sum(0)
                torch.testing.assert_close(got[b, h, i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flat", [False, True])
def test_logits_with_key_bias_by_hand(flat):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, generator=g)             # B=2, H=3, 4 queries, 5 keys
    size = torch.randint(1, 6, (2, 5, 1), generator=g).float()
    got = attn_ops.logits_with_key_bias(logits.reshape(6, 4, 5) if flat else logits, tome_ops.key_log_size(size))
    assert got.shape == ((6, 4, 5) if flat else (2, 3, 4, 5))
    got = got.reshape(2, 3, 4, 5)
    for b in range(2):
        for h in range(3):
            for i in range(4):
                for j in range(5):
                    assert got[b, h, i, j].item() == pytest.approx(logits[b, h, i, j].item() + math.log(size[b, j, 0]),
                                                                   abs=1e-6)


def test_biases_take_the_logits_dtype():
    size = torch.tensor([[[1.], [2.], [4.]]])
    bias = tome_ops.key_log_size(size)                           # float32
    for dtype in (torch.float64, torch.bfloat16):
        assert attn_ops.sdpa_mask_with_key_bias(bias, torch.zeros(1, 2, 3, 4, dtype=dtype)).dtype == dtype
        assert attn_ops.mha_padding_with_key_bias(bias, torch.zeros(1, 3, dtype=dtype)).dtype == dtype
        logits = torch.zeros(1, 2, 3, 3, dtype=dtype)
        got = attn_ops.logits_with_key_bias(logits, bias)
        assert got.dtype == dtype
        torch.testing.assert_close(got[0, 1, 2].double(), torch.tensor([0., math.log(2), math.log(4)], dtype=torch.float64),
                                   rtol=1e-2, atol=1e-2)


def test_mha_padding_with_key_bias_by_hand():
    size = torch.tensor([[[1.], [2.], [4.]], [[3.], [1.], [5.]]])
    bias = attn_ops.mha_padding_with_key_bias(tome_ops.key_log_size(size))
    want = torch.tensor([[math.log(s) for s in row] for row in [[1, 2, 4], [3, 1, 5]]])
    assert bias.shape == (2, 3)
    torch.testing.assert_close(bias, want)
    floats = torch.tensor([[0., -1., 2.], [0.5, 0., 0.]])
    torch.testing.assert_close(attn_ops.mha_padding_with_key_bias(tome_ops.key_log_size(size), floats), floats + want)
    pad = torch.tensor([[False, True, False], [True, False, False]])        # MHA: True = a padded key, never attended
    got = attn_ops.mha_padding_with_key_bias(tome_ops.key_log_size(size), pad)
    assert got.dtype == torch.float32
    assert got[0, 1] == float("-inf") and got[1, 0] == float("-inf")
    torch.testing.assert_close(got[~pad], want[~pad])


# ------------------------------------------------------------------------------------------------
# ToSA (tokenopt.ops.selection)


def mha_written_out(mha, x, key_padding_mask=None, attn_mask=None, average=True):
    """nn.MultiheadAttention (self-attention, batch_first) from the ops the rewriter inserts for it."""
    q, k, v = attn_ops.mha_in_projection(x, mha.in_proj_weight, mha.in_proj_bias, mha.num_heads)
    mask = attn_ops.mha_float_mask(q, key_padding_mask, attn_mask)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    p = (logits if mask is None else logits + mask).softmax(-1)
    out = mha.out_proj(attn_ops.merge_heads(p @ v))
    return attn_ops.with_weights(out, attn_ops.head_weights(p, average))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mha_written_out_equals_nn_multiheadattention(dtype):
    torch.manual_seed(3)
    mha = torch.nn.MultiheadAttention(12, 3, batch_first=True).to(dtype).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    b, n = 2, 5
    x = torch.randn(b, n, 12, dtype=dtype)
    kp_bool = torch.tensor([[False, True, False, False, True], [False, False, False, True, False]])
    kp_float = torch.randn(b, n, dtype=dtype)
    am_bool = torch.rand(n, n) > 0.7
    am_bool[:, 0] = False                                   # every query may attend somewhere
    am_float = torch.randn(n, n, dtype=dtype)
    am3_bool = torch.rand(b * 3, n, n) > 0.7
    am3_bool[..., 0] = False
    am3_float = torch.randn(b * 3, n, n, dtype=dtype)
    cases = [(None, None), (kp_bool, None), (kp_float, None), (None, am_bool), (None, am_float),
             (None, am3_bool), (None, am3_float), (kp_bool, am_bool), (kp_float, am_float), (kp_float, am3_float)]
    with torch.no_grad():
        for kp, am in cases:
            for average in (True, False):
                want, want_w = mha(x, x, x, key_padding_mask=kp, attn_mask=am, need_weights=True,
                                   average_attn_weights=average)
                got, got_w = mha_written_out(mha, x, kp, am, average)
                assert got.dtype == dtype and got_w.shape == want_w.shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)
    assert attn_ops.mha_float_mask(torch.empty(b, 3, n, 4), None, None) is None
    mask = attn_ops.mha_float_mask(torch.empty(b, 3, n, 4, dtype=dtype), kp_bool, None)
    assert mask.shape == (b, 1, 1, n) and mask.dtype == dtype
    assert mask[0, 0, 0].tolist() == [0, float("-inf"), 0, 0, float("-inf")]
    mask = attn_ops.mha_float_mask(torch.empty(b, 3, n, 4, dtype=dtype), None, am3_float)
    assert mask.shape == (b, 3, n, n) and torch.equal(mask[1, 2], am3_float[5])
    q64 = torch.empty(b, 3, n, 4, dtype=torch.float64)            # masks of other dtypes take the queries'
    for kp, am in ((kp_float.float(), None), (None, am_bool), (None, am_float.float()), (kp_bool, None)):
        assert attn_ops.mha_float_mask(q64, kp, am).dtype == torch.float64


def test_mha_in_projection_and_dropout():
    torch.manual_seed(4)
    mha = torch.nn.MultiheadAttention(8, 2, dropout=0.25, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    x = torch.randn(3, 4, 8)
    q, k, v = attn_ops.mha_in_projection(x, mha.in_proj_weight, mha.in_proj_bias, 2)
    for i, t in enumerate((q, k, v)):
        proj = x @ mha.in_proj_weight[8 * i:8 * i + 8].T + mha.in_proj_bias[8 * i:8 * i + 8]
        assert t.shape == (3, 2, 4, 4)
        torch.testing.assert_close(t, proj.reshape(3, 4, 2, 4).transpose(1, 2))
    assert attn_ops.attention_dropout(mha.train()) == 0.25
    assert attn_ops.attention_dropout(mha.eval()) == 0.0
    p = torch.rand(2, 3, 4, 5)
    torch.testing.assert_close(attn_ops.head_weights(p, True), (p[:, 0] + p[:, 1] + p[:, 2]) / 3)
    assert attn_ops.head_weights(p, False) is p
    a = torch.randn(2, 3, 4, 5)
    assert torch.equal(attn_ops.merge_heads(a)[1, 2], torch.cat([a[1, 0, 2], a[1, 1, 2], a[1, 2, 2]]))
    out = torch.zeros(1)
    assert attn_ops.with_weights(out, None) == (out, None)


def test_mha_masks_stay_on_the_querys_device():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 4, device="cuda")
        kp = torch.zeros(2, 5, dtype=torch.bool, device="cuda")
        am = torch.zeros(5, 5, dtype=torch.bool, device="cuda")
        mask = attn_ops.mha_float_mask(q, kp, am)
        assert mask.device.type == "cuda" and mask.shape == (2, 1, 5, 5)


def test_attention_logits_and_heads_first_by_hand():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    tokens = torch.zeros(2, 4, 15)
    for scale, s in ((None, 5 ** -0.5), (0.7, 0.7)):
        got = selection.attention_logits(q, k, scale, tokens)
        flat = selection.attention_logits(q.reshape(6, 4, 5), k.reshape(6, 4, 5), scale, tokens)
        assert got.shape == flat.shape == (2, 3, 4, 4)
        torch.testing.assert_close(flat, got)
        for b, h, i, j in [(0, 0, 0, 1), (1, 2, 3, 0), (1, 1, 2, 2)]:
            assert got[b, h, i, j].item() == pytest.approx((q[b, h, i] @ k[b, h, j]).item() * s, abs=1e-5)
    four = torch.randn(2, 3, 4, 4)
    assert selection.heads_first(four, tokens) is four
    assert torch.equal(selection.heads_first(four.reshape(6, 4, 4), tokens), four)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_logit_stats_are_the_mean_and_prefix_query_rows(prefix):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 6, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g)
    tokens = torch.zeros(2, 6, 12)
    logits = selection.attention_logits(q, k, 0.3, tokens)
    for stats in (selection.logit_stats(q, k, 0.3, tokens, prefix),
                  selection.logit_stats(q.reshape(6, 6, 4), k.reshape(6, 6, 4), 0.3, tokens, prefix),
                  selection.stats_from_logits(logits, tokens, prefix),
                  selection.stats_from_logits(logits.reshape(6, 6, 6), tokens, prefix)):
        assert stats.shape == (2, 3, 2, 6)
        for b in range(2):
            for h in range(3):
                rows = logits[b, h]
                torch.testing.assert_close(stats[b, h, 0], sum(rows[i] for i in range(6)) / 6, rtol=1e-5, atol=1e-5)
                first = sum(rows[i] for i in range(prefix)) / prefix if prefix else stats[b, h, 0]
                torch.testing.assert_close(stats[b, h, 1], first, rtol=1e-5, atol=1e-5)
    default = selection.logit_stats(q, k, None, tokens, prefix)
    torch.testing.assert_close(default, selection.logit_stats(q, k, 4 ** -0.5, tokens, prefix))


@pytest.mark.parametrize("bias", [True, False])
def test_mha_queries_keys_and_logits_by_hand(bias):
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(8, 2, bias=bias, batch_first=True)
    if bias:
        with torch.no_grad():
            mha.in_proj_bias.normal_()
    x = torch.randn(3, 5, 8)
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q, k = selection.mha_qk(x, w, b, 2)
    assert q.shape == k.shape == (3, 2, 5, 4)
    for which, got in ((0, q), (1, k)):
        proj = x @ w[8 * which:8 * which + 8].T + (b[8 * which:8 * which + 8] if bias else 0)   # (B, N, C)
        for h in range(2):
            torch.testing.assert_close(got[:, h], proj[..., 4 * h:4 * h + 4], rtol=1e-5, atol=1e-5)
    # the logits nn.MultiheadAttention itself softmaxes (its attention weights, per head)
    _, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)
    logits = selection.mha_attention_logits(x, w, b, 2)
    torch.testing.assert_close(logits.softmax(-1), weights, rtol=1e-5, atol=1e-5)
    for prefix in (0, 1):
        torch.testing.assert_close(selection.mha_logit_stats(x, w, b, 2, prefix),
                                   selection.stats_from_logits(logits, x, prefix), rtol=1e-5, atol=1e-5)


def test_fill_map_and_fill_stats_write_only_the_selected_entries():
    full = torch.randn(2, 3, 6, 6)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]])
    sub = torch.randn(2, 3, 3, 3)
    got = selection.fill_map(full, sub, idx)
    want = full.clone()
    for b in range(2):
        for a, i in enumerate(idx[b].tolist()):
            for c, j in enumerate(idx[b].tolist()):
                want[b, :, i, j] = sub[b, :, a, c]
    assert torch.equal(got, want)
    stats, sub_stats = torch.randn(2, 3, 2, 6), torch.randn(2, 3, 2, 3)
    want = stats.clone()
    for b in range(2):
        for a, j in enumerate(idx[b].tolist()):
            want[b, :, :, j] = sub_stats[b, :, :, a]
    assert torch.equal(selection.fill_stats(stats, sub_stats, idx), want)


def test_token_scores_sum_attention_over_heads_and_queries():
    logp = torch.randn(2, 3, 4, 5).log_softmax(-1)
    got = selection.token_scores(logp)
    for b in range(2):
        for j in range(5):
            assert got[b, j].item() == pytest.approx(sum(logp[b, h, i, j].exp().item() for h in range(3) for i in range(4)),
                                                     rel=1e-5)
    pooled = torch.randn(2, 3, 5).log_softmax(-1)
    torch.testing.assert_close(selection.token_scores(pooled), pooled.exp().sum(1))


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_topk_tokens_by_hand(prefix):
    scores = torch.tensor([[9., 0.1, 0.5, 0.3, 0.9, 0.2, 0.8], [9., 0.7, 0.1, 0.6, 0.2, 0.5, 0.0]])
    got = selection.topk_tokens(scores, 3, prefix)
    for b in range(2):
        ranked = sorted(range(prefix, 7), key=lambda j: -scores[b, j].item())[:3]
        assert got[b].tolist() == list(range(prefix)) + sorted(ranked)


def test_gather_and_restore_tokens_by_hand():
    x = torch.arange(2 * 5 * 2.).reshape(2, 5, 2)
    idx = torch.tensor([[0, 3], [4, 1]])
    xs = selection.gather_tokens(x, idx)
    assert xs.tolist() == [[x[0, 0].tolist(), x[0, 3].tolist()], [x[1, 4].tolist(), x[1, 1].tolist()]]
    y = -xs
    out = selection.restore_tokens(x, idx, y)
    want = x.clone()
    want[0, 0], want[0, 3], want[1, 4], want[1, 1] = -x[0, 0], -x[0, 3], -x[1, 4], -x[1, 1]
    assert torch.equal(out, want) and torch.equal(x, torch.arange(20.).reshape(2, 5, 2))   # x untouched


@pytest.mark.parametrize("residual", [True, False])
def test_map_selector_layers_and_output(residual):
    torch.manual_seed(0)
    sel = selection.MapSelector(heads=3, hidden=5, kernel=3, residual=residual)
    assert sel.kind == "map" and sel.heads == 3 and sel.residual is residual
    assert (sel.conv1.in_channels, sel.conv1.out_channels, sel.conv1.kernel_size, sel.conv1.padding) == (3, 5, (3,), (1,))
    assert (sel.conv2.in_channels, sel.conv2.out_channels, sel.conv2.kernel_size, sel.conv2.padding) == (5, 3, (3,), (1,))
    assert sel.trained.item() is False and "trained" in dict(sel.named_buffers())
    assert sel.extra_repr() == f"residual={residual}"
    if residual:       # starts as "like the layer before": the second convolution is zero
        assert not sel.conv2.weight.any() and not sel.conv2.bias.any()
    else:
        assert sel.conv2.weight.any()
    with torch.no_grad():
        sel.conv2.weight.normal_()
        sel.conv2.bias.normal_()
    logits = torch.randn(2, 3, 4, 6)
    got = sel(logits)
    assert got.shape == (2, 3, 4, 6)
    for b in range(2):
        for i in range(4):
            row = logits[b, :, i, :]                                   # (H, N): heads as channels
            y = sel.conv2(F.relu(sel.conv1(row[None])))[0]
            if residual:
                y = y + row
            torch.testing.assert_close(got[b, :, i, :], y.log_softmax(-1), rtol=1e-5, atol=1e-5)


def test_selector_defaults_and_wider_kernels():
    for cls, channels in ((selection.MapSelector, 4), (selection.PooledSelector, 8)):
        sel = cls(4)
        assert (sel.conv1.in_channels, sel.conv1.out_channels, sel.conv1.kernel_size, sel.residual) == (
            channels, 64, (3,), True)
        wide = cls(4, hidden=6, kernel=5)
        assert wide.conv1.padding == wide.conv2.padding == (2,)      # the keys keep their positions
        x = torch.randn(2, 4, 3, 9) if cls is selection.MapSelector else torch.randn(2, 4, 2, 9)
        assert wide(x).shape[-1] == 9


@pytest.mark.parametrize("residual", [True, False])
def test_pooled_selector_layers_and_output(residual):
    torch.manual_seed(0)
    sel = selection.PooledSelector(heads=3, hidden=5, kernel=1, residual=residual)
    assert sel.kind == "pooled" and sel.heads == 3
    assert (sel.conv1.in_channels, sel.conv1.out_channels, sel.conv1.kernel_size, sel.conv1.padding) == (6, 5, (1,), (0,))
    assert (sel.conv2.in_channels, sel.conv2.out_channels) == (5, 3)
    with torch.no_grad():
        sel.conv2.weight.normal_()
    stats = torch.randn(2, 3, 2, 7)
    got = sel(stats)
    assert got.shape == (2, 3, 7)
    for b in range(2):
        channels = torch.cat([stats[b, h] for h in range(3)])          # head 0's two rows, head 1's, ...
        y = sel.conv2(F.relu(sel.conv1(channels[None])))[0]
        if residual:
            y = y + stats[b, :, 0]
        torch.testing.assert_close(got[b], y.log_softmax(-1), rtol=1e-5, atol=1e-5)
    assert selection.SELECTORS == {"map": selection.MapSelector, "pooled": selection.PooledSelector}


# ------------------------------------------------------------------------------------------------
# the native step's Python side (tokenopt.ops.native)


@pytest.fixture
def native_state(monkeypatch):
    """Let a test change the module's load state; it is put back afterwards."""
    for name in ("_fn", "_status", "_available", "_enabled"):
        monkeypatch.setattr(native, name, getattr(native, name))
    return monkeypatch


def test_prepare_loads_once_and_records_availability(native_state):
    loads = []
    native_state.setattr(native, "load", lambda: loads.append(1) or (None, "off: no"))
    native_state.setattr(native, "_status", None)
    assert native.prepare() == "off: no" and native.status() == "off: no"
    assert loads == [1] and native._available is False and native._fn is None
    fn = object()
    native_state.setattr(native, "load", lambda: (fn, "on: lib"))
    native_state.setattr(native, "_status", None)
    assert native.prepare() == "on: lib" and native._fn is fn and native._available is True
    native_state.setattr(native, "load", lambda: pytest.fail("loaded twice"))
    assert native.prepare() == "on: lib"


def test_enable_switch_returns_the_previous_value(native_state):
    native_state.setattr(native, "_enabled", True)
    assert native.set_enabled(0) is True and native._enabled is False
    assert native.set_enabled("yes") is False and native._enabled is True
    with native.disabled():
        assert native._enabled is False
    assert native._enabled is True


def test_dispatch_modes_are_detected(monkeypatch):
    assert native._dispatch_modes_active() is False
    with TorchDispatchMode():
        assert native._dispatch_modes_active() is True
    monkeypatch.delattr(torch._C, "_len_torch_dispatch_stack")
    assert native._dispatch_modes_active() is True          # cannot tell: take the operators


def test_right_kind():
    x = torch.randn(1, 5, 4)
    i64, i32 = torch.zeros(1, 7, dtype=torch.long), torch.zeros(1, 7, dtype=torch.int32)
    assert native._right_kind([x, x], None) and native._right_kind([x, x], i64)
    assert not native._right_kind([x, x], i32)
    assert not native._right_kind([x, x.double()], None) and not native._right_kind([x.half(), x], i64)
    assert not native._right_kind([x, x.to("meta")], None)
    assert not native._right_kind([x, x], i64.to("meta"))
    leaf = x.clone().requires_grad_()
    assert not native._right_kind([x, leaf], None)
    with torch.no_grad():
        assert native._right_kind([x, leaf], None)


def test_usable_outside_compile(native_state):
    native_state.setattr(native, "_enabled", True)
    native_state.setattr(native, "_status", "on: test")          # as if built
    x, s, i = torch.randn(1, 5, 4), torch.ones(1, 5, 1), torch.zeros(1, 5, dtype=torch.long)
    assert native.usable(x, x, None, None) and native.usable(x, x, s, i)
    assert not native.usable(x, x, s.double(), None)                   # the size is checked too
    assert not native.usable(x, x, None, i.int())
    assert not native.usable(torch.nn.Parameter(x), x, None, None)      # subclasses take the operators
    assert not native.usable(x, x, torch.nn.Parameter(s), None)
    with torch.no_grad():
        assert native.usable(x, x, torch.nn.Parameter(s).detach(), i)
    with TorchDispatchMode():
        assert not native.usable(x, x, None, None)
    native_state.setattr(torch.jit, "is_tracing", lambda: True)
    assert not native.usable(x, x, None, None)
    native_state.setattr(torch.jit, "is_tracing", lambda: False)
    native_state.setattr(torch.jit, "is_scripting", lambda: True)
    assert not native.usable(x, x, None, None)
    native_state.setattr(torch.jit, "is_scripting", lambda: False)
    assert native.usable(x, x, None, None)
    native_state.setattr(native, "_status", "off: test")
    assert not native.usable(x, x, None, None)
    native_state.setattr(native, "_status", "on: test")
    native_state.setattr(native, "_enabled", False)
    assert not native.usable(x, x, None, None)


def test_usable_while_compiling_decides_from_flags_only(native_state):
    native_state.setattr(torch.compiler, "is_compiling", lambda: True)
    native_state.setattr(native, "prepare", lambda: pytest.fail("never builds inside a trace"))
    x, s, i = torch.randn(1, 5, 4), torch.ones(1, 5, 1), torch.zeros(1, 5, dtype=torch.long)
    for enabled, available, want in ((True, True, True), (False, True, False), (True, False, False)):
        native_state.setattr(native, "_enabled", enabled)
        native_state.setattr(native, "_available", available)
        assert native.usable(torch.nn.Parameter(x).detach(), x, s, i) is want
    native_state.setattr(native, "_enabled", True)
    native_state.setattr(native, "_available", True)
    assert not native.usable(x, x, s.double(), i) and not native.usable(x, x, s, i.int())


def test_call_refuses_when_off(native_state):
    native_state.setattr(native, "_fn", None)
    native_state.setattr(native, "_status", "off: no compiler")
    with pytest.raises(RuntimeError, match=r"^the native ToMe step is off: no compiler$"):
        native._call(torch.randn(1, 5, 4), torch.randn(1, 5, 4), None, None, 1, 1, 0)


@needs_native
def test_call_loads_the_step_on_first_use(native_state):
    fn = native._fn
    native_state.setattr(native, "_fn", None)
    native_state.setattr(native, "_status", None)
    native_state.setattr(native, "load", lambda: (fn, "on: test"))
    x, metric, _, _ = random_case(23, 1, 9, 4, 3, 1, 2)
    with torch.no_grad():
        out, size, index = native._call(x, metric, None, None, 2, 1, 0)
    assert native._fn is fn and out.shape == (1, 7, 4) and size.sum() == 9 and index is None


def test_call_reports_out_of_memory(native_state):
    native_state.setattr(native, "_fn", lambda *args: 1)
    with pytest.raises(MemoryError, match=r"^native ToMe step: out of memory for its scratch buffers$"):
        native._call(torch.randn(1, 5, 4), torch.randn(1, 5, 4), None, None, 1, 1, 0)


@needs_native
def test_call_hands_the_c_step_its_arguments(native_state):
    seen = []
    real = native._fn

    def spy(*args):
        seen.append(args)
        return real(*args)

    native_state.setattr(native, "_fn", spy)
    x, metric, size, index = random_case(11, 2, 9, 4, 3, 1, 2, heads=2)
    with torch.no_grad():
        native._call(x, metric, size, index, 2, 1, 2)
        native._call(x, metric[:, :, 0], None, None, 2, 1, 1)
    a, b = seen
    assert a[4:16] == (2, 9, 4, 3, 2 * 9 + 1, 2, 1, 2, 9 * 2 * 3, 2 * 3, 3, 2)
    assert b[1] is not None and b[2] is None and b[3] is None and b[4:16] == (2, 9, 4, 3, 0, 2, 1, 1, 54, 6, 3, 1)
    assert a[-1] == b[-1] == torch.get_num_threads()


@needs_native
@pytest.mark.parametrize("op", ["merge", "prune", "mlerp"])
def test_native_reduce_handles_any_metric_layout(op):
    """(B, N, d), (B, N, H, d) dense, and strided views of the keys, with and without size and index."""
    x, metric4, size, index = random_case(13, 3, 21, 5, 4, 2, 6, heads=3)
    for metric in (metric4, metric4.mean(2), metric4.transpose(1, 2).contiguous().transpose(1, 2),
                   metric4.transpose(2, 3).contiguous().transpose(2, 3)):
        for s, i in ((size, index), (None, None)):
            with torch.no_grad():
                got = native.reduce(x, metric, s, i, 6, 2, op)
                with native.disabled():
                    want = tome_ops.tofu_reduce(x, metric, s, i, 6, 2, op)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], want[1])
            assert (got[2] is None and want[2] is None) or torch.equal(got[2], want[2])
    strided_x = torch.randn(3, 5, 21).transpose(1, 2)                 # a non-contiguous token tensor
    with torch.no_grad():
        got = native.reduce(strided_x, metric4, None, None, 6, 2, op)
        with native.disabled():
            want = tome_ops.tofu_reduce(strided_x, metric4, None, None, 6, 2, op)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


@needs_native
def test_native_reduce_under_compile_calls_the_custom_operator(native_state):
    native_state.setattr(torch.compiler, "is_compiling", lambda: True)
    x, metric, size, index = random_case(17, 2, 11, 4, 3, 1, 3)
    with torch.no_grad():
        for op in ("merge", "prune", "mlerp"):
            got = native.reduce(x, metric, size, index, 3, 1, op)
            want = native._call(x, metric, size, index, 3, 1, native.OPS[op])
            for g, w in zip(got, want):
                assert torch.equal(g, w)
        out, new_size, new_index = native.reduce(x, metric, None, None, 3, 1)       # op defaults to merge
        assert new_index is None
        want = native._call(x, metric, None, None, 3, 1, 0)
        assert torch.equal(out, want[0]) and torch.equal(new_size, want[1])
    assert native.OPS == {"merge": 0, "prune": 1, "mlerp": 2}


@needs_native
def test_the_fake_kernel_gives_the_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, metric = torch.empty(2, 11, 4), torch.empty(2, 11, 3)
        out, size, index = torch.ops.tokenopt.bipartite_reduce(x, metric, None, torch.empty(2, 5, dtype=torch.long),
                                                               3, 1, 0)
        assert out.shape == (2, 8, 4) and size.shape == (2, 8, 1) and index.shape == (2, 5)
        _, _, none = torch.ops.tokenopt.bipartite_reduce(x, metric, None, None, 3, 1, 0)
        assert none.shape == (0,) and none.dtype == torch.long


# ------------------------------------------------------------------------------------------------
# building the native step (tokenopt.ops.native.build), with a stand-in compiler


def fake_compiler(tmp_path: Path, version: str, so: Path | None) -> Path:
    """An executable that records its arguments, prints ``version`` for --version and "links" by
    copying ``so`` to the -o target (or fails while a file ``fail`` exists next to it)."""
    log = tmp_path / "cc.log"
    script = tmp_path / "fakecc"
    script.write_text(f"""#!{sys.executable}
import os, shutil, sys
args = sys.argv[1:]
if args == ["--version"]:
    print({version!r}); sys.exit(0)
open({str(log)!r}, "a").write(" ".join(args) + "\\n")
if os.path.exists({str(tmp_path / "fail")!r}):
    sys.stderr.write("fake error: " + "x" * 600); sys.exit(1)
shutil.copy({str(so)!r}, args[args.index("-o") + 1])
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def real_library() -> Path:
    return Path(native.status().split("on: ", 1)[1])


def test_cache_dir_and_cpu_fingerprint(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path))
    assert cache_paths.native_build_dir() == tmp_path / "native"
    assert build.native_build_dir is cache_paths.native_build_dir
    fp = build._cpu_fingerprint()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = sorted({ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))})
    if text:
        assert fp == "\n".join(lines)
    real_read = Path.read_text

    def no_proc(self, *a, **k):
        if str(self) == "/proc/cpuinfo":
            raise OSError("no /proc")
        return real_read(self, *a, **k)

    arm = "processor\t: 0\nFeatures\t: fp asimd\nCPU part\t: 0xd0c\nmodel name\t: ARMv8\nFeatures\t: fp asimd\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: arm if str(self) == "/proc/cpuinfo"
                        else real_read(self, *a, **k))
    assert build._cpu_fingerprint() == "Features\t: fp asimd\nmodel name\t: ARMv8"
    monkeypatch.setattr(Path, "read_text", no_proc)
    assert build._cpu_fingerprint() == (platform.processor() or platform.machine())
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert build._cpu_fingerprint() == platform.machine()


def test_gnu_openmp_detection(monkeypatch):
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    info = torch.__config__.parallel_info()
    want = "parallel backend: OpenMP" in info and "libgomp" in maps
    assert build._torch_uses_gnu_openmp() is want
    monkeypatch.setattr(torch.__config__, "parallel_info", lambda: "ATen parallel backend: OpenMP")
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "7f00 r-xp /usr/lib/libgomp.so.1"
                        if str(self) == "/proc/self/maps" else real_read(self, *a, **k))
    assert build._torch_uses_gnu_openmp() is True
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "7f00 r-xp /usr/lib/libiomp5.so"
                        if str(self) == "/proc/self/maps" else real_read(self, *a, **k))
    assert build._torch_uses_gnu_openmp() is False

    def no_maps(self, *a, **k):
        raise OSError("no /proc")
    monkeypatch.setattr(Path, "read_text", no_maps)
    assert build._torch_uses_gnu_openmp() is False
    monkeypatch.setattr(torch.__config__, "parallel_info", lambda: "ATen parallel backend: native thread pool")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "libgomp")
    assert build._torch_uses_gnu_openmp() is False


def test_gcc_is_told_from_clang(tmp_path):
    gcc = fake_compiler(tmp_path, "gcc (Debian 12.2.0) 12.2.0\nCopyright (C) 2022 Free Software Foundation, Inc.", None)
    assert build._is_gcc(str(gcc)) is True
    clang_dir = tmp_path / "clang"
    clang_dir.mkdir()
    clang = fake_compiler(clang_dir, "Apple clang version 15\nFree Software Foundation", None)
    assert build._is_gcc(str(clang)) is False
    other = tmp_path / "other"
    other.mkdir()
    assert build._is_gcc(str(fake_compiler(other, "tcc version 0.9.27", None))) is False
    assert build._is_gcc(str(tmp_path / "missing-cc")) is False


@needs_native
@pytest.mark.parametrize("openmp", [True, False])
def test_build_compiles_once_into_a_digest_folder(monkeypatch, tmp_path, openmp):
    cc = fake_compiler(tmp_path, "gcc 12\nFree Software Foundation", real_library())
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_torch_uses_gnu_openmp", lambda: openmp)
    path = build._build()
    flags = build.FLAGS + (["-fopenmp"] if openmp else [])
    assert build.FLAGS == ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]
    import hashlib
    digest = hashlib.sha256(build.SOURCE.read_bytes() + " ".join([str(cc), *flags]).encode()
                            + build._cpu_fingerprint().encode()).hexdigest()[:16]
    assert path == tmp_path / "cache" / "native" / digest / "tome_merge.so"
    assert path.read_bytes() == real_library().read_bytes()
    assert os.listdir(path.parent) == ["tome_merge.so"]                    # the temporary file was renamed
    logged = (tmp_path / "cc.log").read_text().splitlines()
    assert len(logged) == 1
    args = logged[0].split()
    tmp = args[args.index("-o") + 1]
    assert args == [*flags, str(build.SOURCE), "-o", tmp, "-lm"]
    assert Path(tmp).parent == path.parent and tmp.endswith(".so") and not Path(tmp).exists()
    assert build._build() == path and len((tmp_path / "cc.log").read_text().splitlines()) == 1   # cached


def test_a_failing_compiler_leaves_nothing_behind(monkeypatch, tmp_path):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"a library")
    cc = fake_compiler(tmp_path, "cc 1", lib)
    (tmp_path / "fail").touch()
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError) as e:
        build._build()
    assert str(e.value) == f"{cc} failed: fake error: " + "x" * (500 - len("fake error: "))
    (folder,) = (tmp_path / "cache" / "native").iterdir()
    assert list(folder.iterdir()) == []                                   # the temporary file is gone
    (tmp_path / "fail").unlink()                                         # fixed: the next try builds
    assert build._build().read_bytes() == b"a library"


def test_a_hung_compiler_is_given_up_on(monkeypatch, tmp_path):
    def run(cmd, **kw):
        if kw.get("timeout") is None:
            pytest.fail(f"{cmd} runs without a timeout: a hung compiler would hang tokenopt")
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(build.subprocess, "run", run)
    assert build._is_gcc("/usr/bin/cc") is False
    monkeypatch.setenv("CC", "/usr/bin/cc")
    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path))
    monkeypatch.delenv("TOKENOPT_NATIVE", raising=False)
    fn, status = build.load()
    assert fn is None and status.startswith("off: could not build the native ToMe step (Command")


def test_the_compiler_is_cc_then_gcc_then_clang(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"^no C compiler \(cc, gcc or clang\) on PATH$"):
        build._build()
    seen = []
    monkeypatch.setattr(build, "_torch_uses_gnu_openmp", lambda: True)
    monkeypatch.setattr(build, "_is_gcc", lambda c: seen.append(c) or False)

    def stop():
        raise RuntimeError("stop here")
    monkeypatch.setattr(build, "native_build_dir", stop)
    for found, want in (({"cc": "/usr/bin/cc", "gcc": "/opt/gcc"}, "/usr/bin/cc"),
                        ({"gcc": "/opt/gcc", "clang": "/opt/clang"}, "/opt/gcc"), ({"clang": "/opt/clang"}, "/opt/clang")):
        monkeypatch.setattr(build.shutil, "which", found.get)
        with pytest.raises(RuntimeError, match="stop here"):
            build._build()
        assert seen[-1] == want
    monkeypatch.setenv("CC", "/my/cc")
    with pytest.raises(RuntimeError, match="stop here"):
        build._build()
    assert seen[-1] == "/my/cc"


@pytest.mark.parametrize("value", ["0", "false", "no", "off", " OFF ", "False"])
def test_the_environment_switch(monkeypatch, value):
    monkeypatch.setenv("TOKENOPT_NATIVE", value)
    monkeypatch.setattr(build, "_build", lambda: pytest.fail("must not build"))
    assert build.load() == (None, "off: TOKENOPT_NATIVE=0")


@needs_native
def test_load_gives_a_typed_function(monkeypatch):
    monkeypatch.setenv("TOKENOPT_NATIVE", "1")
    monkeypatch.setattr(build, "_build", lambda: real_library())
    fn, status = build.load()
    assert status == f"on: {real_library()}"
    import ctypes
    assert fn.restype is ctypes.c_int
    assert fn.argtypes == [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 12 + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    monkeypatch.delenv("TOKENOPT_NATIVE")
    assert build.load()[1] == f"on: {real_library()}"


@pytest.mark.parametrize("error", [OSError("bad library"), RuntimeError("cc failed"),
                                   subprocess.TimeoutExpired("cc", 120)])
def test_load_failures_turn_the_step_off(monkeypatch, error):
    monkeypatch.delenv("TOKENOPT_NATIVE", raising=False)

    def fail():
        raise error
    monkeypatch.setattr(build, "_build", fail)
    assert build.load() == (None, f"off: could not build the native ToMe step ({error})")
