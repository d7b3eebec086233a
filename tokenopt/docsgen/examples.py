"""Every shipped recipe applied to a small ViT, as the pass pages show it; the image-generation
recipes also on the demo generators' denoisers, as the generation page shows them.

The model is an example model (:data:`EXAMPLE_MODELS`): the ``digits`` demo architecture (timm ViT,
32 px, 4 px patches, 65 tokens, 6 blocks), a small Swin for the Swin recipes, or, for the
generation page (:data:`GENERATION_RECIPES`), the demo generators' UNet and DiT architectures
(diffusers, the ``diffusion`` extra). Weights are random from a fixed seed, so nothing is downloaded
or trained and the graphs are the same on every machine. For each recipe: one block before and after the rewrite (the block where
the recipe inserted most), drawn by Graphviz (inserted nodes filled with their pass's colour,
removed nodes dashed and struck through) and as Mermaid; the per-layer report; and what
``tokenopt inspect`` prints for the saved artifact.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenopt import graph_export, graph_style
from tokenopt.analysis.capture import CAPTURE_MODES, capture
from tokenopt.cleanup import drop_noop_calls, is_noop_module
from tokenopt.demo_specs import DEMOS
from tokenopt.errors import TokenoptError
from tokenopt.passes import available_passes, get_pass
from tokenopt.record import record_of, update_record

SEED = 0
NOOP = "no-op call, dropped by the cleanup"        # why a node of the original is gone
DEAD = "unused, dropped as dead code"   # inserted for the model's outputs (pooling, token grid), by no pass


def demo_arch_spec(name: str = "digits") -> str:
    """``timm:<name>?k=v&...``: the demo model's architecture, as a model spec (random weights)."""
    spec = DEMOS[name]
    return f"timm:{spec.timm_name}?" + "&".join(f"{k}={v}" for k, v in spec.timm_kwargs.items())


def frontends() -> list[str]:
    """The capture front ends (``CAPTURE_MODES`` without ``auto``), the default first."""
    return [m for m in CAPTURE_MODES if m != "auto"]


def _original_graph(model, x, frontend: str):
    """The model's graph as ``frontend`` captures it, before any rewrite (same node names as the
    capture inside optimize, which rewrites its own copy), after the same cleanup the rewritten
    graph gets: the two sides then differ by what the passes did, not by the no-op calls
    (``nn.Identity``, dropout with p=0) that cleanup takes out of both."""
    gm = capture(model, x, frontend).graph
    if drop_noop_calls(gm):
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


def pass_colors() -> dict[str, str]:
    """The colour of the nodes each registered pass inserts (and ``""``: inserted by no pass)."""
    return graph_style.pass_colors(available_passes())


def recipe_passes(text: str) -> list[str]:
    """The pass names a recipe's rules use, in order of first use."""
    from tokenopt.recipe import load_recipe
    return list(dict.fromkeys(r.pass_name for r in load_recipe(text).rules))


