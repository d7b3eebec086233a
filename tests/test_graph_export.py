import dataclasses
import shutil
import xml.etree.ElementTree as ET

import pytest
import timm
import torch
import torch.fx

from tokenopt import graph_export, graph_style
from tokenopt.graph_export import drawn_nodes, to_dot, to_mermaid, to_svg, to_text

SVG = "{http://www.w3.org/2000/svg}"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")


@pytest.fixture(scope="module")
def gm():
    model = timm.create_model(
        "vit_small_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10
    ).eval()
    return torch.fx.symbolic_trace(model)


def module_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("render", [to_text, to_mermaid, pytest.param(to_svg, marks=needs_dot)])
def test_every_module_call_is_mentioned(gm, render):
    out = render(gm)
    missing = [t for t in module_targets(gm) if t not in out]
    assert len(module_targets(gm)) == 40
    assert missing == []


def test_text_is_one_line_per_node_and_marks_highlights(gm):
    lines = to_text(gm, highlight={"add_1"}, labels={"add_1": "tome r=4"}).splitlines()
    assert len(lines) == len(gm.graph.nodes)
    assert lines[0] == "  %x = placeholder x"
    marked = [line for line in lines if line.startswith("*")]
    assert marked == ["* %add_1 = call_function add(%norm_pre, %blocks_0_drop_path1)  # tome r=4"]
    assert "  %blocks_0_attn_qkv = call_module blocks.0.attn.qkv(%layer_norm)  # Linear" in lines
    assert lines[-1] == "  return %head"


def test_shape_bookkeeping_and_parameters_are_not_drawn(gm):
    drawn = {n.name for n in drawn_nodes(gm)}
    assert {"getattr_1", "getitem_5", "eq", "_assert", "cls_token", "blocks_0_norm1_weight"}.isdisjoint(drawn)
    assert {"expand", "getitem_8", "unbind", "add_1", "output"} <= drawn  # tensors stay
    assert "getitem_5" in {n.name for n in drawn_nodes(gm, highlight={"getitem_5"})}


def test_mermaid_marks_highlights_and_escapes_labels(gm):
    out = to_mermaid(gm, highlight={"add_1", "blocks_0_mlp_fc1"}, labels={"add_1": 'merge "r<4"'})
    lines = out.splitlines()
    assert lines[0] == "flowchart TD"
    assert "    class n_add_1,n_blocks_0_mlp_fc1 inserted" in lines
    assert any(line.startswith("    classDef inserted") for line in lines)
    assert 'n_add_1["add_1<br/><i>add · merge #quot;r#lt;4#quot;</i>"]' in out
    assert "    n_norm_pre --> n_add_1" in lines  # the residual edge
    assert not any("getattr_1" in line for line in lines)


def _svg_groups(root, cls):
    """Graphviz's SVG: one ``<g class="node">`` per node and ``<g class="edge">`` per edge, each
    titled with the node's name (the DOT id) or ``tail->head``."""
    return {g.find(f"{SVG}title").text: g for g in root.iter(f"{SVG}g") if g.get("class") == cls}


def _fill(group):
    shape = next(e for e in group.iter() if e.tag in (f"{SVG}path", f"{SVG}polygon", f"{SVG}ellipse"))
    return shape.get("fill")


@needs_dot
def test_svg_parses_and_fills_highlighted_boxes(gm):
    root = ET.fromstring(to_svg(gm, highlight={"add_1"}, labels={"add_1": "a<b & c"}))
    boxes = _svg_groups(root, "node")
    assert set(boxes) == {n.name for n in drawn_nodes(gm)}
    assert _fill(boxes["add_1"]) == "#ffd8a8" and _fill(boxes["add_2"]) == "#f8f9fa"
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "add · a<b & c" in texts


@needs_dot
def test_svg_draws_every_edge_between_drawn_boxes_once(gm):
    # what the drawing promises about edges: each input of a drawn node from a drawn node, once,
    # and none to or from a hidden node
    root = ET.fromstring(to_svg(gm))
    shown = {n.name for n in drawn_nodes(gm)}
    expected = {f"{p.name}->{n.name}" for n in drawn_nodes(gm) for p in n.all_input_nodes if p.name in shown}
    edges = [g.find(f"{SVG}title").text for g in root.iter(f"{SVG}g") if g.get("class") == "edge"]
    assert sorted(edges) == sorted(expected)
    assert "norm_pre->add_1" in edges          # the residual edge


