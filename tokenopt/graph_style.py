"""How each kind of graph node looks, in one table that every graph output reads.

``tokenopt.graph_export`` draws a graph as text, Mermaid or Graphviz DOT (and SVG through DOT). A
node is of one kind (:func:`node_kind`): a node the rewrite inserted, one it removed, one the
analysis notes a block role on, an input or output, a context node (drawn only because it feeds
the part of the graph being drawn), or a plain one. :data:`STYLES` gives each kind one
:class:`NodeStyle`; an inserted node whose pass has a colour is filled with it (:func:`style_for`).
Each renderer maps the fields to its own syntax; the text form reads only ``mark``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeStyle:
    """The look of one kind of node. Colours are CSS hex strings."""

    fill: str | None               # None: not filled (the white page shows through)
    stroke: str                    # the border
    text: str | None = None        # the label's colour; None: the renderer's default
    pen: float = 1.0               # border width (2: a bold border)
    dashed: bool = False
    struck: bool = False           # the node's name struck through
    shape: str = "box"             # "box", "round" (Mermaid: stadium) or "ellipse" (Mermaid: stadium)
    small: bool = False            # smaller text and box
    mark: str = " "                # the text form's first column


STYLES: dict[str, NodeStyle] = {
    "plain": NodeStyle(fill="#f8f9fa", stroke="#495057"),
    "io": NodeStyle(fill="#e7f5ff", stroke="#1c7ed6", shape="round"),
    # a block's attention core, merge point and output, as `tokenopt inspect MODEL` notes them
    "block": NodeStyle(fill="#fff9db", stroke="#f08c00"),
    # without a pass colour; with one, `fill` is the pass's colour and the border dark (style_for)
    "inserted": NodeStyle(fill="#ffd8a8", stroke="#e8590c", pen=2, mark="*"),
    "removed": NodeStyle(fill=None, stroke="#868e96", text="#868e96", dashed=True, struck=True),
    "context": NodeStyle(fill=None, stroke="#ced4da", text="#868e96", dashed=True, shape="ellipse", small=True),
}
PASS_BORDER = "#343a40"   # the border of an inserted node filled with its pass's colour

#: Colours for the nodes each pass inserts, given out in the order of the pass names (pass_colors).
PASS_PALETTE = ("#ffc9c9", "#a5d8ff", "#b2f2bb", "#ffec99", "#d0bfff", "#99e9f2", "#fcc2d7", "#ffd8a8")
NO_PASS = "#dee2e6"       # inserted by no pass (pooling and outputs after a reduction)


def pass_colors(names: Sequence[str]) -> dict[str, str]:
    """One palette colour per pass name, in order (repeating after eight), and ``""`` → :data:`NO_PASS`."""
    return {**{n: PASS_PALETTE[i % len(PASS_PALETTE)] for i, n in enumerate(names)}, "": NO_PASS}


def node_kind(name: str, op: str, *, highlight: Collection[str] = (), removed: Collection[str] = (),
              labels: Mapping[str, str] | None = None) -> str:
    """The kind of a drawn node (not of a context node, which the caller knows as such): removed
    before inserted (``highlight``) before a labelled node (``block``) before inputs and outputs."""
    if name in removed:
        return "removed"
    if name in highlight:
        return "inserted"
    if labels and name in labels:
        return "block"
    if op in ("placeholder", "output"):
        return "io"
    return "plain"


def style_for(name: str, kind: str, groups: Mapping[str, str] | None = None,
              colors: Mapping[str, str] | None = None) -> tuple[str | None, NodeStyle]:
    """``(group, style)`` of a node of ``kind``: an inserted node whose group (pass) has a colour in
    ``colors`` is filled with it (a node missing from ``groups`` is in group ``""``, inserted by no
    pass); the group is None for every other node."""
    style = STYLES[kind]
    if kind != "inserted" or not colors:
        return None, style
    group = (groups or {}).get(name, "")
    if group not in colors:
        return None, style
    return group, dataclasses.replace(style, fill=colors[group], stroke=PASS_BORDER)
