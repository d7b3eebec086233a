"""Identity and p=0 dropout calls leave rewritten graphs; everything else stays."""
import timm
import torch
from torch import nn

import tokenopt
from tokenopt.cleanup import drop_noop_calls


def _called_module_types(gm):
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]


def test_timm_vit_loses_its_identity_calls_and_stays_bit_identical():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=5).eval()
    gm = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tome", "r": 0}]}, report=False)
    kinds = _called_module_types(gm)
    assert "Identity" not in kinds and "Dropout" not in kinds
    assert kinds.count("Linear") == 2 * 4 + 1          # qkv, proj, fc1, fc2 per block; the head
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert set(gm.state_dict()) == set(model.state_dict())


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.keep = nn.Dropout(0.5)
        self.zero = nn.Dropout(0.0)
        self.same = nn.Identity()
        self.heard = nn.Identity()

    def forward(self, x):
        return self.heard(self.same(self.zero(self.keep(x))))


def test_only_provable_no_ops_go():
    net = _Net()
    net.heard.register_forward_hook(lambda m, i, o: None)
    gm = torch.fx.symbolic_trace(net)
    assert drop_noop_calls(gm) == 2
    gm.recompile()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["keep", "heard"]
    gm.train()
    torch.manual_seed(0)
    a = gm(torch.ones(1000))
    torch.manual_seed(0)
    assert torch.equal(a, net.train()(torch.ones(1000)))   # dropout p=0.5 still drops in training
    assert (a == 0).any()
