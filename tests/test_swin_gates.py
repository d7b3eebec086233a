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


# ---------------------------------------------------------------- gate context: previous (s = max(f(r), s_up))

def context_recipe(first, rest, context="previous"):
    return {"version": 1, "rules": [{"pass": "spa", "layers": first},
                                    {"pass": "spa", "layers": rest, "gate": {"context": context}}]}


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_context_previous_is_the_max_of_own_score_and_the_previous_pooled_across_merging(capture):
    """Gate 1 on stage 1 (16x16), gates 2 and 3 on stage 2 (8x8) with context: previous: gate 2's score is
    max(own, 2x2 max of gate 1's), gate 3's is max(own, gate 2's), computed by hand from each gate's input."""
    m = tiny_swin()
    gm = tokenopt.optimize(m, context_recipe([1], [2, 3]), X, report=False, capture=capture)
    gates = gates_of(gm)
    inputs = {}
    hooks = [g.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
             for i, g in gates.items()]
    with torch.no_grad(), warnings.catch_warnings(), capture_gate_outputs(gm) as seen:
        warnings.simplefilter("ignore")
        gm(X)
        own = {i: gates[i].score(inputs[i]).squeeze(-1) for i in gates}
    for h in hooks:
        h.remove()
    b = X.shape[0]
    g1 = own[1].view(b, 16, 16)
    pooled = torch.empty(b, 8, 8)
    for i in range(8):
        for j in range(8):
            pooled[:, i, j] = g1[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(b, 4).max(1).values
    s2 = torch.maximum(own[2], pooled.view(b, 64))
    s3 = torch.maximum(own[3], s2)
    assert torch.allclose(seen[1].prob, torch.sigmoid(own[1]), atol=1e-5)
    assert torch.allclose(seen[2].prob, torch.sigmoid(s2), atol=1e-5)
    assert torch.allclose(seen[3].prob, torch.sigmoid(s3), atol=1e-5)
    wins = pooled.view(b, 64) > own[2]
    assert 0 < int(wins.sum()) < wins.numel()       # the context decides some tokens, not all


def test_context_previous_on_the_first_spa_layer_is_refused_naming_it(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from tokenopt.cli import app
    recipe = tmp_path / "spa.yaml"
    recipe.write_text(yaml.safe_dump(context_recipe([2], [1, 3])))      # layer 1 comes first in the model
    out = tmp_path / "m.pt"
    spec = "timm:swin_tiny_patch4_window7_224?img_size=64&embed_dim=32&depths=2,2&num_heads=1,2&window_size=4"
    res = CliRunner().invoke(app, ["apply", str(recipe), spec, "-o", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    text = " ".join(res.output.split())
    assert "spa.yaml, line 5 (rule 2, pass spa): layers.0.blocks.1 (1) is the first spa layer, so its gate has no previous spa " \
           "layer's score to take (gate context: previous). Give the first spa layer its own rule with context: " \
           "none, or drop context: previous." in text, text
    assert not out.exists()
