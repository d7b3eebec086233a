"""The documentation site's generated parts (tokenopt.docsgen, graph_export.to_dot) and the site build.

The fast tests check each generator on its own; ``test_site_build`` (slow) runs ``mkdocs build
--strict`` and reads the built pages the way a reader gets them.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.fx
from pydantic import Field
from typer.testing import CliRunner

from tokenopt import graph_export
from tokenopt.cli import app
from tokenopt.docsgen import cli_ref, examples, recipe_ref, site
from tokenopt.passes import available_passes, get_pass
from tokenopt.record import record_of

ROOT = Path(__file__).resolve().parents[1]
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")


# ------------------------------------------------------------------------------ graph_export: DOT


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.drop = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Identity()

    def forward(self, x):
        h = self.a(x)
        return self.b(self.drop(h)) + h


def _node_attrs(dot: str, name: str) -> str:
    line = next(ln for ln in dot.splitlines() if ln.strip().startswith(f'"{name}" ['))
    return line


def test_dot_colours_inserted_nodes_by_pass_and_strikes_removed_ones():
    gm = torch.fx.symbolic_trace(_Tiny())
    names = [n.name for n in gm.graph.nodes]
    assert names == ["x", "a", "drop", "b", "add", "output"]
    dot = graph_export.to_dot(gm, highlight={"a", "add"}, labels={"a": "inserted by tome"},
                              groups={"a": "tome", "add": "tosa"}, colors={"tome": "#111111", "tosa": "#222222"},
                              removed={"drop"}, only=["drop", "b", "add"])
    assert 'fillcolor="#111111"' not in dot            # a is outside `only`: drawn as context, not filled
    assert _node_attrs(dot, "a").count("ellipse") == 1
    assert 'fillcolor="#222222"' in _node_attrs(dot, "add")
    drop = _node_attrs(dot, "drop")
    assert "<S>drop</S>" in drop and "dashed" in drop
    assert "<S>" not in _node_attrs(dot, "b") and "fillcolor" not in _node_attrs(dot, "b")
    edges = {ln.strip().rstrip(";") for ln in dot.splitlines() if "->" in ln}
    # every edge into the drawn nodes, once; edges out of removed nodes dashed
    assert edges == {'"a" -> "drop" [style=dashed]', '"drop" -> "b" [style=dashed]', '"b" -> "add"', '"a" -> "add"'}
    assert "x" not in {e.split('"')[1] for e in edges}   # x feeds only a, which is outside `only`


@needs_dot
def test_render_dot_draws_every_node_as_an_svg_group():
    gm = torch.fx.symbolic_trace(_Tiny())
    svg = graph_export.render_dot(graph_export.to_dot(gm, highlight={"b"}, groups={"b": "tome"},
                                                      colors={"tome": "#a5d8ff"}))
    titles = re.findall(r"<title>([^<]+)</title>", svg)
    assert set(titles) >= {"x", "a", "drop", "b", "add", "output"}
    # the highlighted box is filled with its pass's colour, the others are not
    b_group = svg.split("<title>b</title>")[1].split("</g>")[0]
    assert 'fill="#a5d8ff"' in b_group
    assert 'fill="#a5d8ff"' not in svg.split("<title>a</title>")[1].split("</g>")[0]


def test_render_dot_without_graphviz_says_how_to_install(monkeypatch):
    monkeypatch.setattr(graph_export.shutil, "which", lambda name: None)
    with pytest.raises(graph_export.GraphvizMissing, match="apt-get install graphviz"):
        graph_export.render_dot("digraph G { a }")


def test_mermaid_classes_follow_groups_and_removed():
    gm = torch.fx.symbolic_trace(_Tiny())
    out = graph_export.to_mermaid(gm, highlight={"add"}, groups={"add": "spa"}, colors={"spa": "#333333"},
                                  removed={"drop"}, only=["drop", "b", "add"])
    lines = out.splitlines()
    assert "    classDef g_spa fill:#333333,stroke:#343a40,stroke-width:2px" in lines
    assert "    class n_add g_spa" in lines
    assert "    class n_drop removed" in lines
    assert "    class n_a context" in lines
    assert 'n_drop["<s>drop</s><br/><i>Identity · removed</i>"]' in out


def test_node_span_is_one_block():
    gm = torch.fx.symbolic_trace(_Tiny())
    assert graph_export.node_span(gm, "a", "add") == ["drop", "b", "add"]
    with pytest.raises(KeyError):
        graph_export.node_span(gm, "a", "nope")


# ------------------------------------------------------------------------------ pass examples


def _one_recipe_per_pass() -> dict[str, Path]:
    """A shipped recipe for each pass, one that needs no calibration run where there is one (faster)."""
    from tokenopt.recipe import load_recipe

    def calibrates(path: Path) -> bool:
        return any(get_pass(r.pass_name)().needs_calibration(r.options) for r in load_recipe(path).rules)

    out = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml"), key=lambda p: (calibrates(p), p.name)):
        for name in examples.recipe_passes(path.read_text()):
            out.setdefault(name, path)
    return out


def _inserted_by_pass_in_block(recipe: Path, block: str, pass_name: str) -> set[str]:
    """Reference for the drawn block: optimize the same model again, and list the nodes of
    ``block`` that ``pass_name`` inserted (from the pipeline's own record, not the generator's)."""
    import tokenopt
    model = examples.build_model()
    x = examples._example_batch(model)
    with pytest.warns() if False else _nowarn():
        gm = tokenopt.optimize(model, recipe, x, calibration=examples._example_batch(model, 4))
    b = next(b for b in record_of(gm).analysis.blocks if b.path == block)
    span = set(graph_export.node_span(gm, b.input, b.output))
    return {n for n, p in record_of(gm).inserted_by.items() if p == pass_name and n in span}


def _nowarn():
    import warnings
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")

    class _Exit:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            ctx.__exit__(*a)
    return _Exit()


@needs_dot
@pytest.mark.parametrize("pass_name", available_passes())
def test_example_svg_shows_the_nodes_its_pass_inserted(pass_name, tmp_path):
    recipe = _one_recipe_per_pass()[pass_name]
    ex = examples.run_recipe(recipe, tmp_path)
    expected = _inserted_by_pass_in_block(recipe, ex.block, pass_name)
    assert expected, f"{recipe.name} inserts nothing in {ex.block}"
    assert all(by for *_, by in ex.inserted), f"inserted nodes with no pass: {ex.inserted}"
    colour = examples.pass_colors()[pass_name]
    for node in expected:
        group = ex.after_svg.split(f"<title>{node}</title>")
        assert len(group) == 2, f"{node} missing from the after SVG of {recipe.name}"
        assert f'fill="{colour}"' in group[1].split("</g>")[0], f"{node} is not filled with {pass_name}'s colour"
    # the before graph is the original: no new node (a wrapped node keeps its name, ToSA's restore),
    # and the struck ones are really gone
    from tokenopt.trace import trace
    original = {n.name for n in trace(examples.build_model()).graph.nodes}
    new = expected - original
    assert new and not any(f"<title>{n}</title>" in ex.before_svg for n in new)
    for node, _why in ex.removed:
        assert f"<title>{node}</title>" in ex.before_svg and f"<title>{node}</title>" not in ex.after_svg
    assert "| layer | block | tokens in → out |" in ex.report and "**total**" in ex.report and f"artifact {recipe.stem}.tokenopt.pt" in ex.inspect


@needs_dot
def test_generation_page_draws_a_unet_transformer_block(tmp_path):
    """docs/generation.md's placeholder becomes recipes/tomesd-50.yaml on the demo UNet: the after SVG
    and the Mermaid block hold the merge and unmerge nodes ToMe inserted in the drawn block (from a
    separate optimize of the same model), the before SVG holds none of them."""
    pytest.importorskip("diffusers")
    import tokenopt
    recipe = ROOT / "recipes" / "tomesd-50.yaml"
    ex = examples.run_recipe(recipe, tmp_path, "auto", inspect=False, model="unet")
    assert (ex.model, ex.frontend, ex.passes) == ("unet", "export", ["tome"])
    gen = site.Generated(generation=[ex], generation_section=site.generation_graphs([ex]))
    page = site.fill_placeholders((ROOT / "docs" / "generation.md").read_text(), "generation.md", gen)
    assert "<!-- generation-graphs -->" not in page
    assert "(generation/generated/tomesd-50.unet.after.svg)" in page
    assert "(generation/generated/tomesd-50.unet.before.svg)" in page
    # reference: the nodes ToMe inserted in that block, from the pipeline's own record
    model = examples.build_model("unet")
    with _nowarn():
        gm = tokenopt.optimize(model, recipe, examples._example_batch(model))
    b = next(b for b in record_of(gm).analysis.blocks if b.path == ex.block)
    span = set(graph_export.node_span(gm, b.input, b.output))
    labels = dict(record_of(gm).inserted)
    expected = {n for n, p in record_of(gm).inserted_by.items() if p == "tome" and n in span}
    assert any(labels[n] == "merge before self_attention" for n in expected), labels
    assert any(labels[n] == "unmerge self_attention output" for n in expected), labels
    mermaid = page.split("```mermaid", 1)[1].split("```", 1)[0]
    for node in expected:
        assert f"<title>{node}</title>" in ex.after_svg and f"n_{node}[" in mermaid and f"| `{node}` |" in page
    # the before graph is the original: an inserted node whose name the original lacks is not in it
    # (ToMe's unmerge may take a name the original also has, for a node of its own)
    original = {n.name for n in examples._original_graph(examples.build_model("unet"), examples._example_batch(model),
                                                         "export").graph.nodes}
    new = expected - original
    assert new and not any(f"<title>{n}</title>" in ex.before_svg for n in new)
    assert ex.flops_after < ex.flops_before


def test_generation_page_without_diffusers_says_which_extra(monkeypatch):
    monkeypatch.setattr(examples, "diffusion_installed", lambda: False)
    assert examples.run_generation(ROOT / "recipes") == []
    text = site.generation_graphs([])
    assert "`diffusion` extra" in text and "pip install -e '.[docs,diffusion]'" in text and "<svg" not in text


def test_tradeoff_tables_come_from_the_runs_file(tmp_path):
    """Pass pages, Which method? and the results page all render docs/results/tradeoffs.yaml: a
    pass's table holds its rows and each run's original, with the drop computed from ``vs``."""
    from tokenopt.docsgen import results
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tradeoffs.yaml").write_text(
        "runs:\n  a:\n    date: 2026-01-02\n    model: m (64 tokens)\n    command: bench a\n    rows:\n"
        "      - {method: original, gflops: 1.0, top1: 80.0}\n"
        "      - {method: ToMe, setting: r=2, training: none, gflops: 0.5, top1: 77.5, vs: 80.0, speedup: 1.8x}\n"
        "      - {method: ToSA, setting: keep 0.5, training: selectors, gflops: 0.6, top1: 79.0, drop: -1.2}\n"
        "  b:\n    date: 2026-01-03\n    model: n\n    command: bench b\n    rows:\n"
        "      - {method: original, gflops: 2.0}\n      - {method: ToSA, gflops: 1.0, speedup: 1.5x}\n")
    runs = results.load(tmp_path)
    assert [r.key for r in runs] == ["a", "b"] and runs[0].rows[1].drop == -2.5
    tome = results.table(runs, ["ToMe"], "../results/README.md")
    assert tome[0] == "*2026-01-02, m* ([the run](../results/README.md#run-a))"
    assert tome[4].startswith("| method | setting | training | GFLOPs (MACs) per image |")
    assert tome[6:8] == ["| original | — |  | 1.00 | 80.0 | — | — |", "| ToMe | r=2 | none | 0.5000 | 77.5 | -2.5 | 1.8x |"]
    assert len(tome) == 11 and tome[-2:] == ["</div>", ""]     # run b has no ToMe row: no table for it
    tosa = results.table(runs, ["ToSA"], "x.md")
    assert "| ToSA | keep 0.5 | selectors | 0.6000 | 79.0 | -1.2 | — |" in tosa and "| ToSA | — |  | 1.00 | — | — | 1.5x |" in tosa
    assert "### 2026-01-03: n { #run-b }" in results.runs_section(runs)


def test_every_run_has_its_section_on_the_results_page():
    from tokenopt.docsgen import results
    page = (ROOT / "docs" / "results" / "README.md").read_text()
    runs = results.load(ROOT / "docs")
    titles = {examples.pass_title(n) for n in available_passes()}
    assert runs and {r.method for run in runs for r in run.rows} <= titles | {"original"}
    for run in runs:
        assert f"{{ #{run.anchor} }}" in page, f"docs/results/README.md has no section for run {run.key}"
    assert "<!-- tradeoffs -->" in page and "<!-- tradeoffs -->" in (ROOT / "docs" / "which-method.md").read_text()


def test_pass_page_shape():
    """A hand-written pass page gets the one shape: In brief (with its When-to-use paragraph), Before
    and after, Measured, Options, then the page's own text as The method."""
    page = "# ToX\n\nA paper, 2024.\n\n**When to use it.** Often.\n\nHow it works.\n\n## Details\n\nMore."
    section = "## In brief\n\nWhat.\n\n<!-- when-to-use -->\n\n## Before and after\n\nG\n\n## Measured\n\nT\n\n## Options\n\nO"
    out = site.extend_pass_page(page, section)
    heads = [line for line in out.splitlines() if line.startswith("#")]
    assert heads == ["# ToX", "## In brief", "## Before and after", "## Measured", "## Options", "## The method",
                     "## Details"]
    brief = out.split("## In brief")[1].split("## Before and after")[0]
    assert "**When to use it.** Often." in brief and out.count("When to use it") == 1
    assert out.split("## The method")[1].lstrip().startswith("How it works.")


