"""trace.values_at: one run of a graph, the values of the nodes asked for."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from tokenopt.trace import values_at


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, scale=2.0):
        h = self.fc(x)
        a = torch.relu(h)
        return {"out": a * scale, "sum": a.sum(-1)}


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    return model, fx.symbolic_trace(model), torch.randn(5, 4)


def test_values_equal_a_direct_computation(tiny):
    model, gm, x = tiny
    with torch.no_grad():
        got = values_at(gm, ["relu", "fc"], x)
        h = x @ model.fc.weight.T + model.fc.bias
    assert list(got) == ["fc", "relu"]                 # graph order, whatever order they were asked in
    assert torch.allclose(got["fc"], h)
    assert torch.equal(got["relu"], h.clamp_min(0))


def test_keywords_reach_their_placeholders(tiny):
    model, gm, x = tiny
    with torch.no_grad():
        got = values_at(gm, {"mul"}, x, scale=3.0)
        assert torch.allclose(got["mul"], model(x)["out"] * 1.5)


def test_the_output_node_is_what_the_module_returns(tiny):
    model, gm, x = tiny
    with torch.no_grad():
        out = values_at(gm, {"output", "relu"}, x)
        expected = model(x)
    assert list(out) == ["relu", "output"]
    assert set(out["output"]) == {"out", "sum"}
    assert torch.allclose(out["output"]["sum"], expected["sum"])


def test_an_exported_module_returns_its_own_output_structure():
    class Pair(nn.Module):
        def forward(self, x):
            return {"double": x * 2, "neg": -x}

    x = torch.randn(2, 3)
    gm = torch.export.export(Pair(), (x,), strict=False).module()
    output = next(n.name for n in gm.graph.nodes if n.op == "output")
    got = values_at(gm, {output}, x)[output]
    assert isinstance(got, dict) and torch.equal(got["double"], x * 2) and torch.equal(got["neg"], -x)


def test_grad_mode_is_the_callers(tiny):
    _, gm, x = tiny
    assert values_at(gm, {"relu"}, x)["relu"].grad_fn is not None
    with torch.no_grad():
        assert values_at(gm, {"relu"}, x)["relu"].grad_fn is None


def test_unknown_names_are_a_key_error(tiny):
    _, gm, x = tiny
    with pytest.raises(KeyError, match="no node named nope, zzz in the graph"):
        values_at(gm, {"zzz", "relu", "nope"}, x)


def test_a_failing_node_is_named_on_the_error(tiny):
    _, gm, _ = tiny
    with pytest.raises(RuntimeError) as e:
        values_at(gm, {"relu"}, torch.randn(5, 7))     # 7 features into a Linear(4, 3)
    assert e.value.tokenopt_node.name == "fc"
