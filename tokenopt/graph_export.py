"""Render a ``torch.fx.GraphModule`` as text, Mermaid, Graphviz DOT, or SVG drawn by Graphviz.

Every renderer takes ``highlight`` (node names to mark, e.g. the ops a pass inserted) and
``labels`` (node name → a suffix appended to that node's label, e.g. ``"tome r=8"``). How each
kind of node looks (inserted, removed, a block's noted nodes, inputs and outputs, plain) is one
table, ``tokenopt.graph_style``, that all of them read.

What is drawn: the text form lists every node, like fx's own printout. Mermaid and DOT are
drawings meant to be read, so they hide the nodes that carry no tensor data: ``get_attr``
(parameters and buffers; they would each need an edge from nowhere) and shape bookkeeping
(``x.shape``, ``x.size()``, ``x.dim()``, the ``getitem``/arithmetic/comparisons on those values,
and the ``torch._assert`` checks built from them). In a traced ViT these are about a quarter of
the nodes. A hidden node is still drawn when it is highlighted; edges from hidden nodes are dropped.

Mermaid and DOT also draw part of a graph, e.g. one block before and after a rewrite (the
documentation's pass pages): ``only`` restricts the drawing to some nodes (their inputs from
elsewhere appear as small grey context nodes), ``groups`` and ``colors`` fill highlighted nodes
with the colour of who inserted them (one colour per pass), and ``removed`` draws nodes dashed
with their names struck through.

SVG (``to_svg``, ``tokenopt inspect --graph svg``, and the documentation's figures) is DOT laid out
by Graphviz's ``dot`` program (``render_dot``); without it, :class:`GraphvizMissing` says how to
install it. Text and Mermaid need nothing outside Python.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Collection, Mapping
from xml.sax.saxutils import escape

import torch
import torch.fx
from torch.fx import Node

from tokenopt.errors import TokenoptError
from tokenopt.graph_style import STYLES, NodeStyle, node_kind, style_for

# ---------------------------------------------------------------- what a node says about itself


def _short_target(node: Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _fmt_arg(a) -> str:
    if isinstance(a, Node):
        return f"%{a.name}"
    if isinstance(a, tuple):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"({inner},)" if len(a) == 1 else f"({inner})"
    if isinstance(a, list):
        return "[" + ", ".join(_fmt_arg(x) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, slice):  # x[:, 0] reads better than slice(None, None, None)
        parts = ["" if p is None else _fmt_arg(p) for p in (a.start, a.stop, a.step)]
        return ":".join(parts[:2] if a.step is None else parts)
    return repr(a)


def _fmt_call(node: Node) -> str:
    args = [_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()]
    return f"{_short_target(node)}({', '.join(args)})"


def _module_class(gm: torch.fx.GraphModule, node: Node) -> str | None:
    if node.op != "call_module":
        return None
    try:
        return type(gm.get_submodule(node.target)).__name__
    except AttributeError:  # a graph edited without its module; still render it
        return None


def _title_and_detail(gm: torch.fx.GraphModule, node: Node, suffix: str | None) -> tuple[str, str]:
    """Two short lines for a box: what the node is called, and what it does."""
    if node.op == "call_module":
        title, detail = str(node.target), _module_class(gm, node) or "module"
    elif node.op == "call_function":
        title, detail = node.name, _short_target(node)
        if detail == "getitem" and len(node.args) == 2 and not isinstance(node.args[1], Node):
            detail = f"getitem[{_fmt_arg(node.args[1])}]"
    elif node.op == "call_method":
        title, detail = node.name, "." + str(node.target)
    elif node.op == "placeholder":
        title, detail = node.name, "input"
    elif node.op == "output":
        title, detail = "output", ""
    else:  # get_attr
        title, detail = str(node.target), node.op
    if title == detail:
        detail = ""
    if suffix:
        detail = f"{detail} · {suffix}" if detail else suffix
    return title, detail


# ------------------------------------------------------------------- which nodes get drawn

_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_SHAPE_METHODS = {"size", "dim", "numel", "stride"}


def _is_shape_source(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in _SHAPE_ATTRS
    )


def _derives_only_from(node: Node, shapes: set[str]) -> bool:
    # Only plain Python arithmetic/indexing and asserts propagate "shape-ness": a torch
    # function fed by shapes (torch.zeros(n, d)) makes a tensor and must stay visible.
    if node.op != "call_function":
        return False
    module = getattr(node.target, "__module__", None)
    if not (module in ("_operator", "operator", "builtins") or node.target is torch._assert):
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(p.name in shapes for p in inputs)


def drawn_nodes(gm: torch.fx.GraphModule, highlight: Collection[str] = ()) -> list[Node]:
    """The nodes Mermaid and DOT draw, in graph order (see the module docstring for the rule)."""
    # get_attr nodes are hidden but do not propagate: pos_embed[:, 1:] is tensor data.
    shapes: set[str] = set()
    for node in gm.graph.nodes:
        if _is_shape_source(node) or _derives_only_from(node, shapes):
            shapes.add(node.name)
    return [
        n for n in gm.graph.nodes
        if (n.op != "get_attr" and n.name not in shapes) or n.name in highlight
    ]


def _edges(nodes: list[Node], targets: list[Node] | None = None) -> list[tuple[Node, Node]]:
    """Edges between drawn nodes (into ``targets`` only, when given), each once, in graph order."""
    shown = {n.name for n in nodes}
    out = []
    for n in nodes if targets is None else targets:
        for p in dict.fromkeys(n.all_input_nodes):
            if p.name in shown:
                out.append((p, n))
    return out


def _box_text(gm: torch.fx.GraphModule, node: Node, kind: str, labels: Mapping[str, str]) -> tuple[str, str]:
    """A drawn box's two lines, the same in Mermaid and DOT: the node's name, and what it is (op or
    module class) then its label; for a removed node the label alone (why it went), else what it
    was then "removed"."""
    if kind != "removed":
        return _title_and_detail(gm, node, labels.get(node.name))
    title, detail = _title_and_detail(gm, node, "removed")
    return title, labels.get(node.name) or detail


def _styled(nodes: list[Node], *, highlight: Collection[str], removed: Collection[str],
            labels: Mapping[str, str], groups: Mapping[str, str] | None,
            colors: Mapping[str, str] | None) -> list[tuple[Node, str, str | None, NodeStyle]]:
    """``(node, kind, group, style)`` for each drawn node (see tokenopt.graph_style)."""
    out = []
    for n in nodes:
        kind = node_kind(n.name, n.op, highlight=highlight, removed=removed, labels=labels)
        group, style = style_for(n.name, kind, groups, colors)
        out.append((n, kind, group, style))
    return out


# ------------------------------------------------------------------------------------ text


def to_text(
    gm: torch.fx.GraphModule, highlight: Collection[str] = (), labels: Mapping[str, str] | None = None
) -> str:
    """One line per node, ``%name = op target(args)``, after the node kind's mark (``*`` for a
    highlighted node, see tokenopt.graph_style)."""
    labels = labels or {}
    lines = []
    for node in gm.graph.nodes:
        if node.op == "output":
            body = f"return {_fmt_arg(node.args[0])}"
        elif node.op == "placeholder":
            default = f"={node.args[0]!r}" if node.args else ""
            body = f"%{node.name} = placeholder {node.target}{default}"
        elif node.op == "get_attr":
            body = f"%{node.name} = get_attr {node.target}"
        else:
            body = f"%{node.name} = {node.op} {_fmt_call(node)}"
        notes = [x for x in (_module_class(gm, node), labels.get(node.name)) if x]
        if notes:
            body += "  # " + "; ".join(notes)
        kind = node_kind(node.name, node.op, highlight=highlight, labels=labels)
        lines.append(f"{STYLES[kind].mark} {body}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- mermaid


def _mermaid_text(s: str) -> str:
    # Mermaid's entity codes; '#' first so the codes themselves are not re-escaped.
    for ch, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        s = s.replace(ch, code)
    return s


def _mermaid_class_def(style: NodeStyle) -> str:
    parts = [f"fill:{style.fill or '#ffffff'}", f"stroke:{style.stroke}"]
    if style.pen != 1:
        parts.append(f"stroke-width:{style.pen:g}px")
    if style.dashed:
        parts.append("stroke-dasharray:5 4")
    if style.text:
        parts.append(f"color:{style.text}")
    return ",".join(parts)


def to_mermaid(
    gm: torch.fx.GraphModule, highlight: Collection[str] = (), labels: Mapping[str, str] | None = None,
    *, groups: Mapping[str, str] | None = None, colors: Mapping[str, str] | None = None,
    removed: Collection[str] = (), only: Collection[str] | None = None,
) -> str:
    """A ``flowchart TD`` with one class per node kind (``inserted``, ``removed``, ...); a
    highlighted node of a group with a colour in ``colors`` gets the class ``g_<group>`` instead.
    With ``only``, just those nodes are drawn, and their inputs from elsewhere as ``context``."""
    labels = labels or {}
    nodes, context = _selection(gm, highlight, removed, only)
    styled = _styled(nodes, highlight=highlight, removed=removed, labels=labels, groups=groups, colors=colors)
    # Prefixed ids: fx names are identifiers, but Mermaid reserves some (``end``).
    ident = {n.name: f"n_{n.name}" for n in context + nodes}
    out = ["flowchart TD"]
    members: dict[str, list[str]] = {}      # class -> node ids, classes in order of first use
    class_style: dict[str, NodeStyle] = {}
    for n in context:
        out.append(f"    {ident[n.name]}{_mermaid_shape(STYLES['context'], _mermaid_text(n.name))}")
        members.setdefault("context", []).append(ident[n.name])
        class_style["context"] = STYLES["context"]
    for n, kind, group, style in styled:
        title, detail = _box_text(gm, n, kind, labels)
        title = _mermaid_text(title)
        if style.struck:
            title = f"<s>{title}</s>"
        text = title + (f"<br/><i>{_mermaid_text(detail)}</i>" if detail else "")
        out.append(f"    {ident[n.name]}{_mermaid_shape(style, text)}")
        cls = kind if group is None else _group_class(group)
        members.setdefault(cls, []).append(ident[n.name])
        class_style[cls] = style
    for p, n in _edges(context + nodes, targets=nodes):
        out.append(f"    {ident[p.name]} --> {ident[n.name]}")
    for cls, style in class_style.items():
        out.append(f"    classDef {cls} {_mermaid_class_def(style)}")
    for cls, ids in members.items():
        out.append(f"    class {','.join(ids)} {cls}")
    return "\n".join(out) + "\n"


def _mermaid_shape(style: NodeStyle, text: str) -> str:
    opening, closing = ("[", "]") if style.shape == "box" else ("([", "])")   # round, ellipse: a stadium
    return f'{opening}"{text}"{closing}'


def _group_class(group: str) -> str:
    return "g_" + "".join(c if c.isalnum() else "_" for c in group)


def _selection(gm: torch.fx.GraphModule, highlight: Collection[str], removed: Collection[str],
               only: Collection[str] | None) -> tuple[list[Node], list[Node]]:
    """(the drawn nodes, the context nodes): with ``only``, the drawn nodes among ``only`` and the
    nodes outside it that feed them; without, every drawn node and no context."""
    keep = set(highlight) | set(removed)
    nodes = drawn_nodes(gm, keep)
    if only is None:
        return nodes, []
    wanted = set(only)
    shown = {n.name for n in nodes}
    nodes = [n for n in nodes if n.name in wanted]
    inside = {n.name for n in nodes}
    context: dict[str, Node] = {}
    for n in nodes:
        for p in n.all_input_nodes:
            if p.name not in inside and p.name in shown:
                context.setdefault(p.name, p)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return nodes, sorted(context.values(), key=lambda n: order[n.name])


# ------------------------------------------------------------------------------------ dot

_MAX_TITLE, _MAX_DETAIL = 30, 48      # characters on a box's two lines; longer ones end in "…"


def node_span(gm: torch.fx.GraphModule, after: str, through: str) -> list[str]:
    """The names of the nodes after ``after`` up to and including ``through``, in graph order:
    a transformer block when given its input and output (as ``tokenopt.report`` counts blocks)."""
    names = [n.name for n in gm.graph.nodes]
    try:
        lo, hi = names.index(after), names.index(through)
    except ValueError as e:
        raise KeyError(f"no node {e.args[0].split()[0]} in the graph") from None
    return names[lo + 1: hi + 1]


def _dot_id(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _html(s: str) -> str:
    return escape(s, {'"': "&quot;"})


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - 1] + "…"


_PLAIN = STYLES["plain"]


def _dot_graph_defaults(title: str) -> list[str]:
    return [
        '  graph [rankdir=TB, bgcolor="white", nodesep=0.2, ranksep=0.25, fontname="Helvetica", fontsize=13'
        + (f', label=<{_html(title)}>, labelloc=t' if title else "") + "];",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.12,0.04", '
        f'fillcolor="{_PLAIN.fill}", color="{_PLAIN.stroke}", height=0.3];',
        '  edge [color="#868e96", arrowsize=0.6];',
    ]


def _dot_style_attrs(style: NodeStyle) -> list[str]:
    """The attributes in which ``style`` differs from the graph's node defaults (the plain style)."""
    attrs = []
    if style.shape == "ellipse":
        attrs.append("shape=ellipse")
    # DOT has no stadium: "round" is the defaults' rounded box
    look = ",".join(x for x, on in (("rounded", style.shape != "ellipse"), ("filled", style.fill is not None),
                                    ("dashed", style.dashed)) if on)
    if look != "rounded,filled":
        attrs.append(f'style="{look}"')
    if style.fill is not None and style.fill != _PLAIN.fill:
        attrs.append(f'fillcolor="{style.fill}"')
    if style.stroke != _PLAIN.stroke:
        attrs.append(f'color="{style.stroke}"')
    if style.text:
        attrs.append(f'fontcolor="{style.text}"')
    if style.pen != 1:
        attrs.append(f"penwidth={style.pen:g}")
    if style.small:
        attrs += ["fontsize=9", "height=0.2"]
    return attrs


