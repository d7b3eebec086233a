"""SPA's ops against per-image references: pack/unpack, isolated attention (every strategy), the
selection, the grid bookkeeping and the pooling over kept tokens."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenopt.ops import gates as G
from tokenopt.ops import packing as P

CPU_STRATEGIES = ["loop", "padded", "blockdiag", "containers"]
B, N, H, D = 6, 11, 3, 8


def keep_mask(seed=0, prefix=1):
    """Per image a different count: image 1 keeps only its prefix token, image 2 keeps everything."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, N, generator=g) < torch.linspace(0.2, 0.8, B)[:, None]
    keep[:, :prefix] = True
    keep[1, prefix:] = False
    keep[2] = True
    assert len(set(keep.sum(1).tolist())) >= 4
    return keep


def reference_attention(q, k, v, lengths, scale=None):
    """Each image's tokens through attention alone, written from the definition in float64."""
    out, start = [], 0
    for n in lengths.tolist():
        qi, ki, vi = (t[..., start:start + n, :].double() for t in (q, k, v))
        s = qi.shape[-1] ** -0.5 if scale is None else scale
        out.append(((qi @ ki.transpose(-2, -1)) * s).softmax(-1) @ vi)
        start += n
    return torch.cat(out, -2)


def packed_qkv(keep, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = int(keep.sum())
    return [torch.randn(1, H, t, D, generator=g, dtype=dtype) for _ in range(3)]


# ------------------------------------------------------------------------------------------------
# pack / unpack


def test_pack_is_each_images_kept_rows_in_order_and_unpack_inverts_it():
    x = torch.randn(B, N, 5)
    keep = keep_mask()
    packed, lengths = P.pack(x, keep)
    assert packed.shape == (1, int(keep.sum()), 5)
    expect = torch.cat([x[i][keep[i]] for i in range(B)])          # image by image, original order
    assert torch.equal(packed[0], expect)
    assert lengths.tolist() == [int(keep[i].sum()) for i in range(B)]
    assert P.offsets(lengths).tolist() == [sum(lengths.tolist()[:i]) for i in range(B)]
    assert torch.equal(P.unpack(packed, keep, into=x), x)
    # unpack writes exactly the kept rows and leaves the others
    other = torch.zeros_like(x)
    out = P.unpack(packed, keep, into=other)
    assert torch.equal(out[keep], x[keep]) and torch.equal(out[~keep], other[~keep])


def test_padded_pack_puts_kept_rows_first_and_unpack_inverts_it():
    x = torch.randn(B, N, 5)
    keep = keep_mask()
    cap = int(keep.sum(1).max())
    padded, rows, filled = P.pack_padded(x, keep, cap)
    assert padded.shape == (B, cap, 5)
    for i in range(B):
        n = int(keep[i].sum())
        assert filled[i].tolist() == [True] * n + [False] * (cap - n)
        assert torch.equal(padded[i, :n], x[i][keep[i]])
        assert torch.equal(rows[i, :n], keep[i].nonzero().squeeze(1))
    assert torch.equal(P.unpack_padded(padded, rows, filled, into=x), x)
    out = P.unpack_padded(padded * 2, rows, filled, into=x)
    assert torch.equal(out[keep], 2 * x[keep]) and torch.equal(out[~keep], x[~keep])


# ------------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_packed_attention_equals_each_image_alone(strategy, scale):
    keep = keep_mask()
    lengths = keep.sum(1)
    q, k, v = packed_qkv(keep)
    out = P.isolated_attention(q, k, v, scale=scale, lengths=lengths, strategy=strategy)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, lengths, scale), rtol=0, atol=1e-5)
    # (B*H)-style 3-D input: one image's heads first
    out3 = P.isolated_attention(q[0], k[0], v[0], scale=scale, lengths=lengths, strategy=strategy)
    torch.testing.assert_close(out3, out[0], rtol=0, atol=1e-6)