def test_pass_sketch_turns_literal_blocks_into_fences():
    text = examples.pass_sketch("tome")
    assert "```text\nh = x + attn(norm1(x))\ny = h + mlp(norm2(h))\n```" in text
    assert "::" not in text


def test_a_newly_registered_pass_gets_a_nav_entry(monkeypatch):
    from tokenopt.passes import base
    monkeypatch.setitem(base._REGISTRY, "zz", type("ZZ", (base.Pass,), {}))
    gen = site.Generated(pass_titles={"zz": "ZZ"})
    nav = site.nav([{"Home": "index.md"}, {"Passes": [{"ToMe": "passes/tome.md"}]}], gen)
    passes = nav[1]["Passes"]
    assert {"ZZ": "passes/zz.md"} in passes and passes[0] == {"ToMe": "passes/tome.md"}
    assert sum("passes/tome.md" in e.values() for e in passes) == 1


# ------------------------------------------------------------------------------ recipe reference


@pytest.fixture(scope="module")
def reference() -> str:
    return recipe_ref.render(recipe_ref.collect(ROOT / "recipes"))


def test_reference_lists_every_schema_key(reference):
    recipe_ref.check_reference(reference)
    for name in available_passes():
        for key in get_pass(name).Options.model_fields:
            assert f"| `{key}` |" in reference


