"""tools/supported_models.py: rows come from tokenopt's analysis of the model, not from a list."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "tools" / "supported_models.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("supported_models", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def family(tool, needle):
    return next(f for f in tool.FAMILIES if needle in f[1])


def test_rows_say_what_the_analysis_found(tool):
    row = tool.describe(*family(tool, "registers"))
    assert row["capture"] == "fx" and row["blocks"] == 2 and row["reducible"] == 2
    assert row["prefix"].startswith("4 ") and row["pooling"] == "avg"
    assert row["tome_r2"] == "20 → 18 → 16" and row["refused"] == ""
    row = tool.describe(*family(tool, "RoPE"))
    assert row["reducible"] == 0 and row["tome_r2"] == "refused" and "RoPE" in row["refused"]


def test_a_model_that_changes_is_seen(tool, monkeypatch):
    """The table follows the analysis: a ViT built with two register tokens reports two."""
    name, label, _, side = family(tool, "registers")
    row = tool.describe(name, label, tool._timm("vit_medium_patch16_reg4_gap_256", reg_tokens=2), side)
    assert row["prefix"].startswith("2 ") and row["tome_r2"] == "18 → 16 → 14"


def test_markdown_table(tool):
    rows = [{"family": "timm", "model": "m|x", "capture": "fx", "blocks": 2, "reducible": 1, "prefix": "1",
             "pooling": "cls", "tome_r2": "17 → 15", "refused": ""}]
    text = tool.markdown(rows)
    assert "| timm | m\\|x | fx | 2 (1) | 1 | cls | 17 → 15 | - |" in text
    assert text.startswith("# Supported models") and "tools/supported_models.py" in text


def test_denoiser_rows_say_what_op_level_merging_did(tool):
    """The diffusion rows come from the analysis of a diffusers:DIR load and from optimizing it with
    recipes/tomesd-50.yaml. The SD-shaped UNet's latent of 16 gives spatial transformers at 16x16 (the
    first down block, the two of the last up block) and at 8x8 (the rest): merge_attn merges around
    the self-attention of the three at the largest grid and leaves the four others alone
    (max_downsample: 1). The DiT and PixArt patchify 16 x 16 latents in 2 x 2 patches: one 8x8 grid,
    a self-attention merged in each of their two blocks."""
    pytest.importorskip("diffusers")
    row = tool.describe(*family(tool, "UNet2DConditionModel"))
    assert (row["capture"], row["blocks"], row["reducible"], row["grid"], row["op_level"], row["refused"]) == \
        ("export", 7, 7, "16x16, 8x8", "256, 64 kept; 3 ops merged", "")
    assert row["left_alone"].endswith("beyond max_downsample=1 (raise max_downsample to merge there) (4 blocks)")
    assert row["pooling"] == "per-patch output" and row["prefix"].startswith("0 ")
    row = tool.describe(*family(tool, "DiTTransformer2DModel"))
    assert (row["capture"], row["blocks"], row["grid"], row["op_level"], row["left_alone"]) == \
        ("export", 2, "8x8", "64 kept; 2 ops merged", "")
    row = tool.describe(*family(tool, "PixArtTransformer2DModel"))
    assert (row["capture"], row["blocks"], row["grid"], row["op_level"], row["left_alone"]) == \
        ("export", 2, "8x8", "64 kept; 2 ops merged", "")
    text = tool.markdown([row])
    assert "| diffusers | PixArtTransformer2DModel | export | 2 (2) | 0 | per-patch output | " \
           "[64 kept; 2 ops merged](#denoisers) | - |" in text
    assert "- PixArtTransformer2DModel: token grids 8x8; with `recipes/tomesd-50.yaml`: 64 kept; 2 ops merged\n" in text


def test_a_denoiser_that_changes_is_seen(tool):
    """A DiT of three blocks at 4 x 4 patches: a 4x4 grid, three self-attentions merged."""
    pytest.importorskip("diffusers")
    name, label, _, side = family(tool, "DiTTransformer2DModel")
    build = tool._diffusers("DiTTransformer2DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
                            num_layers=3, sample_size=16, patch_size=4, num_embeds_ada_norm=10, norm_num_groups=8)
    row = tool.describe(name, label, build, side)
    assert (row["blocks"], row["grid"], row["op_level"]) == (3, "4x4", "16 kept; 3 ops merged")
