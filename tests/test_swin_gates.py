"""SPA's gates on Swin train through the windowed path: the task loss reaches them (straight-through),
and mask labels are rasterised at each stage's own grid."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import tokenopt
from tokenopt.passes.spa import capture_gate_outputs, gates_of
from tokenopt.train.gate import train_gates

from test_windows import X, logits_of, spa, tiny_swin


def _gates_only(gm):
    for p in gm.parameters():
        p.requires_grad_(False)
    gates = gates_of(gm)
    for g in gates.values():
        for p in g.parameters():
            p.requires_grad_(True)
    return gates


def _train_gates_only(gm):
    gm.eval()
    for g in gates_of(gm).values():
        g.train()


@pytest.mark.parametrize("grouping", ["window", "container"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_the_task_loss_reaches_every_gate_and_leaves_the_values_alone(grouping, capture):
    m = tiny_swin()
    gm = tokenopt.optimize(m, spa("stage2", gate={"hidden": 0, "noise": 0.0}, grouping=grouping), X,
                           report=False, capture=capture)
    gates = _gates_only(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.eval()
        with torch.no_grad():
            want = logits_of(gm(X))
        _train_gates_only(gm)   # noise 0: training selects as inference does; the straight-through term is 0
        with capture_gate_outputs(gm) as seen:
            got = logits_of(gm(X))
    kept = [float(o.keep.float().mean()) for o in seen.values()]
    assert all(0.0 < k < 1.0 for k in kept), kept     # some tokens skip: the selection matters
    assert (got - want).abs().max() <= 1e-5
    F.cross_entropy(got, torch.tensor([1, 2])).backward()
    assert sorted(gates) == [2, 3]
    for i, g in gates.items():
        grad = g.score.weight.grad
        assert grad is not None and grad.abs().sum() > 1e-6, f"gate {i} got no gradient from the task loss"


def test_keeping_every_token_in_training_is_still_the_original():
    m = tiny_swin()
    gm = tokenopt.optimize(m, spa("all", threshold=0.0, min_keep=1.0, gate={"hidden": 0, "noise": 0.0}), X,
                           report=False)
    _train_gates_only(gm)      # timm's Swin drops paths in training: only the gates train here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (logits_of(gm(X)) - logits_of(m(X))).abs().max() <= 1e-5


class _Squares(torch.utils.data.Dataset):
    """(image, label, mask): a bright square whose mask covers the top-left 32x32 of 64x64."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        mask = torch.zeros(64, 64, dtype=torch.bool)
        mask[:32, :32] = True
        return torch.randn(3, 64, 64) + 2 * mask, i % 10, mask


def test_mask_labels_are_rasterised_at_each_stages_grid(monkeypatch):
    """Gates on stage 1 (16x16 tokens) and stage 2 (8x8): each gate's BCE gets labels on its own grid."""
    import tokenopt.train.gate as gate_mod
    seen = []
    real = gate_mod.gate_bce

    def spy(prob, valid, labels, prefix):
        seen.append((prob.shape[1], tuple(labels.shape), int(labels.sum())))
        return real(prob, valid, labels, prefix)

    monkeypatch.setattr(gate_mod, "gate_bce", spy)
    m = tiny_swin()
    gm = tokenopt.optimize(m, spa([1, 2]), X, report=False)
    train_gates(gm, m, _Squares(), "masks", epochs=1, batch_size=4, quiet=True)
    # the top-left quarter: 8x8 of the 16x16 tokens, 4x4 of the 8x8, per image (4 images)
    assert sorted(set(seen)) == [(64, (4, 64), 4 * 16), (256, (4, 256), 4 * 64)]
