"""``tokenopt inspect``: the blocks tokenopt finds in a model (and why others do not match), or what an
artifact's recipe rewrote; ``--graph`` writes the graph as text, SVG (drawn by Graphviz's ``dot``,
as the documentation's graphs are) or Mermaid.

    tokenopt inspect timm:swin_tiny_patch4_window7_224
    tokenopt inspect model.tokenopt.pt --graph svg -o graph.svg
"""
from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tokenopt.cli.common import (MODEL_HELP, ArchOpt, CaptureOpt, InputSizeOpt, LeafOpt, TrustOpt, WeightsOpt,
                                 console, example_input, load_model, parse_input_size, print_notes, status,
                                 user_errors)
from tokenopt.record import record_of


class GraphFormat(str, enum.Enum):
    text = "text"
    svg = "svg"
    mermaid = "mermaid"


@user_errors
def inspect(
    target: Annotated[str, typer.Argument(metavar="MODEL|ARTIFACT", help=MODEL_HELP + " Or a tokenopt artifact.")],
    graph: Annotated[Optional[GraphFormat], typer.Option(
        "--graph", "-g", help="Also write the (rewritten) graph; inserted nodes are highlighted. "
                              "svg needs Graphviz's dot program.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="FILE",
        help="Write the graph here (format from --graph or the suffix: .txt .svg .mmd) instead of stdout.")] = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    weights: WeightsOpt = None,
    input_size: InputSizeOpt = None,
    leaf: LeafOpt = None,
    capture: CaptureOpt = "auto",
) -> None:
    """Show the blocks tokenopt finds in a model, or what an artifact's recipe rewrote."""
    from tokenopt import artifact, files, sources
    from tokenopt.analysis import analyse

    size = parse_input_size(input_size)
    if output is not None and graph is None:
        graph = _format_from_suffix(output)
    if output is not None:
        files.check_output_path(output)
    if graph is GraphFormat.svg:
        from tokenopt import graph_export
        graph_export.dot_program()      # before the model is loaded and traced: fail at once without dot
    # The graph alone goes to stdout when it is not written to a file, so it can be piped.
    out = console(stderr=graph is not None and output is None)

    obj = None
    path = Path(target)
    if path.is_file():
        with status(f"reading {target}"):
            obj = files.read_checkpoint(path, trust_pickle=trust_pickle)
    if obj is not None and artifact.is_artifact(obj):
        with status("rebuilding the optimized model"):
            gm = artifact.rebuild(artifact.validate_payload(obj, path), arch, source=str(path))
        analysis = record_of(gm).analysis
        _print_artifact(out, path, gm)
        labels = dict(getattr(record_of(gm), "inserted", {}) or {})
        highlight, graph_module = set(labels), gm
    else:
        if obj is not None:
            model, _ = sources.model_from_checkpoint(obj, path, arch)
        else:
            model, _ = load_model(target, arch, trust_pickle, weights)
        x = example_input(model, size)
        with status("tracing and analysing"):
            analysis = analyse(model, x, list(leaf or []), capture=capture)
        _print_analysis(out, analysis)
        labels, highlight, graph_module = _block_labels(analysis), set(), analysis.graph
    if graph is not None:
        _write_graph(graph_module, graph, output, highlight, labels)


def _format_from_suffix(path: Path) -> GraphFormat:
    suffix = path.suffix.lower()
    for fmt, suffixes in ((GraphFormat.svg, (".svg",)), (GraphFormat.mermaid, (".mmd", ".mermaid", ".md")),
                          (GraphFormat.text, (".txt", ".fx", ".py"))):
        if suffix in suffixes:
            return fmt
    raise typer.BadParameter(f"cannot tell the graph format from {path.name!r}; add --graph text|svg|mermaid.",
                             param_hint="--output")


