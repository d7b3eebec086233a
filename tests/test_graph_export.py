import re
import xml.etree.ElementTree as ET

import pytest
import timm
import torch
import torch.fx

from tokenopt.graph_export import drawn_nodes, to_mermaid, to_svg, to_text

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def gm():
    model = timm.create_model(
        "vit_small_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10
    ).eval()
    return torch.fx.symbolic_trace(model)


def module_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("render", [to_text, to_mermaid, to_svg])
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


def _boxes(root):
    return {
        g.find(f"{SVG}title").text.split(" ")[0][1:]: g.find(f"{SVG}rect")
        for g in root.iter(f"{SVG}g")
        if g.find(f"{SVG}title") is not None
    }


def test_svg_parses_and_fills_highlighted_boxes(gm):
    root = ET.fromstring(to_svg(gm, highlight={"add_1"}, labels={"add_1": "a<b & c"}))
    boxes = _boxes(root)
    assert set(boxes) == {n.name for n in drawn_nodes(gm)}
    assert boxes["add_1"].get("fill") != boxes["add_2"].get("fill")
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "add · a<b & c" in texts
    edges = list(root.iter(f"{SVG}path"))[1:]  # the first path is the arrow head
    assert all(e.get("marker-end") == "url(#arrow)" for e in edges)
    assert len(edges) == sum(1 for n in drawn_nodes(gm) for p in n.all_input_nodes if p.name in boxes)


def test_svg_edges_never_run_through_a_box(gm):
    # The layout promise: vertical edge segments stay in lanes that no box occupies.
    root = ET.fromstring(to_svg(gm))
    rects = [
        tuple(float(r.get(k)) for k in ("x", "y", "width", "height"))
        for r in root.iter(f"{SVG}rect")
        if r.get("x") is not None
    ]
    for path in list(root.iter(f"{SVG}path"))[1:]:
        tokens = re.findall(r"[MVC]|-?[\d.]+", path.get("d"))
        x = y = None
        i = 0
        while i < len(tokens):
            if tokens[i] == "M":
                x, y = float(tokens[i + 1]), float(tokens[i + 2])
                i += 3
            elif tokens[i] == "C":
                x, y = float(tokens[i + 5]), float(tokens[i + 6])
                i += 7
            else:
                y_end = float(tokens[i + 1])
                for rx, ry, rw, rh in rects:
                    crosses = rx < x < rx + rw and y < ry + rh and ry < y_end
                    assert not crosses, f"edge {path.get('d')} crosses the box at ({rx}, {ry})"
                y = y_end
                i += 2


def test_svg_of_a_12_block_vit_stays_narrow():
    gm = torch.fx.symbolic_trace(timm.create_model("vit_small_patch16_224").eval())
    root = ET.fromstring(to_svg(gm))
    assert float(root.get("height")) > 10 * float(root.get("width"))
