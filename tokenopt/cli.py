"""The ``tokenopt`` command line: apply a recipe, validate one, inspect a model or an artifact.

    tokenopt apply recipe.yaml model.pt --arch timm:vit_small_patch16_224 -o model.tokenopt.pt --check
    tokenopt validate recipe.yaml [MODEL]
    tokenopt inspect model.tokenopt.pt --graph svg -o graph.svg

Every user error (a :class:`~tokenopt.errors.TokenoptError`) ends as one ``error: ...`` message on
stderr with exit status 2 and no traceback; usage errors (a missing argument, an unknown option)
exit 2 as well. Files are written to a temporary name and renamed when complete, so a failed run
never leaves a partial output behind.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from tokenopt.errors import TokenoptError

app = typer.Typer(
    name="tokenopt",
    help="Make Vision Transformers faster by rewriting their torch.fx graphs (ToMe, ToFu, ToSA, SPA) "
         "from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

MODEL_HELP = ("timm:<name>[?key=value&...] (random weights), demo:digits | demo:digits-clutter (trained demo "
              "ViTs), package.module:factory[?key=value], a state dict "
              "(.pt/.pth/.bin/.safetensors, with --arch) or a pickled model (with --trust-pickle).")
ArchOpt = Annotated[Optional[str], typer.Option(
    "--arch", "-a", metavar="ARCH",
    help="Architecture for a state dict: timm:<name>[?key=value&...] or package.module:factory[?key=value&...].")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow a checkpoint that is a pickled Python object (runs code from the file).")]
StrictOpt = Annotated[bool, typer.Option(
    "--strict", help="Treat the recipe as `strict: true`: a layer that cannot take its r, or a ToSA model whose "
                     "selectors were never trained, is an error instead of a warning.")]
InputSizeOpt = Annotated[Optional[str], typer.Option(
    "--input-size", metavar="C,H,W", help="Input size of the example batch (default: from the model's config).")]
LeafOpt = Annotated[Optional[list[str]], typer.Option(
    "--leaf", metavar="NAME", help="Module class name or path to keep whole when tracing (repeatable).")]


class GraphFormat(str, enum.Enum):
    text = "text"
    svg = "svg"
    mermaid = "mermaid"


# ----------------------------------------------------------------------------------------------
# output helpers

def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    # Piped or captured output gets a fixed, wide layout instead of rich's 80-column default.
    return Console(file=stream, stderr=stderr, width=None if tty else 120, highlight=False)


def _error(message: str) -> None:
    from rich.text import Text

    _console(stderr=True).print(Text(f"error: {message}", style="red"), soft_wrap=True)


def _warn(message: str, console=None) -> None:
    from rich.text import Text

    (console or _console(stderr=True)).print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)


@contextlib.contextmanager
def _status(message: str):
    """A spinner on stderr while something slow runs (only on a terminal: logs stay clean)."""
    if sys.stderr.isatty():
        with _console(stderr=True).status(message):
            yield
    else:
        yield


def _user_errors(fn):
    """Turn a TokenoptError raised by a command into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TokenoptError as e:
            _error(str(e))
            raise typer.Exit(getattr(e, "exit_code", 2)) from None

    return wrapper


# ----------------------------------------------------------------------------------------------
# shared steps

def _parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """``3,224,224`` (or ``3x224x224``), ``224,160`` (3 channels) or ``224`` (square, 3 channels)."""
    if text is None:
        return None
    parts = re.split(r"[,x]", text.strip().lower())
    dims = tuple(int(p) for p in parts) if all(p.strip().isdigit() for p in parts) else ()
    if len(dims) == 1:
        dims = (3, dims[0], dims[0])
    elif len(dims) == 2:
        dims = (3, *dims)
    if len(dims) != 3 or min(dims) <= 0:
        raise typer.BadParameter(f"{text!r}: write C,H,W (e.g. 3,224,224), H,W or a single size.",
                                 param_hint="--input-size")
    return dims  # type: ignore[return-value]


def _example_input(model, size: tuple[int, int, int] | None):
    import torch

    from tokenopt.analysis import example_input_for

    if size is None:
        return example_input_for(model)
    p = next(iter(model.parameters()), None)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    return x.to(p.device, p.dtype) if p is not None and p.is_floating_point() else x


def _load(spec: str, arch: str | None, trust_pickle: bool):
    from tokenopt import io

    with _status(f"loading {spec}"):
        return io.load_model(spec, arch, trust_pickle)