def _write_graph(gm, fmt: GraphFormat, output: Path | None, highlight, labels) -> None:
    from tokenopt import files, graph_export

    render = {GraphFormat.text: graph_export.to_text, GraphFormat.svg: graph_export.to_svg,
              GraphFormat.mermaid: graph_export.to_mermaid}[fmt]
    text = render(gm, highlight, labels)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with files.atomic_write(output, "w") as f:
        f.write(text)
    console(stderr=True).print(f"wrote the {fmt.value} graph to {output} ({len(highlight)} inserted node(s) "
                                "highlighted)")


def _block_labels(analysis) -> dict[str, str]:
    """Notes on the nodes that matter for rewriting, shown beside them in the graph."""
    labels = {}
    for b in analysis.blocks:
        labels[b.attention.node] = f"{b.path}: attention core ({b.attention.kind})"
        labels[b.merge_point] = f"{b.path}: merge point (tokens reduced here)"
        labels[b.output] = f"{b.path}: block output"
    return labels


def _print_analysis(out, analysis) -> None:
    from rich.table import Table

    t = Table(title=f"{len(analysis.blocks)} transformer block(s), input {tuple(analysis.input_shape)}")
    for col, just in (("#", "right"), ("block", "left"), ("attention", "left"), ("heads", "right"),
                      ("tokens", "right"), ("dim", "right"), ("status", "left")):
        t.add_column(col, justify=just)
    for b in analysis.blocks:
        status = "[green]ok[/green]" if b.refusal is None else f"[yellow]refused[/yellow]: {b.refusal}"
        if b.window is not None:     # windowed (Swin): the passes that know windows reduce it
            status = f"[green]windowed[/green]: stage {b.stream + 1}, {b.window.describe()}" + (
                "" if b.refused_by == "windowed" else f"; {status}")
        t.add_row(str(b.index), b.path, b.attention.kind, str(b.attention.heads or "?"), str(b.tokens),
                  str(b.dim), status)
    out.print(t)
    if len(analysis.streams) > 1:
        for st in analysis.streams:
            grid = "x".join(map(str, st.grid)) if st.grid else "?"
            out.print(f"stage {st.index + 1}: blocks {st.blocks[0]}-{st.blocks[-1]}, grid {grid}, dim {st.dim}")
    out.print(f"prefix tokens: {analysis.prefix_tokens}" + (f" ({analysis.prefix_source})"
                                                            if analysis.prefix_source else ""))
    pooling = "; ".join(f"{p.kind}" + (f" ({p.detail})" if p.detail else "")   # node names are fx's, not the user's
                        for p in analysis.pooling) or "none found"
    out.print(f"pooling: {pooling}")
    if analysis.unmatched:
        out.print("not transformer blocks:")
        for where, why in analysis.unmatched:
            out.print(f"  {where}: {why}", markup=False)


def _print_artifact(out, path: Path, gm) -> None:
    from tokenopt import sources

    m = record_of(gm).manifest
    base = m.get("base") or {}
    spec = sources.base_to_spec(base) or base.get("class") or str(base)
    out.print(f"artifact {path}: tokenopt {m.get('tokenopt')}, torch {m.get('torch')}, timm {m.get('timm')}",
              markup=False)
    out.print(f"base model: {spec}" + (f" (weights from {base['weights']})" if base.get("weights") else ""),
              markup=False)
    out.print(f"example input {tuple(m.get('example_input_shape', ()))}, outputs {m.get('outputs')}, "
              f"dtype {m.get('dtype')}", markup=False)
    out.print("recipe:")
    out.print(record_of(gm).recipe.to_yaml().rstrip(), markup=False)
    _print_analysis(out, record_of(gm).analysis)
    report = getattr(record_of(gm), "report", None)
    if report is not None:
        out.print(report.rich_table())
        print_notes(report.skipped, report.warnings, out)
    inserted = getattr(record_of(gm), "inserted", {}) or {}
    out.print(f"{len(inserted)} node(s) inserted by the recipe (see --graph).")
