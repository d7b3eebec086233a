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

from tokenopt.docsgen import cli_ref, examples, recipe_ref, transcripts
from tokenopt.passes import available_passes

GENERATED_DIR = "passes/generated"      # SVGs of the pass pages, relative to the docs folder
CAPTURED_DIR = "hooks/captured"         # real runs too slow for the build, relative to the docs folder


class DocsBuildError(RuntimeError):
    """The generated documentation is incomplete; the message says what is missing."""


@dataclass
class Generated:
    files: dict[str, str] = field(default_factory=dict)           # docs-relative path -> content
    pass_sections: dict[str, str] = field(default_factory=dict)   # pass -> markdown for its page
    pass_titles: dict[str, str] = field(default_factory=dict)
    examples: list = field(default_factory=list)     # RecipeExample, or FrontendFailure (other front ends)
    timings: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------ benchmark rows


def benchmark_rows(results_md: str, pass_name: str) -> list[str]:
    """Markdown tables of ``docs/results``: for each table with a row naming ``pass_name`` (its
    first cell starts with the name), the section title, the header, the ``original`` row and
    the pass's rows."""
    out: list[str] = []
    heading = ""
    lines = results_md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s\-:|]+\|$", lines[i + 1]):
            header, sep = line, lines[i + 1]
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(lines[j])
                j += 1
            first = [r.split("|")[1].strip().lower() for r in rows]
            mine = [r for r, f in zip(rows, first) if f == pass_name or f.startswith(pass_name + " ")]
            if mine:
                base = [r for r, f in zip(rows, first) if f == "original"]
                out += [f"*{heading}*", "", header, sep, *base, *mine, ""]
            i = j
            continue
        i += 1
    return out


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


def example_section(ex: examples.RecipeExample, pass_name: str) -> str:
    svg_base = f"generated/{svg_stem(ex)}"
    gf = lambda n: f"{n / 1e9:.4f}"  # noqa: E731
    others = [p for p in ex.passes if p != pass_name]
    default = ex.frontend == examples.frontends()[0]
    lines = [f"### `{ex.name}`" if default else f"### `{ex.name}` through the `{ex.frontend}` front end", ""]
    if ex.comment:
        lines += [ex.comment, ""]
    lines += [f"Block drawn: `{ex.block}` (where this recipe inserts most). GFLOPs per image "
              f"{gf(ex.flops_before)} → {gf(ex.flops_after)} "
              f"({ex.flops_before / max(ex.flops_after, 1):.2f}x fewer)"
              + (f", of which the selectors {ex.selector_flops / 1e6:.3f} MFLOPs" if ex.selector_flops else "")
              + (f"; this recipe also runs {', '.join(others)}" if others else "") + ".", ""]
    for title, which in (("After", "after"), ("Before", "before")):
        src = f"{svg_base}.{which}.svg"
        lines += [f'=== "{title}: {ex.block}"', "",
                  f"    [![{ex.block} {which} {ex.name}]({src})]({src})", ""]
    lines += ["Inserted in this block:", "", "| node | op | what it is | pass |", "|---|---|---|---|"]
    for node, op, label, by in ex.inserted:
        lines.append(f"| `{node}` | `{op}` | {label.replace('|', '/')} | {by or '(outputs)'} |")
    lines.append("")
    if ex.removed:
        by_reason: dict[str, list[str]] = {}
        for n, why in ex.removed:
            by_reason.setdefault(why, []).append(f"`{n}`")
        lines += ["Removed from this block: " + "; ".join(f"{why}: {', '.join(ns)}" for why, ns in by_reason.items())
                  + ".", ""]
    tabs = [("Report", "\n".join("    " + line if line else "" for line in ex.report.splitlines())),
            *([("tokenopt inspect", _md_block("text", f"$ tokenopt inspect {ex.name}.tokenopt.pt\n{ex.inspect}",
                                              "    "))] if ex.inspect else []),
            ("Mermaid (after)", _md_block("mermaid", ex.after_mermaid, "    ")),
            ("Mermaid (before)", _md_block("mermaid", ex.before_mermaid, "    ")),
            ("Recipe", _md_block("yaml", ex.text, "    "))]
    for title, body in tabs:
        lines += [f'=== "{title}"', "", body, ""]
    return "\n".join(lines)


def pass_brief(name: str, exs: list[examples.RecipeExample], results_md: str, with_citation: bool = True) -> str:
    colors = examples.pass_colors()
    inserted = [(op, label) for ex in exs[:1] for node, op, label, by in ex.inserted if by == name]
    lines = ["## In brief", ""]
    if with_citation:
        lines += [f"**Method.** {examples.pass_citation(name)}", ""]
    lines += [
             f"**Recipe keys.** `pass: {name}` and its options, each with type, default and error: "
             f"[recipe reference](../reference/recipes.md#{name}-options).", "",
             "**What it matches and what it inserts.** From the pass's source (`"
             f"{examples.get_pass(name).__module__}`):", "",
             examples.pass_sketch(name), "",
             f"In the graphs below, the nodes this pass inserts are filled "
             f'<span style="background:{colors[name]};padding:0 .4em;border:1px solid #343a40">like this</span>; '
             "nodes the rewrite removed are dashed and struck through. Inserted in one block of the "
             f"example model by `{exs[0].name}`:", "",
             "| op | what it is |", "|---|---|",
             *[f"| `{op}` | {label.replace('|', '/')} |" for op, label in inserted], "",
             "**What it costs.** On the example model (GFLOPs per image, from the report):", "",
             "| recipe | GFLOPs before | GFLOPs after | ratio | selector MFLOPs |", "|---|---|---|---|---|",
             *[f"| [`{ex.name}`](#{ex.name.replace('.', '')}) | {ex.flops_before / 1e9:.4f} | "
               f"{ex.flops_after / 1e9:.4f} | {ex.flops_before / max(ex.flops_after, 1):.2f}x | "
               f"{ex.selector_flops / 1e6:.3f} |" for ex in exs], ""]
    bench = benchmark_rows(results_md, name)
    if bench:
        lines += ["**Measured** ([all results](../results/README.md)):", "", *bench]
    return "\n".join(lines)