@needs_dot
def test_svg_of_a_12_block_vit_stays_narrow():
    from tokenopt.trace import trace
    gm = trace(timm.create_model("vit_small_patch16_224").eval())
    root = ET.fromstring(to_svg(gm))
    width, height = (float(root.get(k).removesuffix("pt")) for k in ("width", "height"))
    assert height > 10 * width


# ------------------------------------------------------------------------- one style table


def test_every_output_reads_the_one_style_table(gm, monkeypatch):
    # a colour changed in the table shows up in Mermaid and DOT; the mark in the text form
    inserted = dataclasses.replace(graph_style.STYLES["inserted"], fill="#123456", mark="+")
    monkeypatch.setitem(graph_style.STYLES, "inserted", inserted)
    assert "    classDef inserted fill:#123456,stroke:#e8590c,stroke-width:2px" in \
        to_mermaid(gm, highlight={"add_1"}).splitlines()
    dot_line = next(ln for ln in to_dot(gm, highlight={"add_1"}).splitlines() if ln.startswith('  "add_1" ['))
    assert 'fillcolor="#123456"' in dot_line and "penwidth=2" in dot_line
    assert "+ %add_1 = call_function add(%norm_pre, %blocks_0_drop_path1)" in to_text(gm, highlight={"add_1"})


def test_a_labelled_node_is_drawn_as_a_block_node(gm):
    # what `tokenopt inspect MODEL` passes: notes on a block's nodes, nothing highlighted
    labels = {"blocks_0_attn_proj": "blocks.0: merge point"}
    block = graph_style.STYLES["block"]
    mermaid = to_mermaid(gm, labels=labels).splitlines()
    assert "    class n_blocks_0_attn_proj block" in mermaid
    assert f"    classDef block fill:{block.fill},stroke:{block.stroke}" in mermaid
    dot_line = next(ln for ln in to_dot(gm, labels=labels).splitlines() if ln.startswith('  "blocks_0_attn_proj" ['))
    assert f'fillcolor="{block.fill}"' in dot_line and "Linear · blocks.0: merge point" in dot_line
    line = "  %blocks_0_attn_proj = call_module blocks.0.attn.proj(%blocks_0_attn_norm)  # Linear; blocks.0: merge point"
    assert line in to_text(gm, labels=labels).splitlines()     # unmarked: the text form marks only inserted nodes


def test_pass_colour_fills_an_inserted_node_and_no_pass_is_grey(gm):
    colors = graph_style.pass_colors(["tome", "tosa"])
    assert colors == {"tome": "#ffc9c9", "tosa": "#a5d8ff", "": graph_style.NO_PASS}
    out = to_mermaid(gm, highlight={"add_1", "add_2"}, groups={"add_1": "tosa"}, colors=colors).splitlines()
    assert "    class n_add_1 g_tosa" in out
    assert "    classDef g_tosa fill:#a5d8ff,stroke:#343a40,stroke-width:2px" in out
    assert "    class n_add_2 g_" in out          # in no group: inserted by no pass, as DOT draws it
    dot = to_dot(gm, highlight={"add_1", "add_2"}, groups={"add_1": "tosa"}, colors=colors).splitlines()
    assert f'fillcolor="{graph_style.NO_PASS}"' in next(ln for ln in dot if ln.startswith('  "add_2" ['))


# ------------------------------------------------------------------------- without Graphviz


def test_without_graphviz_svg_says_how_to_install_and_text_and_mermaid_still_work(gm, monkeypatch):
    monkeypatch.setattr(graph_export.shutil, "which", lambda name: None)
    with pytest.raises(graph_export.GraphvizMissing) as e:
        to_svg(gm)
    message = str(e.value)
    assert message.startswith("Graphviz's `dot` program is not on PATH")
    for how in ("apt-get install graphviz", "brew install graphviz", "conda install -c conda-forge graphviz"):
        assert how in message
    assert to_text(gm).startswith("  %x = placeholder x")
    assert to_mermaid(gm).startswith("flowchart TD")