def _load_recipe(path: str, strict: bool = False):
    from tokenopt.recipe import load_recipe

    rec = load_recipe(Path(path))
    rec.strict = rec.strict or strict
    return rec


@contextlib.contextmanager
def _plan_warnings():
    """Plan warnings come back in the plan/report and are printed from there, once."""
    from tokenopt.plan import TokenoptWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenoptWarning)
        yield


def _print_notes(skipped, notes, console) -> None:
    for path, why in skipped:
        _warn(f"{path} left unchanged: {why}", console)
    for n in notes:
        _warn(n, console)


# ----------------------------------------------------------------------------------------------
# apply

@app.command()
@_user_errors
def apply(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="The recipe YAML file.")],
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT",
                                         help="Where to write the optimized model (a tokenopt artifact).")],
    strict: StrictOpt = False,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Compare the original and optimized model on a fixed random batch of 8.")] = False,
    input_size: InputSizeOpt = None,
    leaf: LeafOpt = None,
    calibration: Annotated[Optional[str], typer.Option(
        "--calibration", metavar="DATA",
        help="Calibration images for rules that measure the model (ToFu op: auto): digits, digits-clutter "
             "or an ImageFolder directory (its first 64 training images).")] = None,
) -> None:
    """Rewrite MODEL as RECIPE asks and save the result to OUT."""
    from tokenopt import artifact, io
    from tokenopt.pipeline import has_bipartite_step, optimize

    size = _parse_input_size(input_size)
    rec = _load_recipe(recipe, strict)
    io.check_output_path(output)  # fail before the slow part, not after it
    base_model, base = _load(model, arch, trust_pickle)
    x = _example_input(base_model, size)
    leaves = list(leaf or [])
    calib = None
    if calibration is not None:
        from tokenopt.cli_measure import _batch, _dataset
        calib = _batch(_dataset(calibration, base_model, "train", None), 64)
    with _status("tracing, rewriting and counting FLOPs"), _plan_warnings():
        gm = optimize(base_model, rec, x, leaf_modules=leaves, calibration=calib)
    gm.tokenopt_base = base
    gm.tokenopt_leaf_modules = leaves
    if rec.strict:   # refuse untrained ToSA selectors now, not when the saved model is first used
        from tokenopt.passes.tosa import check_selectors_trained
        check_selectors_trained(gm, ())
    out = _console()
    report = gm.tokenopt_report
    out.print(report.rich_table())
    _print_notes(report.skipped, report.warnings, _console(stderr=True))
    if has_bipartite_step(gm):
        from tokenopt.ops import native
        state = native.status()
        out.print("merge step for eager CPU inference: " + ("native" if state.startswith("on") else
                  f"PyTorch operators ({state.removeprefix('off: ')})"))
    if check:
        with _status("comparing the original and optimized model"):
            line = _check(base_model, gm, x, leaves)
        out.print(line)
    if base.get("kind") == "class":
        _warn(f"the artifact records the base model only as its class {base['class']}; if that class cannot be "
              "built with no arguments, loading needs the architecture: tokenopt.load(path, arch=...) or "
              "`tokenopt inspect --arch ...`. Save a state dict and pass --arch to record it.")
    with _status(f"saving {output}"):
        artifact.save(gm, output, base=base)
    out.print(f"saved {output} ({output.stat().st_size / 1e6:.1f} MB)")


def _check(model, gm, x, leaves, n: int = 8) -> str:
    """Max |difference| and top-1 agreement of the two models on a seeded random batch."""
    import torch

    batch = torch.randn(n, *x.shape[1:], generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)
    reference = model
    if getattr(gm, "tokenopt_outputs", "logits") == "tokens":
        reference = _token_reference(model, x, leaves)
    with torch.no_grad():
        a, b = _first_tensor(reference(batch)), _first_tensor(gm(batch))
    if a.shape != b.shape:
        return f"check: output shapes differ: original {tuple(a.shape)}, optimized {tuple(b.shape)}"
    diff = (a.float() - b.float()).abs().max().item()
    line = f"check on {n} random inputs (seed 0): max |original - optimized| = {diff:.3g}"
    if a.ndim == 2:
        agree = (a.argmax(-1) == b.argmax(-1)).sum().item()
        line += f", top-1 agreement {agree}/{n} ({100 * agree / n:.0f}%)"
    else:
        cos = torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=-1).mean().item()
        line += f", mean cosine similarity {cos:.4f}"
    return line