def test_reference_check_fails_when_the_schema_gains_a_key(reference, monkeypatch):
    tome = get_pass("tome")

    class Extended(tome.Options):
        extra_knob: int = Field(3, description="a key added after the reference was rendered")

    monkeypatch.setattr(tome, "Options", Extended)
    with pytest.raises(AssertionError, match=r"tome: extra_knob"):
        recipe_ref.check_reference(reference)
    # rendering again from the schema picks it up, error included
    fresh = recipe_ref.render(recipe_ref.collect(ROOT / "recipes"))
    recipe_ref.check_reference(fresh)
    assert "option 'extra_knob' = -1: input should be a valid integer" not in fresh     # -1 is a valid int
    assert "extra_knob: nonsense" in fresh and "option 'extra_knob' = 'nonsense'" in fresh


def test_reference_errors_are_what_the_loader_says(tmp_path, monkeypatch):
    """The quoted error for ToSA's selector.kernel, against loading that recipe by hand."""
    content = recipe_ref.collect(ROOT / "recipes")
    kernel = next(d for d in content["tosa"] if d.path == "selector.kernel")
    assert kernel.bad_value == -1
    (tmp_path / "recipe.yaml").write_text("version: 1\nrules:\n- pass: tosa\n  layers: second-half\n  keep: 0.5\n"
                                          "  bypass: block\n  selector: {input: pooled, hidden: 32, kernel: -1}\n")
    monkeypatch.chdir(tmp_path)
    from tokenopt.errors import RecipeError
    from tokenopt.recipe import load_recipe
    with pytest.raises(RecipeError) as e:
        load_recipe(Path("recipe.yaml"))
    assert kernel.error == str(e.value)
    assert "greater than or equal to 1 (at kernel)" in kernel.error


