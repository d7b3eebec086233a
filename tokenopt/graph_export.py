"""Render a ``torch.fx.GraphModule`` as text, Mermaid or SVG, with no external binaries.

Every renderer takes ``highlight`` (node names to mark, e.g. the ops a pass inserted) and
``labels`` (node name → a suffix appended to that node's label, e.g. ``"tome r=8"``).

What is drawn: the text form lists every node, like fx's own printout. Mermaid and SVG are
drawings meant to be read, so they hide the nodes that carry no tensor data: ``get_attr``
(parameters and buffers; they would each need an edge from nowhere) and shape bookkeeping
(``x.shape``, ``x.size()``, ``x.dim()``, the ``getitem``/arithmetic/comparisons on those values,
and the ``torch._assert`` checks built from them). In a traced ViT these are about a quarter of
the nodes. A hidden node is still drawn when it is highlighted; edges from hidden nodes are dropped.

SVG layout, top to bottom, one row per node in graph (topological) order, so a 12-block ViT is a
tall, narrow image (about 19000 x 1400 px). Column 0 holds the main chain, the longest path into
the output: in a ViT that is the whole computation, block after block. Residual skips, q/k/v side
paths and extra inputs run in lanes beside it, reused like the lanes of ``git log --graph``, so
the width stays a few columns however deep the model is. No edge crosses a box (see ``_Layout``).

Graphviz DOT (``to_dot``, drawn by ``render_dot`` with the ``dot`` program) is for figures of a
part of a graph, e.g. one block before and after a rewrite (the documentation's pass pages):
``only`` restricts the drawing to some nodes (their inputs from elsewhere appear as small grey
context nodes), ``groups`` colours highlighted nodes by who inserted them (one colour per pass),
and ``removed`` draws nodes dashed with their names struck through. Mermaid takes the same three.
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
    """The nodes Mermaid and SVG draw, in graph order (see the module docstring for the rule)."""
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


# ------------------------------------------------------------------------------------ text


def to_text(
    gm: torch.fx.GraphModule, highlight: Collection[str] = (), labels: Mapping[str, str] | None = None
) -> str:
    """One line per node, ``%name = op target(args)``; highlighted lines start with ``*``."""
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
        lines.append(("* " if node.name in highlight else "  ") + body)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- mermaid


def _mermaid_text(s: str) -> str:
    # Mermaid's entity codes; '#' first so the codes themselves are not re-escaped.
    for ch, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        s = s.replace(ch, code)
    return s


def to_mermaid(
    gm: torch.fx.GraphModule, highlight: Collection[str] = (), labels: Mapping[str, str] | None = None,
    *, groups: Mapping[str, str] | None = None, colors: Mapping[str, str] | None = None,
    removed: Collection[str] = (), only: Collection[str] | None = None,
) -> str:
    """A ``flowchart TD``; highlighted nodes get the ``inserted`` class, or ``g_<group>`` when
    ``groups`` names one (filled with ``colors[group]``); ``removed`` nodes are dashed and struck.
    With ``only``, just those nodes are drawn, and their inputs from elsewhere as ``context``."""
    labels, groups, colors = labels or {}, groups or {}, colors or {}
    nodes, context = _selection(gm, highlight, removed, only)
    # Prefixed ids: fx names are identifiers, but Mermaid reserves some (``end``).
    ident = {n.name: f"n_{n.name}" for n in context + nodes}
    out = ["flowchart TD"]
    for n in context:
        out.append(f'    {ident[n.name]}(["{_mermaid_text(n.name)}"])')
    for n in nodes:
        title, detail = _title_and_detail(gm, n, labels.get(n.name))
        if n.name in removed:
            title = f"<s>{_mermaid_text(title)}</s>"
            detail = f"{detail} · removed" if detail else "removed"
        else:
            title = _mermaid_text(title)
        text = title + (f"<br/><i>{_mermaid_text(detail)}</i>" if detail else "")
        opening, closing = ("([", "])") if n.op in ("placeholder", "output") else ("[", "]")
        out.append(f'    {ident[n.name]}{opening}"{text}"{closing}')
    for p, n in _edges(context + nodes, targets=nodes):
        out.append(f"    {ident[p.name]} --> {ident[n.name]}")
    out.append("    classDef io fill:#e7f5ff,stroke:#1c7ed6")
    out.append("    classDef inserted fill:#ffd8a8,stroke:#e8590c,stroke-width:2px")
    out.append("    classDef removed fill:#f1f3f5,stroke:#868e96,stroke-dasharray:5 4,color:#868e96")
    out.append("    classDef context fill:#ffffff,stroke:#ced4da,color:#868e96")
    used = sorted({groups[n.name] for n in nodes if n.name in highlight and n.name in groups})
    for g in used:
        out.append(f"    classDef {_group_class(g)} fill:{colors.get(g, '#ffd8a8')},stroke:#343a40,stroke-width:2px")
    io = [ident[n.name] for n in nodes if n.op in ("placeholder", "output") and n.name not in highlight
          and n.name not in removed]
    classes: dict[str, list[str]] = {"io": io, "context": [ident[n.name] for n in context]}
    for n in nodes:
        if n.name in removed:
            classes.setdefault("removed", []).append(ident[n.name])
        elif n.name in highlight:
            cls = _group_class(groups[n.name]) if n.name in groups else "inserted"
            classes.setdefault(cls, []).append(ident[n.name])
    for cls, members in classes.items():
        if members:
            out.append(f"    class {','.join(members)} {cls}")
    return "\n".join(out) + "\n"


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
    nodes = [n for n in nodes if n.name in wanted]
    shown = {n.name for n in drawn_nodes(gm, keep)}
    inside = {n.name for n in nodes}
    context: dict[str, Node] = {}
    for n in nodes:
        for p in n.all_input_nodes:
            if p.name not in inside and p.name in shown:
                context.setdefault(p.name, p)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return nodes, sorted(context.values(), key=lambda n: order[n.name])


# ------------------------------------------------------------------------------------- svg

_BOX_W, _BOX_H, _COL_W, _ROW_H, _MARGIN = 210, 32, 230, 52, 20
_MAX_CHARS = 30  # at 11px monospace a 210px box holds about 30 characters


def _main_chain(nodes: list[Node]) -> list[str]:
    """The longest path (in drawn nodes) into the last node: a ViT's whole computation, block by
    block, while residual skips and q/k/v side paths are shorter and stay off it."""
    shown = {n.name for n in nodes}
    depth: dict[str, int] = {}
    came_from: dict[str, str | None] = {}
    for n in nodes:
        inputs = [p.name for p in n.all_input_nodes if p.name in shown]
        best = max(inputs, key=depth.__getitem__, default=None)  # ties: first argument
        depth[n.name] = 1 + (depth[best] if best else 0)
        came_from[n.name] = best
    chain, cur = [], nodes[-1].name if nodes else None
    while cur is not None:
        chain.append(cur)
        cur = came_from[cur]
    return chain[::-1]


class _Layout:
    """Box column and edge lane of each node.

    Main-chain boxes sit in column 0 and an edge to the next chain node goes straight down.
    Every other edge of a node p runs down p's *lane*, a column reserved (no box in it) from p's
    row until its last such user is placed: for a side node the lane is its own column, for a
    chain node a free column beside the chain. A side node that is the last user of a lane
    continues in it (like ``git log --graph``); other side nodes take the lowest free column.
    Edges bend only in the gaps between rows, so none crosses a box.
    """

    def __init__(self, nodes: list[Node]):
        shown = {n.name for n in nodes}
        position = {n.name: i for i, n in enumerate(nodes)}
        chain = _main_chain(nodes)
        on_chain = set(chain)
        self.next_on_chain = dict(zip(chain, chain[1:]))
        # users reached through the lane, i.e. all but the straight chain edge
        lane_users = {
            n.name: [u.name for u in n.users if u.name in shown and u.name != self.next_on_chain.get(n.name)]
            for n in nodes
        }
        last = {k: max(us, key=position.__getitem__) for k, us in lane_users.items() if us}
        self.column: dict[str, int] = {}
        self.lane: dict[str, int] = {}
        owner: list[str | None] = [""]  # owner[c]: node whose lane is column c; 0 is the chain's

        def free_column() -> int:
            c = next((i for i, o in enumerate(owner) if o is None), len(owner))
            if c == len(owner):
                owner.append(None)
            return c

        for n in nodes:
            name = n.name
            inputs = [p.name for p in n.all_input_nodes if p.name in shown]
            closing = [p for p in inputs if last.get(p) == name]  # lanes that end here
            if name in on_chain:
                col = 0
            elif closing:
                col = self.lane[closing[0]]
            else:
                col = free_column()
            self.column[name] = col
            for p in closing:
                owner[self.lane[p]] = None
            if name not in on_chain:
                self.lane[name] = col
                owner[col] = name if name in last else None
            elif name in last:
                self.lane[name] = free_column()
                owner[self.lane[name]] = name
        self.columns = len(owner)

    def edge_path(self, p: str, n: str, x: dict[str, int], y: dict[str, int]) -> str:
        half, gap = _BOX_W // 2, _ROW_H - _BOX_H
        x0, y0 = x[p] + half, y[p] + _BOX_H
        x1, y1 = x[n] + half, y[n]
        if self.next_on_chain.get(p) == n or (self.lane[p] == self.column[p] == self.column[n]):
            return f"M{x0},{y0} V{y1}"
        xl = _MARGIN + self.lane[p] * _COL_W + half
        d = f"M{x0},{y0}"
        if xl != x0:  # step out of the chain into the lane, in the gap below p
            d += f" C{x0},{y0 + gap // 2} {xl},{y0} {xl},{y0 + gap // 2}"
        d += f" V{y1 - gap // 2}"
        if xl != x1:  # step into the target's column, in the gap above it
            d += f" C{xl},{y1} {x1},{y1 - gap // 2} {x1},{y1}"
        else:
            d += f" V{y1}"
        return d


def _clip(s: str) -> str:
    return s if len(s) <= _MAX_CHARS else s[: _MAX_CHARS - 1] + "…"


def to_svg(
    gm: torch.fx.GraphModule, highlight: Collection[str] = (), labels: Mapping[str, str] | None = None
) -> str:
    """A self-contained SVG, tall rather than wide; highlighted boxes are filled orange."""
    labels = labels or {}
    nodes = drawn_nodes(gm, highlight)
    layout = _Layout(nodes)
    x = {n.name: _MARGIN + layout.column[n.name] * _COL_W for n in nodes}  # left edge of a box
    y = {n.name: _MARGIN + i * _ROW_H for i, n in enumerate(nodes)}  # top edge of a box
    width = _MARGIN * 2 + layout.columns * _COL_W
    height = _MARGIN * 2 + len(nodes) * _ROW_H

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#495057"/>'
        "</marker></defs>",
        f'<rect width="{width}" height="{height}" fill="white"/>',
        '<g fill="none" stroke="#868e96" stroke-width="1.2">',
    ]
    for p, n in _edges(nodes):
        parts.append(f'<path d="{layout.edge_path(p.name, n.name, x, y)}" marker-end="url(#arrow)"/>')
    parts.append("</g>")

    half = _BOX_W // 2
    for n in nodes:
        title, detail = _title_and_detail(gm, n, labels.get(n.name))
        if n.name in highlight:
            fill, stroke = "#ffd8a8", "#e8590c"
        elif n.op in ("placeholder", "output"):
            fill, stroke = "#e7f5ff", "#1c7ed6"
        else:
            fill, stroke = "#f8f9fa", "#495057"
        tooltip = f"%{n.name} = {n.op} {_short_target(n)}" + (f"  ({labels[n.name]})" if n.name in labels else "")
        bx, by = x[n.name], y[n.name]
        parts.append(f"<g><title>{escape(tooltip)}</title>")
        parts.append(
            f'<rect x="{bx}" y="{by}" width="{_BOX_W}" height="{_BOX_H}" rx="5" '
            f'fill="{fill}" stroke="{stroke}"/>'
        )
        ty = by + (13 if detail else 20)
        parts.append(f'<text x="{bx + half}" y="{ty}" text-anchor="middle">{escape(_clip(title))}</text>')
        if detail:
            parts.append(
                f'<text x="{bx + half}" y="{by + 26}" text-anchor="middle" fill="#495057" '
                f'font-style="italic">{escape(_clip(detail))}</text>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ dot


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


def to_dot(
    gm: torch.fx.GraphModule, highlight: Collection[str] = (), labels: Mapping[str, str] | None = None,
    *, groups: Mapping[str, str] | None = None, colors: Mapping[str, str] | None = None,
    removed: Collection[str] = (), only: Collection[str] | None = None, title: str = "",
) -> str:
    """A Graphviz ``digraph``, top to bottom: highlighted nodes filled (by ``colors[groups[name]]``
    when ``groups`` names their group, else orange), ``removed`` nodes dashed and struck through,
    ``only`` and context as in :func:`to_mermaid`. Node ids are the fx node names, so the SVG that
    ``dot`` draws from it holds each node's name as its ``<title>``."""
    labels, groups, colors = labels or {}, groups or {}, colors or {}
    nodes, context = _selection(gm, highlight, removed, only)
    out = [
        "digraph G {",
        '  graph [rankdir=TB, bgcolor="white", nodesep=0.2, ranksep=0.25, fontname="Helvetica", fontsize=13'
        + (f', label=<{_html(title)}>, labelloc=t' if title else "") + "];",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.12,0.04", '
        'fillcolor="#f8f9fa", color="#495057", height=0.3];',
        '  edge [color="#868e96", arrowsize=0.6];',
    ]
    for n in context:
        out.append(f'  {_dot_id(n.name)} [label=<<FONT COLOR="#868e96">{_html(n.name)}</FONT>>, shape=ellipse, '
                   'style="dashed", color="#ced4da", fontsize=9, height=0.2];')
    for n in nodes:
        head, detail = _title_and_detail(gm, n, None if n.name in removed else labels.get(n.name))
        if n.name in removed:
            detail = labels.get(n.name) or "removed"
        head, detail = _html(_clip(head)), _html(detail if len(detail) <= 48 else detail[:47] + "…")
        attrs = []
        if n.name in removed:
            head = f"<S>{head}</S>"
            attrs += ['style="rounded,dashed"', 'color="#868e96"', 'fontcolor="#868e96"']
        elif n.name in highlight:
            fill = colors.get(groups.get(n.name, ""), "#ffd8a8")
            attrs += [f'fillcolor="{fill}"', 'color="#343a40"', "penwidth=2"]
        elif n.op in ("placeholder", "output"):
            attrs += ['fillcolor="#e7f5ff"', 'color="#1c7ed6"']
        label = f"<B>{head}</B>" + (f'<BR/><FONT POINT-SIZE="9">{detail}</FONT>' if detail else "")
        tooltip = f"%{n.name} = {n.op} {_short_target(n)}" + (f" ({labels[n.name]})" if n.name in labels else "")
        attrs += [f"label=<{label}>", f"tooltip={_dot_id(tooltip)}"]
        out.append(f"  {_dot_id(n.name)} [{', '.join(attrs)}];")
    for p, n in _edges(context + nodes, targets=nodes):
        style = ' [style=dashed]' if p.name in removed or n.name in removed else ""
        out.append(f"  {_dot_id(p.name)} -> {_dot_id(n.name)}{style};")
    out.append("}")
    return "\n".join(out) + "\n"


class GraphvizMissing(TokenoptError):
    """The Graphviz ``dot`` program is needed and not installed."""


def render_dot(dot: str, fmt: str = "svg", timeout: float = 60.0) -> str:
    """Draw DOT text with Graphviz's ``dot`` program; returns the output (SVG text by default)."""
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissing("Graphviz's `dot` program is not on PATH; it draws the SVG graphs.\n"
                              "  Install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install "
                              "graphviz) and run again.")
    done = subprocess.run([exe, f"-T{fmt}"], input=dot, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"dot -T{fmt} failed: {done.stderr.strip()}")
    return done.stdout