def _token_reference(model, x, leaves):
    """The unmodified model, returning patch tokens the way an ``outputs: tokens`` recipe does."""
    from tokenopt.analysis import analyse
    from tokenopt.pipeline import apply_plan
    from tokenopt.plan import LayerPlan, Plan

    analysis = analyse(model, x, leaves)
    layers = [LayerPlan(b.index, b.path, b.tokens, b.tokens) for b in analysis.blocks]
    return apply_plan(analysis, Plan(None, layers), "tokens")


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    for item in out:
        if isinstance(item, torch.Tensor):
            return item
    raise TokenoptError("--check: the model returns no tensor to compare.")


# ----------------------------------------------------------------------------------------------
# validate

@app.command()
@_user_errors
def validate(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="The recipe YAML file.")],
    model: Annotated[Optional[str], typer.Argument(
        metavar="MODEL", help="Also plan the recipe against this model (token counts per layer).")] = None,
    strict: StrictOpt = False,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    input_size: InputSizeOpt = None,
    leaf: LeafOpt = None,
) -> None:
    """Check RECIPE against the schema; with MODEL, plan it layer by layer without rewriting."""
    from tokenopt.analysis import analyse
    from tokenopt.plan import make_plan

    size = _parse_input_size(input_size)
    rec = _load_recipe(recipe, strict)
    out = _console()
    out.print(_rules_table(rec))
    if model is None:
        out.print(f"[green]ok[/green]: {recipe} is a valid recipe ({len(rec.rules)} rule(s)).")
        return
    base_model, _ = _load(model, arch, trust_pickle)
    x = _example_input(base_model, size)
    with _status("tracing and analysing"):
        analysis = analyse(base_model, x, list(leaf or []), prefix_tokens=rec.prefix_tokens)
    with _plan_warnings():
        plan = make_plan(rec, analysis)
    out.print(_plan_table(plan, analysis))
    _print_notes(plan.skipped, plan.warnings, _console(stderr=True))
    first, last = plan.layers[0].tokens_in, plan.layers[-1].tokens_out
    out.print(f"[green]ok[/green]: {recipe} plans on {model}: {first} → {last} tokens through "
              f"{len(plan.layers)} blocks ({analysis.prefix_tokens} prefix).")


def _rules_table(rec):
    from rich.table import Table

    t = Table(title=f"recipe {rec.source}: version {rec.version}, strict {str(rec.strict).lower()}, "
                    f"outputs {rec.outputs}")
    for col in ("rule", "line", "pass", "layers", "options"):
        t.add_column(col)
    for r in rec.rules:
        opts = r.options.model_dump(mode="json") if r.options is not None else {}
        t.add_row(str(r.index + 1), "" if r.line is None else str(r.line), r.pass_name, str(r.layers),
                  ", ".join(f"{k}={v}" for k, v in opts.items()))
    return t


def _plan_table(plan, analysis):
    from rich.table import Table

    t = Table(title=f"plan: {len(plan.layers)} blocks, {analysis.prefix_tokens} prefix token(s)")
    for col, just in (("layer", "right"), ("block", "left"), ("attention", "left"),
                      ("tokens in → out", "right"), ("rule", "left")):
        t.add_column(col, justify=just)
    for lp, b in zip(plan.layers, analysis.blocks):
        t.add_row(str(lp.block), lp.path, b.attention.kind, f"{lp.tokens_in} → {lp.tokens_out}", lp.acted)
    return t


# ----------------------------------------------------------------------------------------------
# inspect