# ------------------------------------------------------------------------------ CLI reference


def test_cli_reference_lists_every_verb_and_option():
    text = cli_ref.render()
    help_ = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    verbs = re.findall(r"^│ (\w+)\s{2,}", help_, flags=re.M)
    assert set(verbs) >= {"apply", "validate", "inspect", "eval", "probe", "demo", "train"}
    for verb in verbs:
        assert f"## `tokenopt {verb}`" in text
        section = text.split(f"## `tokenopt {verb}`")[1].split("\n## ")[0]
        out = CliRunner().invoke(app, [verb, "--help"], env={"COLUMNS": "200"}).output
        options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out)) - {"--help"}
        assert options, verb
        missing = [o for o in options if o not in section]
        assert not missing, f"{verb}: {missing}"


# ------------------------------------------------------------------------------ the site


def _built_page(site_dir: Path, page: str) -> Path:
    """``page.html`` (the offline plugin turns directory URLs off), else ``page/index.html``."""
    flat = site_dir / f"{page}.html"
    return flat if flat.exists() else site_dir / page / "index.html"


@pytest.mark.slow
@needs_dot
def test_site_build(tmp_path):
    """mkdocs build --strict: every pass page embeds SVGs written by this build, holding the
    nodes its pass inserted; the references and transcripts are there."""
    start = time.time()
    out = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in available_passes():
        page = _built_page(out, f"passes/{name}").read_text()
        svgs = sorted(set(re.findall(r'src="(?:\.\./)?generated/([\w.-]+\.after\.svg)"', page)))
        assert svgs, f"the {name} page embeds no generated SVG"
        for svg_name in svgs:
            svg = out / "passes" / "generated" / svg_name
            assert svg.stat().st_mtime >= start - 1, f"{svg_name} was not written by this build"
        first = svgs[0].removesuffix(".after.svg")
        block = re.search(rf'id="{re.escape(first)}".*?Block drawn: <code>([\w.]+)</code>', page, flags=re.S).group(1)
        expected = _inserted_by_pass_in_block(ROOT / "recipes" / f"{first}.yaml", block, name)
        text = (out / "passes" / "generated" / svgs[0]).read_text()
        assert expected and all(f"<title>{n}</title>" in text for n in expected)
    for page in ("reference/recipes", "reference/cli", "reference/api", "getting-started", "troubleshooting",
                 "which-method"):
        assert _built_page(out, page).exists(), page
    trouble = _built_page(out, "troubleshooting").read_text()
    assert "cannot trace GatedViT with torch.fx" in trouble and "refused: relative-position bias" in trouble
    generation = _built_page(out, "generation").read_text()
    if importlib.util.find_spec("diffusers") is None:
        assert "`diffusion` extra" in generation or "<code>diffusion</code> extra" in generation
    else:      # the UNet block drawn by this build, with ToMe's merge in it
        svg = out / "generation" / "generated" / "tomesd-50.unet.after.svg"
        assert re.search(r'src="(?:\.\./)?generation/generated/tomesd-50\.unet\.after\.svg"', generation)
        assert svg.stat().st_mtime >= start - 1 and "<title>merge_tokens</title>" in svg.read_text()