def to_dot(
    gm: torch.fx.GraphModule, highlight: Collection[str] = (), labels: Mapping[str, str] | None = None,
    *, groups: Mapping[str, str] | None = None, colors: Mapping[str, str] | None = None,
    removed: Collection[str] = (), only: Collection[str] | None = None, title: str = "",
) -> str:
    """A Graphviz ``digraph``, top to bottom, each node styled by its kind (tokenopt.graph_style):
    highlighted nodes filled (with ``colors[groups[name]]`` when their group has a colour),
    ``removed`` nodes dashed and struck through, ``only`` and context as in :func:`to_mermaid`.
    Node ids are the fx node names, so the SVG that ``dot`` draws from it holds each node's name as
    its ``<title>``; edges into or out of a removed node are dashed."""
    labels = labels or {}
    nodes, context = _selection(gm, highlight, removed, only)
    out = ["digraph G {", *_dot_graph_defaults(title)]
    for n in context:
        attrs = _dot_style_attrs(STYLES["context"]) + [f"label=<{_html(n.name)}>"]
        out.append(f"  {_dot_id(n.name)} [{', '.join(attrs)}];")
    for n, kind, _, style in _styled(nodes, highlight=highlight, removed=removed, labels=labels,
                                     groups=groups, colors=colors):
        head, detail = _box_text(gm, n, kind, labels)
        head, detail = _html(_clip(head, _MAX_TITLE)), _html(_clip(detail, _MAX_DETAIL))
        if style.struck:
            head = f"<S>{head}</S>"
        label = f"<B>{head}</B>" + (f'<BR/><FONT POINT-SIZE="9">{detail}</FONT>' if detail else "")
        tooltip = f"%{n.name} = {n.op} {_short_target(n)}" + (f" ({labels[n.name]})" if n.name in labels else "")
        attrs = _dot_style_attrs(style) + [f"label=<{label}>", f"tooltip={_dot_id(tooltip)}"]
        out.append(f"  {_dot_id(n.name)} [{', '.join(attrs)}];")
    for p, n in _edges(context + nodes, targets=nodes):
        style = ' [style=dashed]' if p.name in removed or n.name in removed else ""
        out.append(f"  {_dot_id(p.name)} -> {_dot_id(n.name)}{style};")
    out.append("}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ svg

INSTALL_GRAPHVIZ = ("Install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; "
                    "conda: conda install -c conda-forge graphviz) and run again.")


class GraphvizMissing(TokenoptError):
    """The Graphviz ``dot`` program is needed and not installed."""


def dot_program() -> str:
    """The path of Graphviz's ``dot``; :class:`GraphvizMissing`, saying how to install it, when it is
    not on PATH. Call it before long work whose result will be drawn, so that work is not wasted."""
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissing("Graphviz's `dot` program is not on PATH; it draws the SVG graphs "
                              "(text and Mermaid graphs need nothing).\n  " + INSTALL_GRAPHVIZ)
    return exe


def render_dot(dot: str, fmt: str = "svg", timeout: float = 60.0) -> str:
    """Draw DOT text with Graphviz's ``dot`` program; returns the output (SVG text by default)."""
    exe = dot_program()
    try:
        done = subprocess.run([exe, f"-T{fmt}"], input=dot, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TokenoptError(f"Graphviz's dot did not lay out the graph within {timeout:g} s; "
                            "write it as text or Mermaid instead.") from None
    if done.returncode != 0:
        raise RuntimeError(f"dot -T{fmt} failed: {done.stderr.strip()}")
    return done.stdout


def to_svg(
    gm: torch.fx.GraphModule, highlight: Collection[str] = (), labels: Mapping[str, str] | None = None,
    *, groups: Mapping[str, str] | None = None, colors: Mapping[str, str] | None = None,
    removed: Collection[str] = (), only: Collection[str] | None = None, title: str = "",
) -> str:
    """The graph as SVG: :func:`to_dot` (same arguments) laid out by Graphviz's ``dot``."""
    return render_dot(to_dot(gm, highlight, labels, groups=groups, colors=colors, removed=removed, only=only,
                             title=title))