@app.command()
@_user_errors
def inspect(
    target: Annotated[str, typer.Argument(metavar="MODEL|ARTIFACT", help=MODEL_HELP + " Or a tokenopt artifact.")],
    graph: Annotated[Optional[GraphFormat], typer.Option(
        "--graph", "-g", help="Also write the (rewritten) graph; inserted nodes are highlighted.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="FILE",
        help="Write the graph here (format from --graph or the suffix: .txt .svg .mmd) instead of stdout.")] = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    input_size: InputSizeOpt = None,
    leaf: LeafOpt = None,
) -> None:
    """Show the blocks tokenopt finds in a model, or what an artifact's recipe rewrote."""
    from tokenopt import artifact, io
    from tokenopt.analysis import analyse

    size = _parse_input_size(input_size)
    if output is not None and graph is None:
        graph = _format_from_suffix(output)
    if output is not None:
        io.check_output_path(output)
    # The graph alone goes to stdout when it is not written to a file, so it can be piped.
    out = _console(stderr=graph is not None and output is None)

    obj = None
    path = Path(target)
    if path.is_file():
        with _status(f"reading {target}"):
            obj = io.read_checkpoint(path, trust_pickle=trust_pickle)
    if obj is not None and artifact.is_artifact(obj):
        with _status("rebuilding the optimized model"):
            gm = artifact.rebuild(artifact.validate_payload(obj, path), arch, source=str(path))
        analysis = gm.tokenopt_analysis
        _print_artifact(out, path, gm)
        labels = dict(getattr(gm, "tokenopt_inserted", {}) or {})
        highlight, graph_module = set(labels), gm
    else:
        if obj is not None:
            model, _ = io.model_from_checkpoint(obj, path, arch)
        else:
            model, _ = _load(target, arch, trust_pickle)
        x = _example_input(model, size)
        with _status("tracing and analysing"):
            analysis = analyse(model, x, list(leaf or []))
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
    from tokenopt import graph_export, io

    render = {GraphFormat.text: graph_export.to_text, GraphFormat.svg: graph_export.to_svg,
              GraphFormat.mermaid: graph_export.to_mermaid}[fmt]
    text = render(gm, highlight, labels)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with io.atomic_write(output, "w") as f:
        f.write(text)
    _console(stderr=True).print(f"wrote the {fmt.value} graph to {output} ({len(highlight)} inserted node(s) "
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
        t.add_row(str(b.index), b.path, b.attention.kind, str(b.attention.heads or "?"), str(b.tokens),
                  str(b.dim), status)
    out.print(t)
    out.print(f"prefix tokens: {analysis.prefix_tokens}" + (f" ({analysis.prefix_source})"
                                                            if analysis.prefix_source else ""))
    pooling = "; ".join(f"{p.kind}" + (f" at {p.node}" if p.node else "") + (f" ({p.detail})" if p.detail else "")
                        for p in analysis.pooling) or "none found"
    out.print(f"pooling: {pooling}")
    if analysis.unmatched:
        out.print("not transformer blocks:")
        for where, why in analysis.unmatched:
            out.print(f"  {where}: {why}", markup=False)


def _print_artifact(out, path: Path, gm) -> None:
    from tokenopt import io

    m = gm.tokenopt_manifest
    base = m.get("base") or {}
    spec = io.base_to_spec(base) or base.get("class") or str(base)
    out.print(f"artifact {path}: tokenopt {m.get('tokenopt')}, torch {m.get('torch')}, timm {m.get('timm')}",
              markup=False)
    out.print(f"base model: {spec}" + (f" (weights from {base['weights']})" if base.get("weights") else ""),
              markup=False)
    out.print(f"example input {tuple(m.get('example_input_shape', ()))}, outputs {m.get('outputs')}, "
              f"dtype {m.get('dtype')}", markup=False)
    out.print("recipe:")
    out.print(gm.tokenopt_recipe.to_yaml().rstrip(), markup=False)
    _print_analysis(out, gm.tokenopt_analysis)
    report = getattr(gm, "tokenopt_report", None)
    if report is not None:
        out.print(report.rich_table())
        _print_notes(report.skipped, report.warnings, out)
    inserted = getattr(gm, "tokenopt_inserted", {}) or {}
    out.print(f"{len(inserted)} node(s) inserted by the recipe (see --graph).")


# ----------------------------------------------------------------------------------------------
# entry points

def _version_callback(value: bool) -> None:
    if value:
        import tokenopt

        typer.echo(f"tokenopt {tokenopt.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Make Vision Transformers faster by rewriting their torch.fx graphs, from YAML recipes."""


def main(argv: list[str] | None = None) -> None:
    """Console script entry point: user errors are one line on stderr and exit status 2."""
    try:
        app(args=argv, prog_name="tokenopt")
    except TokenoptError as e:  # raised outside a command (commands handle their own)
        _error(str(e))
        sys.exit(2)


# Commands that measure on data live in their own module; importing it registers them.
from tokenopt import cli_measure  # noqa: E402,F401
from tokenopt import cli_train  # noqa: E402,F401