# ------------------------------------------------------------------------------ the build's own tokenopt

HOOK = ROOT / "docs" / "hooks" / "generate.py"


def test_docs_build_documents_this_checkout_not_an_installed_copy(tmp_path):
    """MkDocs loads the hook with the hook's folder on sys.path and then restores sys.path, so a
    tokenopt installed elsewhere (here a decoy, imported before the build starts) would be the one
    the generated pages describe unless the hook puts the checkout first when the build starts."""
    decoy = tmp_path / "site-packages" / "tokenopt"
    (decoy / "docsgen").mkdir(parents=True)
    (decoy / "__init__.py").write_text("DECOY = True\n")
    (decoy / "docsgen" / "__init__.py").write_text("DECOY = True\n")
    script = "\n".join([
        "import sys",
        f"sys.path.insert(0, {str(decoy.parent)!r})",
        "import tokenopt",
        "assert getattr(tokenopt, 'DECOY', False), tokenopt.__file__",
        "from mkdocs.config import config_options",
        f"hook = config_options.Hooks('plugins')._load_hook('tokenopt_docs_hook', {str(HOOK)!r})",
        "hook.checkout_tokenopt()       # what on_config does first",
        "import tokenopt.docsgen",
        "print(tokenopt.__file__)",
        "print(tokenopt.docsgen.__file__)",
    ])
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(ROOT / "tokenopt" / "__init__.py"), str(ROOT / "tokenopt" / "docsgen" / "__init__.py")]


