import pytest
import timm
import torch
import torch.fx
import torch.nn.functional as F

from tokenopt.flops import count_flops, flops_by_node


def tiny_vit(**kw):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10, **kw
    ).eval()


class Sdpa(torch.nn.Module):
    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("d, d_v", [(8, 8), (4, 6)])  # equal dims hit the fused CPU kernel
@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_counts_two_matmuls(d, d_v, with_mask):
    b, h, n_q, n_k = 2, 3, 5, 7
    q, k, v = torch.randn(b, h, n_q, d), torch.randn(b, h, n_k, d), torch.randn(b, h, n_k, d_v)
    mask = torch.randn(n_q, n_k) if with_mask else None
    macs = b * h * n_q * n_k * d + b * h * n_q * n_k * d_v
    assert count_flops(Sdpa(), q, k, v, mask) == macs


def test_linear_is_counted_as_macs():
    lin = torch.nn.Linear(16, 4, bias=True)
    assert count_flops(lin, torch.randn(3, 16)) == 3 * 16 * 4


def test_fused_and_explicit_attention_count_the_same():
    x = torch.randn(1, 3, 32, 32)
    fused = tiny_vit()
    explicit = tiny_vit()
    for block in explicit.blocks:
        block.attn.fused_attn = False
    assert all(b.attn.fused_attn for b in fused.blocks)
    torch.testing.assert_close(fused(x), explicit(x), atol=1e-4, rtol=1e-4)
    assert count_flops(fused, x) == count_flops(explicit, x)


def test_tiny_vit_matches_hand_count():
    n, dim, hidden, patches = 17, 384, 1536, 16
    patch_embed = patches * dim * 3 * 8 * 8
    block = n * dim * 3 * dim + 2 * n * n * dim + n * dim * dim + 2 * n * dim * hidden
    head = dim * 10
    assert count_flops(tiny_vit(), torch.randn(1, 3, 32, 32)) == patch_embed + 2 * block + head


def _scaled_matmul(a, b):
    # A user function the tracer does not look into: its node must still be charged.
    return (a @ b) * 0.5


torch.fx.wrap("_scaled_matmul")


class UserFunctionModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.w = torch.nn.Parameter(torch.randn(8, 5))

    def forward(self, x):
        return _scaled_matmul(self.proj(x), self.w)


def test_flops_by_node_charges_user_functions_and_modules():
    gm = torch.fx.symbolic_trace(UserFunctionModel())
    x = torch.randn(4, 8)
    per_node = flops_by_node(gm, x)
    assert per_node["proj"] == 4 * 8 * 8
    assert per_node["_scaled_matmul"] == 4 * 8 * 5
    assert sum(per_node.values()) == count_flops(gm, x)


def test_flops_by_node_sums_to_count_flops_on_a_vit():
    gm = torch.fx.symbolic_trace(tiny_vit())
    x = torch.randn(2, 3, 32, 32)
    per_node = flops_by_node(gm, x)
    assert list(per_node) == [n.name for n in gm.graph.nodes]
    assert sum(per_node.values()) == count_flops(gm, x)
    attention = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(attention) == 2
    assert all(per_node[n.name] == 2 * 6 * 17 * 17 * 64 * 2 for n in attention)


def test_vit_small_is_about_4_6_gflops():
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    flops = count_flops(model, torch.randn(1, 3, 224, 224))
    assert 4.5e9 < flops < 4.7e9
