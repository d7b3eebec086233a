"""Optimized diffusion denoisers out of tokenopt: `apply --check` (one denoising call compared),
`export` to .pt2 and ONNX with all of the denoiser's inputs, checked against eager."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from tokenopt import deploy
from tokenopt.analysis import Example
from tokenopt.cli import app
from tokenopt.ops import grid_merge

runner = CliRunner()

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=8)
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2, sample_size=16,
                patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _saved(tmp_path_factory, cls_name, config):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(cls_name)
    getattr(diffusers, cls_name)(**config).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------ the ops export

class MergeAroundLinear(torch.nn.Module):
    def __init__(self, rule):
        super().__init__()
        self.rule, self.lin = rule, torch.nn.Linear(8, 8)

    def forward(self, x):
        m = grid_merge.grid_matching(x, (4, 4), 2, 2, 6, use_rand=True, seed=1)
        return grid_merge.unmerge_tokens(m, self.lin(grid_merge.merge_tokens(x, m, self.rule)))


@pytest.mark.parametrize("rule", ["merge", "mlerp", "prune"])
def test_grid_merge_exports_with_static_shapes_and_equal_values(rule):
    """No token count depends on the data (the destinations are constants of the grid), and the
    exported program gives eager's values on another batch size."""
    mod = MergeAroundLinear(rule).eval()
    x = torch.randn(2, 16, 8)
    ep, dynamic = deploy.export_program(mod, x)
    assert dynamic
    y = torch.randn(3, 16, 8)
    torch.testing.assert_close(ep.module()(y), mod(y), rtol=0, atol=1e-6)


def test_check_batch_of_a_denoiser_example_grows_every_batch_axis():
    ex = Example((torch.randn(2, 4, 8, 8), torch.tensor([5, 7])), {"encoder_hidden_states": torch.randn(2, 3, 6)})
    grown = deploy.check_batch(ex, dynamic=True)
    assert [tuple(t.shape) for t in grown.tensors()] == [(3, 4, 8, 8), (3,), (3, 3, 6)]
    assert grown.args[1].tolist() == [5, 7, 5]                          # timesteps repeated, not noised
    assert not torch.equal(grown.args[0][:2], ex.args[0])              # new noise in the latents
    assert [tuple(t.shape) for t in deploy.check_batch(ex, dynamic=False).tensors()] == [(2, 4, 8, 8), (2,), (2, 3, 6)]


# ------------------------------------------------------------------------------------------ CLI, end to end

@pytest.mark.slow
@pytest.mark.parametrize("which,recipe", [("unet", "tomesd-50"), ("dit", "tome-dit")])
def test_apply_check_then_export_pt2_and_onnx(tmp_path_factory, tmp_path, which, recipe):
    from tokenopt.paths import SHIPPED_RECIPES

    folder = _saved(tmp_path_factory, *(("UNet2DConditionModel", TINY_UNET) if which == "unet"
                                        else ("DiTTransformer2DModel", TINY_DIT)))
    art = tmp_path / f"{which}.tokenopt.pt"
    res = run("apply", SHIPPED_RECIPES / f"{recipe}.yaml", f"diffusers:{folder}", "-o", art, "--check")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "check on the example inputs (2 random inputs, seed 0): max |original - optimized| = " in text
    assert "mean cosine similarity" in text and art.exists()
    for suffix in ("pt2", "onnx"):
        res = run("export", art, "-o", tmp_path / f"{which}.{suffix}")
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.split())
        assert f"{which}.{suffix} ({suffix}, dynamic batch; max abs difference to eager" in text, text
    # the program takes the denoiser's own arguments and returns its output object
    ep = torch.export.load(tmp_path / f"{which}.pt2")
    from tokenopt import load
    from tokenopt.record import record_of

    gm = load(art)
    ex = deploy.check_batch(record_of(gm).analysis.example, dynamic=True)
    with torch.no_grad():
        got, want = ex.call(ep.module()), ex.call(gm)
    assert type(got).__name__ == type(want).__name__
    torch.testing.assert_close(got.sample, want.sample, rtol=0, atol=1e-4)