def test_every_verb_is_on_the_command_line_page_and_home():
    """The hand-written overview (docs/cli.md's table, the Home page's list) names every verb the app has."""
    cli_page = (ROOT / "docs" / "cli.md").read_text()
    table = [line for line in cli_page.splitlines() if line.startswith("| `tokenopt ")]
    home = (ROOT / "docs" / "index.md").read_text()
    home_line = next(line for line in home.splitlines() if line.startswith("* [Command line](cli.md)"))
    for verb in cli_ref.verbs():
        assert any(line.startswith(f"| `tokenopt {verb} ") or line.startswith(f"| `tokenopt {verb}`")
                   for line in table), f"docs/cli.md has no row for `tokenopt {verb}`"
        assert f"`{verb}`" in home_line, f"docs/index.md does not list `{verb}`"
    assert "\\|" not in cli_page, "a `\\|` inside a code span shows the backslash"


def test_reference_text_survives_attr_list(reference):
    """attr_list reads a trailing ``{...}`` in a cell as attributes and drops it: ToMe's r
    description ends in ``{start, end}``, which must reach the page."""
    import markdown
    html = markdown.markdown(reference, extensions=["tables", "attr_list", "md_in_html"])
    row = next(line for line in html.splitlines() if "tokens merged per layer" in line)
    assert "a per-layer list, or {start, end}" in row.replace("&#123;", "{").replace("&#125;", "}")


def test_untraceable_model_prints_only_tokenopts_message(tmp_path, monkeypatch, capfd):
    """Troubleshooting's first case: torch.export dumps its partial graph (twice) and logs a warning
    when it cannot capture a model; the user gets tokenopt's message alone."""
    import textwrap

    from tokenopt.docsgen import transcripts
    (tmp_path / "my_vits.py").write_text(textwrap.dedent(transcripts._UNTRACEABLE).lstrip())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(app, ["inspect", "my_vits:GatedViT", "--input-size", "3,32,32"])
    captured = capfd.readouterr()
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error: cannot trace GatedViT with torch.fx: TraceError")
    assert len(lines) == 2 and lines[1].startswith("  torch.export failed too: cannot capture GatedViT")
    assert "def forward" not in captured.err + captured.out and "symbolic_shapes" not in captured.err


# ------------------------------------------------------------------------------ the API page

API_PAGE = ROOT / "docs" / "reference" / "api.md"
TRAINING_ENTRY_POINTS = ["tokenopt.train.selector.train_selectors", "tokenopt.train.selector.finetune",
                         "tokenopt.train.gate.train_gates"]
SPHINX_ROLE = re.compile(r":(?:func|meth|class|mod|attr|data|obj):`")


def _api_page_objects(text: str) -> dict[str, object]:
    """What each ``::: identifier`` of the API page names, imported."""
    import importlib
    out = {}
    for ident in re.findall(r"^::: ([\w.]+)\s*$", text, flags=re.M):
        module, _, attr = ident.rpartition(".")
        try:
            out[ident] = importlib.import_module(ident)
        except ImportError:
            out[ident] = getattr(importlib.import_module(module), attr)
    return out


def _missing_from_api_page(text: str) -> list[str]:
    import tokenopt
    shown = _api_page_objects(text)
    missing = [f"tokenopt.{name}" for name in tokenopt.__all__
               if f"tokenopt.{name}" not in shown and not any(obj is getattr(tokenopt, name) for obj in shown.values())]
    return missing + [e for e in TRAINING_ENTRY_POINTS if e not in shown]


def test_api_page_documents_every_public_name():
    assert _missing_from_api_page(API_PAGE.read_text()) == []


def test_api_page_check_notices_a_removed_name():
    text = API_PAGE.read_text()
    assert _missing_from_api_page(text.replace("::: tokenopt.record_of\n", "")) == ["tokenopt.record_of"]
    assert _missing_from_api_page(text.replace("::: tokenopt.train.gate.train_gates\n", "")) == \
        ["tokenopt.train.gate.train_gates"]


def test_api_page_docstrings_have_no_sphinx_roles():
    """The page renders Google-style docstrings: a Sphinx role (:func:`x`) would show as raw text."""
    import inspect
    found = []
    for ident, obj in _api_page_objects(API_PAGE.read_text()).items():
        docs = [(ident, inspect.getdoc(obj) or "")]
        if inspect.isclass(obj) or inspect.ismodule(obj):
            docs += [(f"{ident}.{n}", inspect.getdoc(m) or "") for n, m in vars(obj).items()
                     if not n.startswith("_") and (inspect.isfunction(m) or isinstance(m, property))]
        found += [name for name, doc in docs if SPHINX_ROLE.search(doc)]
    assert found == []