def recipe_comment(text: str) -> str:
    """The comment lines at the top of a recipe file, as one paragraph."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


@dataclass
class RecipeExample:
    """One shipped recipe applied to an example model (``model``); the block drawn is ``block``."""

    name: str                    # the recipe file's stem
    text: str                    # the YAML as shipped
    passes: list[str]
    block: str                   # module path of the block drawn
    before_svg: str
    after_svg: str
    before_mermaid: str
    after_mermaid: str
    inserted: list[tuple[str, str, str, str]]     # in the drawn block: (node, op, what it is, pass)
    removed: list[tuple[str, str]]           # in the drawn block: (node, why)
    report: str                              # the per-layer table, as tokenopt prints it
    inspect: str                             # `tokenopt inspect ARTIFACT`, its output
    flops_before: int = 0
    flops_after: int = 0
    selector_flops: int = 0
    notes: list[str] = field(default_factory=list)
    frontend: str = "fx"                     # the capture front end that made the graph
    model: str = "vit"                       # the example model drawn (a key of EXAMPLE_MODELS)

    @property
    def comment(self) -> str:
        return recipe_comment(self.text)


@dataclass
class FrontendFailure:
    """A recipe that a non-default front end could not apply to the example model, and why."""

    name: str
    text: str
    passes: list[str]
    frontend: str
    error: str


# recipes for Swin (their stem says so: they select Swin stages, which a plain ViT does not have) are shown on
# a small Swin: 64 px, windows of 4, stages of 1, 1, 2 and 1 blocks
SWIN_SPEC = ("timm:swin_tiny_patch4_window7_224?img_size=64&embed_dim=32&depths=1,1,2,1&num_heads=1,2,2,2"
             "&window_size=4&num_classes=10")
# the models a recipe can be drawn on: name -> what the pages call it
EXAMPLE_MODELS = {
    "vit": "the `digits` demo architecture (timm ViT, 32 px images in 4 px patches: 64 patch tokens and a class "
           "token, 6 blocks)",
    "swin": "a small Swin (timm, 64 px, windows of 4, stages of 1, 1, 2 and 1 blocks)",
    "unet": "the `digits-unet` demo generator's architecture (diffusers `UNet2DConditionModel`, channels (16, 32), "
            "spatial transformers on a 16 x 16 grid of 256 tokens, cross-attention to 77 text states)",
    "dit": "the `digits-dit` demo generator's architecture (diffusers `DiTTransformer2DModel`, 4 x 4 patches of "
           "32 px images: an 8 x 8 grid of 64 tokens, 4 blocks, adaLN conditioning on the timestep and the class)",
}
# the denoisers (diffusers classes, so they need the ``diffusion`` extra) -> the demo generator's class and config
_GENERATOR_MODELS = {"unet": "UNet2DConditionModel", "dit": "DiTTransformer2DModel"}
# what the generation page draws: (recipe stem, example model)
GENERATION_RECIPES = (("tomesd-50", "unet"), ("tome-dit", "dit"))


def example_model_for(stem: str) -> str:
    """The example model a shipped recipe is drawn on for its pass page: a Swin recipe (its stem says so)
    on the small Swin, every other on the demo ViT."""
    return "swin" if "swin" in stem else "vit"


def diffusion_installed() -> bool:
    """Whether diffusers (the ``diffusion`` extra) is importable, so the denoiser examples can be built."""
    import importlib.util
    return importlib.util.find_spec("diffusers") is not None


def build_model(kind: str = "vit"):
    """The example model ``kind`` (a key of :data:`EXAMPLE_MODELS`) with seeded random weights, and the
    base record artifacts need."""
    from tokenopt import sources
    if kind not in EXAMPLE_MODELS:
        raise ValueError(f"no example model {kind!r}; choose one of {', '.join(EXAMPLE_MODELS)}")
    torch.manual_seed(SEED)
    if kind in _GENERATOR_MODELS:
        import json

        from tokenopt.sources import generator_models
        class_name = _GENERATOR_MODELS[kind]
        config = generator_models.UNET if kind == "unet" else generator_models.DIT
        model = generator_models.build(class_name, config)
        # what diffusers:DIR records, so an artifact of it rebuilds the architecture (the config as JSON data)
        base = {"kind": "diffusers", "spec": f"a {class_name}", "class": class_name,
                "config": json.loads(json.dumps(dict(model.config), default=list))}
    else:
        model, base = sources.load_model(SWIN_SPEC if kind == "swin" else demo_arch_spec())
    model.tokenopt_base = base
    return model.eval()


def _example_batch(model, n: int = 2):
    """``n`` seeded images for a ViT; for a denoiser, its example call of ``n`` (seeded by its maker)."""
    from tokenopt.analysis import example_input_for
    x = example_input_for(model, batch=n)
    if not isinstance(x, torch.Tensor):
        return x
    g = torch.Generator().manual_seed(SEED)
    return torch.randn((n, *x.shape[1:]), generator=g)


def _choose_block(gm, analysis, before_names: set[str]) -> int:
    """The block where the rewrite inserted most nodes (the earliest on a tie); every block whose
    span can be cut from both graphs is a candidate."""
    after_names = [n.name for n in gm.graph.nodes]
    present = set(after_names)
    inserted = set(record_of(gm).inserted)
    best, best_count = None, -1
    for b in analysis.blocks:
        if not {b.input, b.output} <= present or not {b.input, b.output} <= before_names:
            continue
        count = len(inserted.intersection(graph_export.node_span(gm, b.input, b.output)))
        if count > best_count:
            best, best_count = b.index, count
    if best is None or best_count <= 0:
        raise RuntimeError("the rewrite inserted no node in any block")
    return best


@contextlib.contextmanager
def _quiet():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run_recipe(path: Path, workdir: Path, frontend: str = "fx", inspect: bool = True,
               model: str | None = None) -> RecipeExample:
    """Apply the recipe at ``path`` to the example model ``model`` (default: the one
    :func:`example_model_for` picks for the recipe), captured by ``frontend`` (``auto``: as
    ``tokenopt.optimize`` chooses; the example records the one used), and draw what it did;
    ``inspect``: also save it and run ``tokenopt inspect`` on the file."""
    import tokenopt
    from tokenopt.cli import app
    from typer.testing import CliRunner

    text = path.read_text()
    kind = model or example_model_for(path.stem)
    net = build_model(kind)
    x = _example_batch(net)
    calibration = _example_batch(net, 4)           # for rules that measure the model (ToFu op: auto)
    if not isinstance(calibration, torch.Tensor):  # a denoiser: calibration takes images, it has none
        calibration = None
    # the original graph: traced the way optimize traces (same node names) from a model of its own, so the
    # drawing never shares modules with the model the rewrite changes
    original = _original_graph(build_model(kind), x, frontend)
    choose = {} if len(frontends()) == 1 and frontend != "auto" else {"capture": frontend}
    # from the recipes' parent folder, so messages name "recipes/x.yaml" rather than this machine's path
    with _quiet(), _chdir(path.parent.parent):
        gm = tokenopt.optimize(net, Path(path.parent.name) / path.name, x, calibration=calibration, **choose)
    analysis = record_of(gm).analysis
    before_names = {n.name for n in original.graph.nodes}
    index = _choose_block(gm, analysis, before_names)
    b_after = analysis.blocks[index]
    span_after = graph_export.node_span(gm, b_after.input, b_after.output)
    span_before = graph_export.node_span(original, b_after.input, b_after.output)
    present = {n.name for n in gm.graph.nodes}
    labels = dict(record_of(gm).inserted)
    groups = dict(getattr(record_of(gm), "inserted_by", {}))
    colors = pass_colors()
    inserted_here = [n for n in span_after if n in labels]
    removed = {}
    for name in span_before:
        if name in present:
            continue
        node = next(n for n in original.graph.nodes if n.name == name)
        module = original.get_submodule(node.target) if node.op == "call_module" else None
        if module is not None and is_noop_module(module):
            removed[name] = NOOP
        elif not node.users:
            removed[name] = DEAD
        else:
            removed[name] = "replaced by the rewrite"
    title = f"{b_after.path} before"
    before_dot = graph_export.to_dot(original, labels=removed, removed=set(removed), only=span_before,
                                     title=f"{title} ({path.stem})")
    after_dot = graph_export.to_dot(gm, set(labels), labels, groups=groups, colors=colors, only=span_after,
                                    title=f"{b_after.path} after {path.stem}")
    report = record_of(gm).report
    node_ops = {n.name: n for n in gm.graph.nodes}
    inserted = [(n, _op_name(gm, node_ops[n]), labels[n], groups.get(n, "")) for n in inserted_here]
    # the artifact, and what `tokenopt inspect` says about it
    inspected = ""
    if inspect:
        artifact = workdir / f"{path.stem}.tokenopt.pt"
        tokenopt.save(gm, artifact)
        with _chdir(workdir):
            result = CliRunner().invoke(app, ["inspect", artifact.name], env={"COLUMNS": "120"})
        if result.exit_code != 0:
            raise RuntimeError(f"tokenopt inspect {artifact.name} failed ({result.exit_code}): {result.output}")
        inspected = _strip_ansi(result.output).rstrip()
    return RecipeExample(
        name=path.stem, text=text, passes=recipe_passes(text), block=b_after.path,
        before_svg=graph_export.render_dot(before_dot), after_svg=graph_export.render_dot(after_dot),
        before_mermaid=graph_export.to_mermaid(original, labels=removed, removed=set(removed), only=span_before),
        after_mermaid=graph_export.to_mermaid(gm, set(labels), labels, groups=groups, colors=colors, only=span_after),
        inserted=inserted, removed=sorted(removed.items()), report=report_markdown(report),
        inspect=inspected, flops_before=report.flops_before, frontend=record_of(gm).capture, model=kind,
        flops_after=report.flops_after, selector_flops=sum(r.selector_flops for r in report.rows),
        notes=list(report.warnings),
    )


def report_markdown(report) -> str:
    """The per-layer report (``tokenopt.report.Report``) as a Markdown table, same columns as printed."""
    sel = any(r.selector_flops for r in report.rows)
    head = ["layer", "block", "tokens in → out", "GFLOPs (MACs) before", "GFLOPs (MACs) after"] + \
        (["of which selector MFLOPs (MACs)"] if sel else []) + ["rule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.rows:
        cells = [str(r.index), f"`{r.path}`", r.tokens_text, f"{r.flops_before / 1e9:.4f}", f"{r.flops_after / 1e9:.4f}"]
        cells += [f"{r.selector_flops / 1e6:.3f}"] if sel else []
        lines.append("| " + " | ".join(cells + [r.acted.replace("|", "/")]) + " |")
    total = ["", "**total**", "", f"{report.flops_before / 1e9:.4f}", f"{report.flops_after / 1e9:.4f}"]
    total += [f"{sum(r.selector_flops for r in report.rows) / 1e6:.3f}"] if sel else []
    lines.append("| " + " | ".join(total + [f"FLOPs ratio {report.flops_ratio:.2f}x (ideal speedup)"]) + " |")
    title = f"{len(report.rows)} blocks, {report.prefix_tokens} prefix token(s), pooling {report.pooling}"
    notes = [f"- warning: {w}" for w in report.warnings] + [f"- {p} left unchanged: {why}" for p, why in report.skipped]
    return "\n".join([title, "", *lines, *([""] + notes if notes else [])])


def _op_name(gm, node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


@contextlib.contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _strip_ansi(s: str) -> str:
    return _ANSI.sub("", s)


def run_all(recipes_dir: Path) -> list[RecipeExample | FrontendFailure]:
    """Every ``*.yaml`` in ``recipes_dir``, in name order, through the default front end; then,
    through each other front end, the first recipe of each pass (the graph it captures)."""
    fronts = frontends()
    paths = sorted(recipes_dir.glob("*.yaml"))
    with tempfile.TemporaryDirectory(prefix="tokenopt-docs-") as tmp:
        out = [run_recipe(p, Path(tmp), fronts[0]) for p in paths]
        for frontend in fronts[1:]:
            firsts = {}
            for ex in out:
                for name in ex.passes:
                    firsts.setdefault(name, ex.name)
            for stem in dict.fromkeys(firsts.values()):
                path = recipes_dir / f"{stem}.yaml"
                try:
                    out.append(run_recipe(path, Path(tmp), frontend, inspect=False))
                except TokenoptError as e:     # shown on the page: what a user of that front end meets
                    out.append(FrontendFailure(stem, path.read_text(), recipe_passes(path.read_text()), frontend,
                                               str(e)))
        return out


def run_generation(recipes_dir: Path) -> list[RecipeExample]:
    """The generation page's examples (:data:`GENERATION_RECIPES`): each recipe on its demo generator's
    architecture, captured as ``tokenopt.optimize`` captures it (``auto``: torch.export, since fx cannot
    trace a diffusers denoiser). Empty when diffusers is not installed (the page says so)."""
    if not diffusion_installed():
        return []
    with tempfile.TemporaryDirectory(prefix="tokenopt-docs-") as tmp:
        return [run_recipe(recipes_dir / f"{stem}.yaml", Path(tmp), "auto", inspect=False, model=kind)
                for stem, kind in GENERATION_RECIPES]


def pass_title(name: str) -> str:
    """The pass's display name: what its module docstring says before the first colon (``ToMe``)."""
    doc = (_module_doc(name).strip().splitlines() or [name])[0]
    head = doc.split(":", 1)[0].strip()
    return head if head and " " not in head else name


