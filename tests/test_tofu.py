"""ToFu: prune / merge / MLERP against definitions written here, and mixed recipes."""
from pathlib import Path

import pytest
import timm
import torch

import tokenopt
from tokenopt.errors import RecipeError
from tokenopt.ops.matching import bipartite_match, merge_mlerp, prune
from tokenopt.ops.tome import tofu_reduce
from tokenopt.record import record_of


def _groups(m, n):
    """{output position: [input positions]} from a Match, read back from its fields."""
    groups = {}
    for b in range(m.keep.shape[0]):
        g = {j: [int(p)] for j, p in enumerate(m.keep[b])}
        for s, d in zip(m.src[b].tolist(), m.dst[b].tolist()):
            g[d].append(s)
        groups[b] = g
    return groups


def test_mlerp_direction_and_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 21, 16) * torch.rand(2, 21, 1) * 5
    metric = torch.randn(2, 21, 8)
    m = bipartite_match(metric, 7, prefix=1)
    out = merge_mlerp(x, m)
    for b, groups in _groups(m, 21).items():
        for j, members in groups.items():
            xs = x[b, members]
            mean = xs.mean(0)
            # direction of the unweighted mean, norm of the largest member
            cos = torch.nn.functional.cosine_similarity(out[b, j], mean, dim=0)
            assert cos.item() > 1 - 1e-5
            assert torch.allclose(out[b, j].norm(), xs.norm(dim=-1).max(), rtol=1e-5)
    assert any(len(g) > 2 for groups in _groups(m, 21).values() for g in groups.values())


def test_prune_keeps_unmatched_and_untouched_partners():
    torch.manual_seed(1)
    x = torch.randn(3, 18, 8)
    m = bipartite_match(torch.randn(3, 18, 4), 5, prefix=2)
    out = prune(x, m)
    assert out.shape == (3, 13, 8)
    for b in range(3):
        dropped = set(m.src[b].tolist())
        kept = [p for p in range(18) if p not in dropped]
        # every kept token unchanged; order: prefix, unmerged A, B
        assert sorted(m.keep[b].tolist()) == kept
        assert torch.equal(out[b], x[b, m.keep[b]])
        assert m.keep[b, :2].tolist() == [0, 1]


def test_pruned_tokens_add_no_size():
    x = torch.randn(2, 17, 8)
    size = torch.randint(1, 4, (2, 17, 1)).float()
    metric = torch.randn(2, 17, 4)
    _, s_prune, _ = tofu_reduce(x, metric, size, None, 6, 1, "prune")
    _, s_mlerp, _ = tofu_reduce(x, metric, size, None, 6, 1, "mlerp")
    m = bipartite_match(metric, 6, 1)
    for b in range(2):
        assert torch.equal(s_prune[b, :, 0], size[b, m.keep[b], 0])
    assert torch.allclose(s_mlerp.sum(dim=(1, 2)), size.sum(dim=(1, 2)))     # merging conserves patches
    assert (s_prune.sum(dim=(1, 2)) < size.sum(dim=(1, 2))).all()


def _model():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=64, patch_size=8, depth=4, num_classes=10,
                             embed_dim=96, num_heads=4).eval()


def test_mixed_recipe_token_counts():
    recipe = {"version": 1, "rules": [
        {"pass": "tofu", "layers": "0-1", "r": 10, "op": "prune"},
        {"pass": "tofu", "layers": "2-3", "r": [6, 4], "op": "mlerp"}]}
    fast = tokenopt.optimize(_model(), recipe)
    assert [(r.tokens_in, r.tokens_out) for r in record_of(fast).report.rows] == [(65, 55), (55, 45), (45, 39), (39, 35)]
    assert [r.acted.split(": ")[1] for r in record_of(fast).report.rows] == ["prune r=10", "prune r=10", "mlerp r=6", "mlerp r=4"]
    with torch.no_grad():
        assert fast(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_tofu_merge_equals_tome():
    m = _model()
    x = torch.randn(2, 3, 64, 64)
    a = tokenopt.optimize(m, {"version": 1, "rules": [{"pass": "tofu", "r": 6, "op": "merge"}]}, report=False)
    b = tokenopt.optimize(m, {"version": 1, "rules": [{"pass": "tome", "r": 6}]}, report=False)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_auto_uses_the_probe_and_needs_calibration():
    m = _model()
    recipe = {"version": 1, "rules": [{"pass": "tofu", "r": 6, "op": "auto"}]}
    with pytest.raises(RecipeError, match="calibration"):
        tokenopt.optimize(m, recipe)
    fast = tokenopt.optimize(m, recipe, calibration=torch.randn(8, 3, 64, 64))
    ops = [r.acted for r in record_of(fast).report.rows]
    assert sum("prune" in o for o in ops) == 2 and sum("mlerp" in o for o in ops) == 2


def test_unknown_op_is_a_recipe_error():
    with pytest.raises(RecipeError, match="op"):
        tokenopt.optimize(_model(), {"version": 1, "rules": [{"pass": "tofu", "r": 6, "op": "squash"}]})


def test_fixed_rule_recipe_splits_by_depth():
    recipe = Path(__file__).parents[1] / "recipes" / "tofu-r8.yaml"
    fast = tokenopt.optimize(_model(), recipe)
    assert [r.acted.split(": ")[1] for r in record_of(fast).report.rows] == ["prune r=8"] * 2 + ["mlerp r=8"] * 2