def test_padded_layout_attention_equals_each_image_alone():
    keep = keep_mask()
    lengths = keep.sum(1)
    cap = N
    q, k, v = packed_qkv(keep)
    ref = reference_attention(q, k, v, lengths)

    def padded(t):   # (1, H, T, d) -> (B, H, cap, d), garbage in the empty slots
        out = torch.randn(B, H, cap, D)
        for i, (s, n) in enumerate(zip(P.offsets(lengths).tolist(), lengths.tolist())):
            out[i, :, :n] = t[0, :, s:s + n]
        return out

    out = P.isolated_attention(padded(q), padded(k), padded(v), lengths=lengths, capacity=cap, layout="padded")
    for i, (s, n) in enumerate(zip(P.offsets(lengths).tolist(), lengths.tolist())):
        torch.testing.assert_close(out[i, :, :n].double(), ref[0, :, s:s + n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
def test_no_value_or_gradient_crosses_images(strategy):
    keep = keep_mask()
    lengths = keep.sum(1)
    starts = P.offsets(lengths).tolist()
    image = torch.repeat_interleave(torch.arange(B), lengths)
    victim = 3
    w = torch.randn(1, H, int(lengths.sum()), D, generator=torch.Generator().manual_seed(5))

    def run(perturb: bool):
        q, k, v = (t.clone().requires_grad_() for t in packed_qkv(keep))
        if perturb:
            with torch.no_grad():
                for t in (q, k, v):
                    t[..., image == victim, :] += 10 * torch.randn_like(t[..., image == victim, :])
        out = P.isolated_attention(q, k, v, lengths=lengths, strategy=strategy)
        (out * w * (image != victim)[None, None, :, None]).sum().backward()   # a loss on the others only
        return out.detach(), q.grad, k.grad, v.grad

    clean, perturbed = run(False), run(True)
    others = image != victim
    assert torch.equal(clean[0][..., others, :], perturbed[0][..., others, :])
    for g0, g1 in zip(clean[1:], perturbed[1:]):
        assert torch.equal(g0[..., others, :], g1[..., others, :])
        assert not g1[..., ~others, :].any()              # the victim gets no gradient from the others' loss
    assert starts  # (keeps the offsets computed above meaningful for the message on failure)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen attention runs on CUDA only")
def test_varlen_attention_equals_each_image_alone():
    keep = keep_mask()
    lengths = keep.sum(1).cuda()
    q, k, v = (t.cuda().half() for t in packed_qkv(keep))
    out = P.isolated_attention(q, k, v, lengths=lengths, strategy="varlen")
    ref = reference_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), lengths.cpu())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=2e-3)


def test_varlen_is_not_used_off_cuda():
    q = torch.randn(1, 2, 4, 8)
    assert not P.varlen_available(q)
    assert P.DEFAULT_STRATEGY["cpu"] in CPU_STRATEGIES


def test_containers_never_split_an_image_and_fill_in_order():
    groups = P.container_layout([3, 5, 2, 7, 1, 1], 8)
    assert groups == [[0, 1], [2], [3, 4], [5]]
    assert P.container_layout([9, 2], 4) == [[0], [1]]          # an image longer than a container gets its own
    assert sum(groups, []) == list(range(6))


# ------------------------------------------------------------------------------------------------
# selection and grid bookkeeping


def reference_select(prob, valid, prefix, threshold, lo, hi):
    keep = torch.zeros_like(valid)
    for i in range(prob.shape[0]):
        cand = [j for j in range(prefix, prob.shape[1]) if valid[i, j]]
        want = sum(1 for j in cand if prob[i, j] >= threshold)
        count = min(max(want, lo), hi, len(cand))
        ranked = sorted(cand, key=lambda j: (-float(prob[i, j]), j))
        for j in ranked[:count]:
            keep[i, j] = True
        for j in range(prefix):
            keep[i, j] = bool(valid[i, j])
    return keep