def _module_doc(name: str) -> str:
    import sys
    cls = get_pass(name)
    return sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""


def pass_citation(name: str) -> str:
    """The first line of the pass module's docstring: the method and its paper."""
    return (_module_doc(name).strip().splitlines() or [""])[0]


def pass_sketch(name: str) -> str:
    """The pass module's docstring after its first line, literal blocks (``::``) as fenced code."""
    lines = _module_doc(name).strip().splitlines()[1:]
    out, in_code = [], False
    for line in lines:
        if in_code:
            if line.strip() and not line.startswith("    "):
                out += ["```", ""]
                in_code = False
            else:
                out.append(line[4:] if line.startswith("    ") else line)
                continue
        if line.rstrip().endswith("::"):
            out.append(line.rstrip()[:-1])
            out.append("")
            out.append("```text")
            in_code = True
            continue
        out.append(line)
    if in_code:
        out.append("```")
    # fenced blocks must not end with blank lines inside; tidy the markdown a little
    text = "\n".join(out)
    text = re.sub(r":(?:func|class|mod|meth|attr):`~?([^`]+)`", r"`\1`", text)    # Sphinx roles read as code
    text = re.sub(r"```text\n\n+", "```text\n", text)
    text = re.sub(r"\n\n+```\n", "\n```\n", text)
    return text.strip()
