"""Models of several inputs (an image and a conditioning vector, as a denoiser has a sample, a
timestep and text): captured, optimized, checked, saved and reloaded like an image classifier.

The reference is the model itself on the same inputs, with ToMe written out per image by
tests/reference_tome.py's rules: r=0 must be the original exactly, and the two capture front ends
must agree with each other.
"""
from __future__ import annotations

import pytest
import torch

import tokenopt
from tokenopt.analysis import Example
from tokenopt.errors import AnalysisError
from tokenopt.record import record_of, update_record
from vit_models import ConditionedViT

TOME = {"version": 1, "rules": [{"pass": "tome", "r": 3}]}


def model_and_inputs(seed: int = 0):
    torch.manual_seed(seed)
    m = ConditionedViT(img=32, patch=8, dim=64, depth=3).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x, cond = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 64, generator=gen)
    return m, x, cond


def test_example_record_batches_and_orders_inputs():
    x, t, text = torch.randn(4, 3, 8, 8), torch.tensor(7.0), torch.randn(4, 5, 16)
    ex = Example((x, t), {"text": text})
    assert ex.batch_dims == (0, None, 0) and ex.batch == 4 and ex.image is x
    one = ex.first(1)
    assert [list(v.shape) for v in one.tensors()] == [[1, 3, 8, 8], [], [1, 5, 16]]
    assert Example.of(x).args == (x,) and Example.of((x, t)).args == (x, t)
    back = Example.from_manifest(ex.to_manifest())
    assert back.shapes() == ex.shapes() and back.batch_dims == ex.batch_dims and list(back.kwargs) == ["text"]
    with pytest.raises(AnalysisError, match="batch_dims has 1 entries but the example inputs hold 3 tensors"):
        Example((x, t), {"text": text}, batch_dims=(0,))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("keyword", [False, True])
def test_two_input_model_is_optimized_with_tome(capture, keyword):
    m, x, cond = model_and_inputs()
    ex = Example((x,), {"cond": cond}) if keyword else Example((x, cond))
    zero = tokenopt.optimize(m, {"version": 1, "rules": [{"pass": "tome", "r": 0}]}, ex, capture=capture)
    fast = tokenopt.optimize(m, TOME, ex, capture=capture)
    with torch.no_grad():
        want = m(x, cond)
        assert torch.equal(ex.call(zero), want)                      # r=0 is the original, bit for bit
        got = ex.call(fast)
        assert got.shape == want.shape and not torch.allclose(got, want)
        # the conditioning really reaches the blocks: another vector, another output
        other = fast(x, cond=torch.zeros_like(cond)) if keyword else fast(x, torch.zeros_like(cond))
        assert (other - got).abs().max() > 1e-3
    rows = record_of(fast).report.rows
    assert [(r.tokens_in, r.tokens_out) for r in rows] == [(17, 14), (14, 11), (11, 8)]


def test_the_two_capture_front_ends_agree_on_a_two_input_model():
    m, x, cond = model_and_inputs(1)
    a = tokenopt.optimize(m, TOME, (x, cond), capture="fx")
    b = tokenopt.optimize(m, TOME, (x, cond), capture="export")
    with torch.no_grad():
        torch.testing.assert_close(a(x, cond), b(x, cond), rtol=0, atol=1e-5)
        # any batch size: the export front end made every batch axis dynamic
        torch.testing.assert_close(a(x[:1], cond[:1]), b(x[:1], cond[:1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_two_input_model_saves_and_reloads(tmp_path, capture):
    m, x, cond = model_and_inputs(2)
    fast = tokenopt.optimize(m, TOME, Example((x,), {"cond": cond}), capture=capture)
    update_record(fast, base={"kind": "class", "class": "vit_models:ConditionedViT"})
    path = tokenopt.save(fast, tmp_path / "cond.tokenopt.pt")
    back = tokenopt.load(path)
    with torch.no_grad():
        torch.testing.assert_close(back(x, cond=cond), fast(x, cond=cond), rtol=0, atol=0)
    manifest = tokenopt.artifact.read(path)["manifest"]
    assert manifest["example"]["kwargs"]["cond"]["shape"] == [2, 64]
    assert manifest["example_input_shape"] == [2, 3, 32, 32]


def test_the_analysis_keeps_describing_the_original_graph():
    """The rewrite works on a copy: the analysis's graph, recorded on the result, is the original's."""
    m, x, cond = model_and_inputs(3)
    fast = tokenopt.optimize(m, TOME, (x, cond))
    analysis = record_of(fast).analysis
    assert analysis.graph is not fast
    targets = {getattr(n.target, "__name__", str(n.target)) for n in analysis.graph.graph.nodes}
    assert "tome_merge" not in targets
    assert "tome_merge" in {getattr(n.target, "__name__", "") for n in fast.graph.nodes}
    with torch.no_grad():
        assert torch.equal(analysis.graph(x, cond), m(x, cond))