@pytest.mark.parametrize("prefix, threshold, lo, hi", [(1, 0.5, 2, 6), (0, 0.3, 0, 20), (2, 0.9, 4, 4), (1, 0.0, 0, 3)])
def test_selection_equals_the_per_image_reference(prefix, threshold, lo, hi):
    g = torch.Generator().manual_seed(2)
    prob = torch.rand(B, N, generator=g)
    prob[0, 3] = prob[0, 4] = threshold           # ties at the threshold
    valid = torch.rand(B, N, generator=g) < 0.8
    valid[:, :prefix] = True
    keep = G.select_tokens(prob, valid, prefix, threshold, lo, hi)
    assert torch.equal(keep, reference_select(prob, valid, prefix, threshold, lo, hi))
    assert not (keep & ~valid).any()


def test_random_keep_keeps_the_fraction_of_each_images_patch_tokens():
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[2, 5:] = False
    keep = G.random_keep(valid, 1, 0.5, hi=100, generator=torch.Generator().manual_seed(0))
    assert keep[:, 0].all()
    for i in range(B):
        assert int(keep[i, 1:].sum()) == round(int(valid[i, 1:].sum()) * 0.5)
    assert not (keep & ~valid).any()


def test_rows_to_grid_and_back():
    keep = keep_mask()
    pos = torch.arange(B * N).reshape(B, N)
    packed_pos, _ = P.pack(pos, keep)                         # (1, T) flat positions of the packed rows
    values = torch.randn(packed_pos.shape)
    grid = G.to_grid(values, packed_pos, keep, fill=-7.0)
    assert torch.equal(grid[keep], values[0]) and (grid[~keep] == -7.0).all()
    assert torch.equal(G.from_grid(grid, packed_pos), values)
    # padded: empty slots (-1) read the fill value and write nowhere
    padded_pos = torch.tensor([[0, 3, -1], [N + 1, -1, -1]])
    valid = torch.zeros(2, N, dtype=torch.bool)
    valid[0, [0, 3]] = valid[1, 1] = True
    grid = G.to_grid(torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]]), padded_pos, valid)
    assert grid[0, 0] == 1 and grid[0, 3] == 2 and grid[1, 1] == 3 and grid.sum() == 6
    assert G.from_grid(grid, padded_pos, fill=-1).tolist() == [[1, 2, -1], [3, -1, -1]]


def test_pooling_over_kept_tokens_packed_and_padded():
    x = torch.randn(B, N, 4)
    keep = keep_mask()
    packed, lengths = P.pack(x, keep)
    padded, _, _ = P.pack_padded(x, keep, N)
    for start in (0, 1):
        ref = torch.stack([x[i][keep[i]][start:].mean(0) if keep[i].sum() > start else torch.zeros(4)
                           for i in range(B)])
        torch.testing.assert_close(G.stream_mean(packed, lengths, start, "packed"), ref)
        torch.testing.assert_close(G.stream_mean(padded, lengths, start, "padded"), ref)
    assert torch.equal(G.stream_token(packed, lengths, 0, "packed"), x[:, 0])
    assert torch.equal(G.stream_token(padded, lengths, 0, "padded"), x[:, 0])


def test_straight_through_is_exact_forward_and_carries_the_update_as_gradient():
    xs, y = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
    s = torch.rand(1, 5, requires_grad=True)
    out = G.straight_through(xs, s - s.detach(), y)
    assert torch.equal(out, y)
    w = torch.randn(1, 5, 3)
    (out * w).sum().backward()
    torch.testing.assert_close(s.grad, ((y - xs) * w).sum(-1))


def test_gate_without_noise_trains_on_the_decision_inference_makes():
    """gate: {noise: 0}: in training the gate keeps exactly the tokens it keeps in eval (its
    straight-through weight still carries the task gradient); with the default noise it samples,
    and keeps a different set."""
    from tokenopt.ops.gates import TokenGate

    torch.manual_seed(0)
    x = torch.randn(6, 33, 16)
    for noise, same in ((0.0, True), (1.0, False)):
        gate = TokenGate(16, hidden=0, threshold=0.5, prefix=1, lo=2, hi=30, noise=noise)
        gate.eval()
        with torch.no_grad():
            _, keep_eval, _, _ = gate(x)
        gate.train()
        _, keep_train, ste, _ = gate(x)
        assert torch.equal(keep_train, keep_eval) is same
        assert ste is not None and ste.requires_grad and torch.equal(ste, torch.zeros_like(ste))
