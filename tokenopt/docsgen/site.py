"""Assemble the generated pages and check them; ``docs/hooks/generate.py`` hands them to mkdocs.

Everything iterates over what the code registers: the passes (``tokenopt.passes``), the shipped
recipes (``recipes/*.yaml``), the verbs of the Typer app; a pass without a hand-written page
gets a generated one. The build fails (:class:`DocsBuildError`) when a pass has no recipe to draw,
a drawn block shows none of the nodes its pass inserted, or a schema key is missing from the
recipe reference.
"""
from __future__ import annotations

import importlib.util
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenopt import graph_style
from tokenopt.docsgen import cli_ref, examples, recipe_ref, results, transcripts
from tokenopt.passes import available_passes

GENERATED_DIR = "passes/generated"      # SVGs of the pass pages, relative to the docs folder
GENERATION_DIR = "generation/generated"  # SVGs of the image-generation page, relative to the docs folder
CAPTURED_DIR = "hooks/captured"         # real runs too slow for the build, relative to the docs folder


class DocsBuildError(RuntimeError):
    """The generated documentation is incomplete; the message says what is missing."""


@dataclass
class Generated:
    files: dict[str, str] = field(default_factory=dict)           # docs-relative path -> content
    pass_sections: dict[str, str] = field(default_factory=dict)   # pass -> markdown for its page
    pass_titles: dict[str, str] = field(default_factory=dict)
    examples: list = field(default_factory=list)     # RecipeExample, or FrontendFailure (other front ends)
    runs: list = field(default_factory=list)         # results.Run: the measured trade-offs
    generation: list = field(default_factory=list)   # RecipeExample: the generation page's denoiser blocks
    generation_section: str = ""                     # markdown for its <!-- generation-graphs --> placeholder
    timings: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------ pass pages


def _check_example(ex: examples.RecipeExample) -> None:
    if "<svg" not in ex.after_svg or "<svg" not in ex.before_svg:
        raise DocsBuildError(f"recipe {ex.name}: Graphviz drew no SVG")
    shown = [n for n, *_ in ex.inserted if f"<title>{n}</title>" in ex.after_svg]
    if not ex.inserted or len(shown) != len(ex.inserted):
        raise DocsBuildError(f"recipe {ex.name}: the drawn block {ex.block} should show the nodes its passes "
                             f"inserted; the SVG has {len(shown)} of {len(ex.inserted)}")


def _md_block(lang: str, text: str, indent: str = "") -> str:
    body = "\n".join(indent + line.rstrip() for line in text.rstrip().splitlines())
    return f"{indent}```{lang}\n{body}\n{indent}```"


def svg_stem(ex: examples.RecipeExample) -> str:
    """The generated SVGs' name: the recipe, and the front end unless it is the default."""
    return ex.name if ex.frontend == examples.frontends()[0] else f"{ex.name}.{ex.frontend}"


def legend(pass_name: str) -> str:
    """What the colours and borders of the drawn graphs mean (graph_style's table, this pass's colour)."""
    st = graph_style.STYLES
    items = [(f"background:{examples.pass_colors()[pass_name]};border-color:{graph_style.PASS_BORDER};"
              "border-width:2px", f"inserted by {examples.pass_title(pass_name)}"),
             (f"background:{graph_style.NO_PASS};border-color:{graph_style.PASS_BORDER};border-width:2px",
              "inserted for the outputs (pooling, token grid)"),
             (f"background:{st['block'].fill};border-color:{st['block'].stroke}", "attention core, merge point, block output"),
             (f"background:{st['plain'].fill};border-color:{st['plain'].stroke}", "unchanged"),
             (f"border-style:dashed;border-color:{st['removed'].stroke};color:{st['removed'].text};"
              "text-decoration:line-through", "removed by the rewrite"),
             (f"border-style:dashed;border-color:{st['context'].stroke};border-radius:1em;color:{st['context'].text}",
              "outside the block (drawn for context)")]
    spans = " ".join(f'<span style="{style}">{text}</span>' for style, text in items)
    return f'<p class="legend">{spans}</p>'


