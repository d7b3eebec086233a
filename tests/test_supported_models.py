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