def pass_graphs(name: str, exs: list[examples.RecipeExample]) -> str:
    lines = ["## Graphs from this build", "",
             "Each shipped recipe that uses this pass, applied while this site was built to the `digits` demo "
             "architecture (timm ViT, 32 px images in 4 px patches: 64 patch tokens and a class token, 6 blocks, "
             f"random weights, seed {examples.SEED}): the block where it inserts most, before and after (Graphviz), "
             "then the per-layer report, what `tokenopt inspect` prints for the saved model, the same block "
             "as Mermaid, and the recipe. `op: auto` rules were calibrated on 4 random images.", ""]
    fronts = examples.frontends()
    for ex in exs:
        if ex.frontend == fronts[0]:
            lines += [example_section(ex, name), ""]
    for frontend in fronts[1:]:
        mine = [ex for ex in exs if ex.frontend == frontend]
        if mine:
            lines += [f"### Through the `{frontend}` front end", "",
                      f"The same rewrite on the graph the `{frontend}` capture front end makes of the same model "
                      f"(`tokenopt apply ... --capture {frontend}`; see [How it works](../architecture.md)).", ""]
            for ex in mine:
                if isinstance(ex, examples.FrontendFailure):
                    lines += [f"#### `{ex.name}` through the `{frontend}` front end", "",
                              f"This front end could not apply `{ex.name}` to the example model:", "",
                              _md_block("text", f"error: {ex.error}"), ""]
                else:
                    lines += [example_section(ex, name).replace("### ", "#### ", 1), ""]
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
    results_md = (docs_dir / "results" / "README.md").read_text() if (docs_dir / "results" / "README.md").exists() else ""
    for name in available_passes():
        out.pass_titles[name] = examples.pass_title(name)
        exs = [ex for ex in out.examples if name in ex.passes]
        brief_exs = [ex for ex in exs if ex.frontend == examples.frontends()[0]]
        if not exs:
            raise DocsBuildError(f"pass {name!r} has no shipped recipe in {recipes_dir}, so its page would have no "
                                 "generated graph. Add recipes/<name>-*.yaml.")
        for ex in exs:
            if isinstance(ex, examples.FrontendFailure):
                continue
            _check_example(ex)
            out.files[f"{GENERATED_DIR}/{svg_stem(ex)}.before.svg"] = ex.before_svg
            out.files[f"{GENERATED_DIR}/{svg_stem(ex)}.after.svg"] = ex.after_svg
        written = (docs_dir / "passes" / f"{name}.md").exists()      # a hand-written page cites the paper itself
        out.pass_sections[name] = pass_brief(name, brief_exs, results_md, not written) + "\n\n" + \
            pass_graphs(name, exs)
        if not written:
            out.files[f"passes/{name}.md"] = f"# {out.pass_titles[name]}\n\n"    # the sections are added to it
    t = time.perf_counter()
    reference = recipe_ref.render(recipe_ref.collect(recipes_dir), out.pass_titles)
    recipe_ref.check_reference(reference)
    out.files["reference/recipes.md"] = reference
    out.files["reference/cli.md"] = cli_ref.render()
    models = _supported_models(root)
    if models is not None:
        out.files["reference/supported-models.md"] = models
    out.timings["reference"] = time.perf_counter() - t
    t = time.perf_counter()
    out.files["getting-started.md"] = transcripts.getting_started(recipes_dir, _captured(docs_dir))
    out.files["troubleshooting.md"] = transcripts.troubleshooting(recipes_dir)
    out.timings["transcripts"] = time.perf_counter() - t
    return out


def extend_pass_page(markdown: str, section: str) -> str:
    """The hand-written page with the generated parts: "In brief" after the title and its first
    paragraph, the graphs at the end."""
    brief, _, graphs = section.partition("\n\n## Graphs from this build")
    lines = markdown.rstrip().splitlines()
    # after the H1 and the paragraph below it (the citation, on the hand-written pages)
    cut = 1
    while cut < len(lines) and not lines[cut].strip():
        cut += 1
    while cut < len(lines) and lines[cut].strip() and not lines[cut].startswith("#"):
        cut += 1
    head, rest = "\n".join(lines[:cut]), "\n".join(lines[cut:])
    return f"{head}\n\n{brief}\n\n## The method\n{rest}\n\n## Graphs from this build{graphs}\n"


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