def example_section(ex: examples.RecipeExample, pass_name: str, svg_base: str | None = None) -> str:
    """The one before/after graph of a pass page: the first shipped recipe, the block where it inserts most.
    ``svg_base``: the SVGs' path from the page without ``.before.svg`` (default: a pass page's)."""
    svg_base = svg_base or f"generated/{svg_stem(ex)}"
    others = [examples.pass_title(p) for p in ex.passes if p != pass_name]
    lines = [f"### `{ex.name}`", "",
             f"Block drawn: `{ex.block}` (where `recipes/{ex.name}.yaml` inserts most), both sides after the "
             "cleanup that drops no-op calls, so what differs is the pass's doing. GFLOPs (MACs) per image "
             f"{ex.flops_before / 1e9:.4f} → {ex.flops_after / 1e9:.4f} ({ex.flops_before / max(ex.flops_after, 1):.2f}x "
             "fewer)" + (f"; this recipe also runs {', '.join(others)}" if others else "") + ".", ""]
    for title, which in (("After", "after"), ("Before", "before")):
        src = f"{svg_base}.{which}.svg"
        lines += [f'=== "{title}: {ex.block}"', "",
                  f"    [![{ex.block} {which} {ex.name}]({src})]({src})", ""]
    lines += [f'=== "Per-layer report"', "",
              "\n".join("    " + line if line else "" for line in ex.report.splitlines()), "",
              f'=== "Mermaid (after)"', "", _md_block("mermaid", ex.after_mermaid, "    "), ""]
    lines += [legend(pass_name), ""]
    lines += ["Inserted in this block:", "", "| node | op | what it is | pass |", "|---|---|---|---|"]
    for node, op, label, by in ex.inserted:
        lines.append(f"| `{node}` | `{op}` | {label.replace('|', '/')} | "
                     f"{examples.pass_title(by) if by else '(outputs)'} |")
    lines.append("")
    if ex.removed:
        by_reason: dict[str, list[str]] = {}
        for n, why in ex.removed:
            by_reason.setdefault(why, []).append(f"`{n}`")
        lines += ["Removed from this block: " + "; ".join(f"{why}: {', '.join(ns)}" for why, ns in by_reason.items())
                  + ".", ""]
    return "\n".join(lines)


def _when_to_use(markdown: str) -> tuple[str, str]:
    """The hand-written page's "**When to use it.**" paragraph, and the page without it."""
    paragraphs = markdown.split("\n\n")
    for i, para in enumerate(paragraphs):
        if para.lstrip().startswith("**When to use it.**"):
            return para.strip(), "\n\n".join(paragraphs[:i] + paragraphs[i + 1:])
    return "", markdown


def pass_brief(name: str, exs: list[examples.RecipeExample], with_citation: bool = True) -> str:
    """"In brief": what the pass does (its module's description), then the recipe that draws its graph.
    The hand-written page's "When to use it" paragraph joins it in ``extend_pass_page``."""
    first = exs[0]
    lines = ["## In brief", ""]
    if with_citation:
        lines += [f"**Method.** {examples.pass_citation(name)}", ""]
    lines += ["**What it does.** From the pass's source (`" f"{examples.get_pass(name).__module__}`):", "",
              examples.pass_sketch(name), "",
              "<!-- when-to-use -->", "",
              f"**The recipe** (`recipes/{first.name}.yaml`, the one drawn below; every key: [Options](#options)):", "",
              _md_block("yaml", first.text), ""]
    return "\n".join(lines)


def pass_measured(name: str, runs: list[results.Run]) -> str:
    title = examples.pass_title(name)
    lines = ["## Measured", "",
             f"Every run with a {title} row, from `docs/results/tradeoffs.yaml` (the same numbers as "
             "[Which method?](../which-method.md) and [Measured results](../results/README.md), where each run's "
             "command and setting are). GFLOPs count multiply-accumulates per image; Δ top-1 is against the "
             "original in the same run with the same training.", ""]
    table = results.table(runs, [title], "../results/README.md")
    return "\n".join(lines + (table or ["No measured run yet.", ""]))


def pass_options(name: str, reference: dict) -> str:
    """The pass's keys (type, default, what they do), from the recipe reference's content."""
    rows = recipe_ref.key_table(reference[name]) if name in reference else []
    return "\n".join(["## Options", "",
                      f"Keys of a `pass: {name}` rule; the error each bad value gives is in the "
                      f"[recipe reference](../reference/recipes.md#{name}-options).", "", *rows, ""])


