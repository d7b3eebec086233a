"""The native ToMe step equals the PyTorch definition, and is only used where it may be.

Tests of the native step itself skip where it cannot be built; tests of the fallback (the PyTorch
path, and tokenopt working without the native step) run everywhere, with the step forced off.
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenopt
from tokenopt.ops import native
from tokenopt.ops import tome as tome_ops
from tokenopt.ops.matching import (bipartite_match, max_reduction, merge_mlerp, merge_sum, merge_weighted,
                                   merged_positions, prune)

needs_native = pytest.mark.skipif(native.status().startswith("off"), reason=f"native step {native.status()}")


@pytest.fixture
def native_off(monkeypatch, tmp_path):
    """The process as it is on a machine where the native step cannot be built."""
    monkeypatch.setattr(native, "_fn", None)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_available", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path))
    assert native.status().startswith("off: could not build")
    return monkeypatch


def _torch_step(x, metric, size, index, r, prefix, op="merge"):
    m = bipartite_match(metric, r, prefix)
    ones = x.new_ones(x.shape[0], x.shape[1], 1)
    if op == "merge":
        out, new_size = merge_weighted(x, size, m)
    elif op == "prune":
        out, new_size = prune(x, m), prune(size if size is not None else ones, m)
    else:
        out, new_size = merge_mlerp(x, m), merge_sum(size if size is not None else ones, m)
    new_index = merged_positions(x.shape[1], m).gather(1, index) if index is not None else None
    return out, new_size, new_index


@needs_native
@pytest.mark.parametrize("batch", [1, 5])          # fewer images than threads, and more
@pytest.mark.parametrize("n,c,d,prefix", [(65, 96, 24, 1), (64, 33, 5, 2), (17, 8, 8, 0), (30, 40, 64, 3)])
@pytest.mark.parametrize("sized", [False, True])
@pytest.mark.parametrize("op", ["merge", "prune", "mlerp"])
def test_native_step_equals_the_pytorch_step(batch, n, c, d, prefix, sized, op):
    g = torch.Generator().manual_seed(n * 7 + batch)
    x = torch.randn(batch, n, c, generator=g)
    metric = torch.randn(batch, n, d, generator=g)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).float() if sized else None
    index = torch.randint(0, n, (batch, 2 * n), generator=g)
    for r in sorted({0, 1, max_reduction(n, prefix) // 2, max_reduction(n, prefix)}):
        with torch.no_grad():
            got = native.reduce(x, metric, size, index, r, prefix, op)
            want = _torch_step(x, metric, size, index, r, prefix, op)
        assert got[0].shape == (batch, n - r, c)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1] if want[1] is not None else torch.ones(batch, n - r, 1))
        assert torch.equal(got[2], want[2])


@pytest.mark.parametrize("path", [pytest.param("native", marks=needs_native), "pytorch"])
def test_size_weighted_average_by_hand(path, request):
    # 5 tokens, prefix 1: A = {0 (prefix), 2, 4}, B = {1, 3}; token 4 is a copy of token 3's
    # direction, token 2 is orthogonal to both B tokens' directions -> with r=1, 4 merges into 3
    metric = torch.tensor([[[1., 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [2, 2, 0]]])
    x = torch.arange(15.).reshape(1, 5, 3)
    size = torch.tensor([[[1.], [1.], [1.], [3.], [1.]]])
    with torch.no_grad():
        if path == "native":
            out, new_size, _ = native.reduce(x, metric, size, None, 1, 1)
        else:
            request.getfixturevalue("native_off")
            out, new_size, _ = tome_ops.tome_merge(x, metric, size, None, 1, 1)
    # output order: prefix, unmerged A (token 2), B tokens (1, 3)
    assert torch.equal(new_size, torch.tensor([[[1.], [1.], [1.], [4.]]]))
    torch.testing.assert_close(out[0, :3], x[0, [0, 2, 1]])
    torch.testing.assert_close(out[0, 3], (3 * x[0, 3] + x[0, 4]) / 4)


@needs_native      # where it cannot be built, nothing may take it (test_without_a_compiler_...)
def test_pytorch_path_where_native_may_not_run():
    x, metric = torch.randn(1, 9, 4), torch.randn(1, 9, 4)
    assert native.usable(x, metric, None, None)
    assert not native.usable(x.double(), metric.double(), None, None)
    assert not native.usable(x, metric, None, torch.zeros(1, 9, dtype=torch.int32))
    leaf = x.clone().requires_grad_()
    assert not native.usable(leaf, metric, None, None)            # autograd needs the operators
    with torch.no_grad():
        assert native.usable(leaf, metric, None, None)
    with FlopCounterMode(display=False):                           # counters see real operators
        assert not native.usable(x, metric, None, None)
    with native.disabled():
        assert not native.usable(x, metric, None, None)
    assert native.usable(x, metric, None, None)


def test_gradients_flow_through_the_pytorch_path():
    x = torch.randn(2, 9, 4, requires_grad=True)
    out, size, _ = tome_ops.tome_merge(x, torch.randn(2, 9, 4), None, None, 3, 1)
    out.sum().backward()
    assert out.shape == (2, 6, 4) and x.grad is not None
    # every input token contributes with weight 1/group size; the weights of a group sum to 1
    assert torch.allclose(x.grad.sum(), torch.tensor(2 * 6 * 4.))


@pytest.mark.parametrize("op", ["merge", "prune", "mlerp"])
def test_without_a_compiler_the_pytorch_path_runs(native_off, op):
    x, metric = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    size = torch.randint(1, 4, (2, 9, 1)).float()
    index = torch.randint(0, 9, (2, 12))
    assert not native.usable(x, metric, size, index)
    with torch.no_grad():
        got = tome_ops.tofu_reduce(x, metric, size, index, 2, 1, op)
        want = _torch_step(x, metric, size, index, 2, 1, op)
    assert got[0].shape == (2, 7, 4)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setattr(native, "_fn", None)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_available", False)
    monkeypatch.setenv("TOKENOPT_NATIVE", "0")
    assert native.status() == "off: TOKENOPT_NATIVE=0"
    x, metric = torch.randn(1, 9, 4), torch.randn(1, 9, 4)
    assert not native.usable(x, metric, None, None)
    with torch.no_grad():
        out, size, _ = tome_ops.tome_merge(x, metric, None, None, 2, 1)
        want, want_size, _ = _torch_step(x, metric, None, None, 2, 1)
    assert torch.equal(out, want) and torch.equal(size, want_size)


TOFU_FIXED = [{"pass": "tofu", "layers": "first-half", "r": 8, "op": "prune"},
              {"pass": "tofu", "layers": "second-half", "r": 8, "op": "mlerp"}]


@pytest.mark.parametrize("outputs", ["logits", "tokens"])
@pytest.mark.parametrize("rules", [[{"pass": "tome", "r": 12}], TOFU_FIXED], ids=["tome", "tofu"])
def test_optimized_vit_is_the_same_on_both_paths(outputs, rules, native_off):
    """Built and run where the native step cannot be (the PyTorch path), then run again with the
    native step as this machine has it: the same result (trivially so without a compiler)."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=64, patch_size=8, depth=4,
                              embed_dim=64, num_heads=2, num_classes=10).eval()
    recipe = {"version": 1, "rules": rules}
    fast = tokenopt.optimize(model, recipe, outputs=outputs, report=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = fast(x)
        native_off.undo()
        got = fast(x)
    assert got.shape == ((2, 64, 64) if outputs == "tokens" else (2, 10))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", [pytest.param("native", marks=needs_native), "pytorch"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("flat", [False, True])          # k as (B, H, N, d) or (B*H, N, d)
def test_per_head_keys_are_averaged_in_place(batch, flat, path, request):
    # the graph hands the matching a strided (B, N, H, d) view of the keys; both paths average
    # the heads (the native one by summing while it normalises, without a copy)
    g = torch.Generator().manual_seed(batch)
    heads, n, d = 3, 41, 12
    qkv = torch.randn(batch, n, 3, heads, d, generator=g).permute(2, 0, 3, 1, 4)   # timm's layout
    k = qkv[1] if not flat else qkv[1].reshape(batch * heads, n, d)
    x = torch.randn(batch, n, 20, generator=g)
    metric = tome_ops.keys_per_token(k, x)
    assert metric.shape == (batch, n, heads, d) and not metric.is_contiguous()
    with torch.no_grad():
        if path == "native":
            got = native.reduce(x, metric, None, None, 15, 1)
        else:
            request.getfixturevalue("native_off")
            got = tome_ops.tome_merge(x, metric, None, None, 15, 1)
        want = _torch_step(x, qkv[1].mean(1), None, None, 15, 1)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1])