def pass_graphs(name: str, exs: list) -> str:
    """The one before/after graph (the first shipped recipe through the default front end), a line
    per other recipe, and what the other capture front ends made of the first."""
    fronts = examples.frontends()
    default = sorted((ex for ex in exs if ex.frontend == fronts[0]), key=lambda ex: (ex.passes != [name], ex.name))
    lines = ["## Before and after", "",
             "The first shipped recipe that uses this pass, applied while this site was built to the `digits` "
             "demo architecture (timm ViT, 32 px images in 4 px patches: 64 patch tokens and a class token, "
             f"6 blocks, random weights, seed {examples.SEED}). `op: auto` rules were calibrated on 4 random images.",
             "", example_section(default[0], name), ""]
    if len(default) > 1:
        lines += ["Every shipped recipe with this pass, on the same model (GFLOPs (MACs) per image):", "",
                  "| recipe | GFLOPs (MACs) before | GFLOPs (MACs) after | fewer |", "|---|---:|---:|---:|"]
        lines += [f"| `recipes/{ex.name}.yaml` | {ex.flops_before / 1e9:.4f} | {ex.flops_after / 1e9:.4f} | "
                  f"{ex.flops_before / max(ex.flops_after, 1):.2f}x |" for ex in default]
        lines.append("")
    for frontend in fronts[1:]:
        for ex in exs:
            if ex.frontend != frontend or ex.name != default[0].name:
                continue
            if isinstance(ex, examples.FrontendFailure):
                lines += [f"Through the `{frontend}` capture front end (`--capture {frontend}`) this recipe fails "
                          "on the example model:", "", _md_block("text", f"error: {ex.error}"), ""]
            else:
                lines += [f"Through the `{frontend}` capture front end (`--capture {frontend}`) the same recipe "
                          f"inserts {len(ex.inserted)} nodes in `{ex.block}` "
                          f"(GFLOPs (MACs) {ex.flops_before / 1e9:.4f} → {ex.flops_after / 1e9:.4f}).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ image-generation page


def generation_stem(ex: examples.RecipeExample) -> str:
    """The generation page's SVG name: the recipe and the denoiser it is drawn on."""
    return f"{ex.name}.{ex.model}"


def generation_graphs(exs: list[examples.RecipeExample]) -> str:
    """The generation page's before/after graphs: each of ``examples.GENERATION_RECIPES`` on its demo
    generator's architecture, drawn as the pass pages draw theirs; without diffusers, what to install."""
    if not exs:
        return ("The graphs of this section are drawn while the site builds, from diffusers' own classes; "
                "this build had no diffusers, so they need the `diffusion` extra: "
                "`pip install -e '.[docs,diffusion]'`, then build again.\n")
    lines = []
    for ex in exs:
        how = ("torch.export, as `tokenopt.optimize` captures it (fx cannot trace a diffusers denoiser)"
               if ex.frontend == "export" else f"the `{ex.frontend}` front end")
        intro = (f"`recipes/{ex.name}.yaml` applied while this site was built to {examples.EXAMPLE_MODELS[ex.model]}, "
                 f"random weights (seed {examples.SEED}), captured by {how}; GFLOPs (MACs) are of one denoising "
                 "call of one image.")
        heading, _, body = example_section(ex, ex.passes[0], f"{GENERATION_DIR}/{generation_stem(ex)}").partition("\n\n")
        lines += [heading, "", intro, "", body, ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ everything


def _captured(docs_dir: Path) -> dict[str, str]:
    folder = docs_dir / CAPTURED_DIR
    return {p.stem: p.read_text() for p in sorted(folder.glob("*.txt"))} if folder.is_dir() else {}


def _supported_models(root: Path) -> str | None:
    """``tools/supported_models.py``'s ``markdown()``, when that tool exists."""
    path = root / "tools" / "supported_models.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("tokenopt_tools_supported_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown()


def generate(root: Path, docs_dir: Path | None = None) -> Generated:
    """Every generated page of the site for the repository at ``root``."""
    docs_dir = docs_dir or root / "docs"
    recipes_dir = root / "recipes"
    out = Generated()
    t = time.perf_counter()
    out.examples = examples.run_all(recipes_dir)
    out.timings["examples"] = time.perf_counter() - t
    runs = results.load(docs_dir)
    out.runs = runs
    reference = recipe_ref.collect(recipes_dir)
    for name in available_passes():
        out.pass_titles[name] = examples.pass_title(name)
        exs = [ex for ex in out.examples if name in ex.passes]
        # the recipes of this pass alone first: the page draws the first of them
        brief_exs = sorted((ex for ex in exs if ex.frontend == examples.frontends()[0]),
                           key=lambda ex: (ex.passes != [name], ex.name))
        if not exs:
            raise DocsBuildError(f"pass {name!r} has no shipped recipe in {recipes_dir}, so its page would have no "
                                 "generated graph. Add recipes/<name>-*.yaml.")
        for ex in exs:
            if isinstance(ex, examples.FrontendFailure):
                continue
            _check_example(ex)
        drawn = brief_exs[0]      # the page draws one recipe: the first through the default front end
        out.files[f"{GENERATED_DIR}/{svg_stem(drawn)}.before.svg"] = drawn.before_svg
        out.files[f"{GENERATED_DIR}/{svg_stem(drawn)}.after.svg"] = drawn.after_svg
        written = (docs_dir / "passes" / f"{name}.md").exists()      # a hand-written page cites the paper itself
        out.pass_sections[name] = "\n\n".join([pass_brief(name, brief_exs, not written), pass_graphs(name, exs),
                                                pass_measured(name, runs), pass_options(name, reference)])
        if not written:
            out.files[f"passes/{name}.md"] = f"# {out.pass_titles[name]}\n\n"    # the sections are added to it
    t = time.perf_counter()
    rendered = recipe_ref.render(reference, out.pass_titles)
    recipe_ref.check_reference(rendered)
    out.files["reference/recipes.md"] = rendered
    out.files["reference/cli.md"] = cli_ref.render()
    models = _supported_models(root)
    if models is not None:
        out.files["reference/supported-models.md"] = models
    out.timings["reference"] = time.perf_counter() - t
    t = time.perf_counter()
    out.generation = examples.run_generation(recipes_dir)
    for ex in out.generation:
        _check_example(ex)
        for which in ("before", "after"):
            out.files[f"{GENERATION_DIR}/{generation_stem(ex)}.{which}.svg"] = getattr(ex, f"{which}_svg")
    out.generation_section = generation_graphs(out.generation)
    out.timings["generation"] = time.perf_counter() - t
    t = time.perf_counter()
    out.files["getting-started.md"] = transcripts.getting_started(recipes_dir, _captured(docs_dir))
    out.files["troubleshooting.md"] = transcripts.troubleshooting(recipes_dir)
    out.timings["transcripts"] = time.perf_counter() - t
    return out


def extend_pass_page(markdown: str, section: str) -> str:
    """The hand-written page in the pass-page shape: its title and first paragraph (the citation),
    In brief (with the page's "When to use it" paragraph), Before and after, Measured, Options,
    then the rest of the page as "The method"."""
    when, markdown = _when_to_use(markdown)
    section = section.replace("<!-- when-to-use -->", when)
    lines = markdown.rstrip().splitlines()
    # after the H1 and the paragraph below it (the citation, on the hand-written pages)
    cut = 1
    while cut < len(lines) and not lines[cut].strip():
        cut += 1
    while cut < len(lines) and lines[cut].strip() and not lines[cut].startswith("#"):
        cut += 1
    head, rest = "\n".join(lines[:cut]), "\n".join(lines[cut:]).strip()
    return f"{head}\n\n{section}\n\n## The method\n\n{rest}\n"


PLACEHOLDERS = {
    "<!-- tradeoffs -->": "every measured run, one table each, linked to the results page",
    "<!-- runs -->": "every measured run with its date, command and rows",
    "<!-- generation-graphs -->": "the before/after graph of a UNet and a DiT transformer block",
}


def fill_placeholders(markdown: str, src_uri: str, generated: Generated) -> str:
    """A hand-written page's placeholders replaced by generated tables (``PLACEHOLDERS``)."""
    if "<!-- tradeoffs -->" in markdown:
        depth = src_uri.count("/")
        link = "../" * depth + "results/README.md"
        if src_uri == "results/README.md":
            link = ""
        markdown = markdown.replace("<!-- tradeoffs -->", "\n".join(results.table(generated.runs, None, link)))
    if "<!-- runs -->" in markdown:
        markdown = markdown.replace("<!-- runs -->", "\n".join(results.runs_section(generated.runs)))
    if "<!-- generation-graphs -->" in markdown:
        markdown = markdown.replace("<!-- generation-graphs -->", generated.generation_section)
    return markdown


def nav(nav_config: list, generated: Generated) -> list:
    """The configured nav with every registered pass under "Passes" and the supported-models page
    under "Reference" when it was generated."""
    out = []
    for item in nav_config:
        if isinstance(item, dict) and "Passes" in item:
            listed = {next(iter(e.values())) for e in item["Passes"] if isinstance(e, dict)}
            extra = [{generated.pass_titles.get(n, n): f"passes/{n}.md"} for n in available_passes()
                     if f"passes/{n}.md" not in listed]
            item = {"Passes": list(item["Passes"]) + extra}
        if isinstance(item, dict) and "Reference" in item and "reference/supported-models.md" in generated.files:
            entries = list(item["Reference"])
            if not any("reference/supported-models.md" in e.values() for e in entries if isinstance(e, dict)):
                entries.append({"Supported models": "reference/supported-models.md"})
            item = {"Reference": entries}
        out.append(item)
    return out
