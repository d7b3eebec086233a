"""Imports point one way: every module imports, no module takes part in an import circle, and no
layer imports one above it (DESIGN.md, "Layers, and which way imports point").

The graph is read from the source (``ast``), so it holds every ``import`` of a ``tokenopt`` module,
at module level and inside functions alike: a late import hides a circle from Python but not from
this test. ``from tokenopt.x import y`` points at the submodule ``tokenopt.x.y`` when there is one,
else at ``tokenopt.x``; relative imports are resolved. The parent packages that Python runs before
a submodule are not edges: ``tokenopt.cli.apply`` importing ``tokenopt.cli.common`` does not make it
import ``tokenopt.cli``.
"""
from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
from pathlib import Path


import tokenopt

# Bottom first. A module may import its own layer and any layer of a lower rank; layers that share a
# rank sit beside each other and import neither way. A name matches itself and its submodules
# (the root package ``tokenopt`` matches only itself).
LAYERS: list[tuple[int, str, tuple[str, ...]]] = [
    (0, "base", ("tokenopt.errors", "tokenopt.version", "tokenopt.paths", "tokenopt.distributed", "tokenopt.tokens",
                 "tokenopt.trace", "tokenopt.cleanup", "tokenopt.timing", "tokenopt.graph_export",
                 "tokenopt.graph_style", "tokenopt.model_outputs", "tokenopt.ownership", "tokenopt.record")),
    (1, "ops", ("tokenopt.ops",)),
    (1, "load", ("tokenopt.sources", "tokenopt.files", "tokenopt.demo_specs", "tokenopt.demo_shipped",
                 "tokenopt.generation.schedule")),    # models from specs and files; never trains
    (1, "data", ("tokenopt.data", "tokenopt.generation.data")),
    (2, "analysis", ("tokenopt.analysis", "tokenopt.subgraph", "tokenopt.flops")),   # flops: counts a graph
    (3, "rewrite", ("tokenopt.rewrite",)),
    (4, "passes", ("tokenopt.passes",)),
    (5, "plan", ("tokenopt.recipe", "tokenopt.plan", "tokenopt.report")),   # report: a plan with measured FLOPs
    (6, "pipeline", ("tokenopt.pipeline", "tokenopt.artifact", "tokenopt.evaluation", "tokenopt.deploy",
                     "tokenopt.check", "tokenopt.calling", "tokenopt.generation.fid",
                     "tokenopt.generation.quality", "tokenopt.feature_maps", "tokenopt.probe")),   # all run or compare what the pipeline made
    (6, "train", ("tokenopt.train", "tokenopt.demo", "tokenopt.generation", "tokenopt.generation.train")),   # the demo models' training
    (7, "demo", ("tokenopt.demo_methods", "tokenopt.demo_package", "tokenopt.generation.package")),   # the demo's trained methods: pipeline + train
    (7, "tune", ("tokenopt.tuning",)),     # searches recipes: builds, times and judges what the pipeline makes
    (8, "entry", ("tokenopt.cli", "tokenopt.__main__", "tokenopt")),   # the command line and the library facade
    (9, "docs", ("tokenopt.docsgen",)),     # the documentation site's generated pages: runs the app and the pipeline
]

PACKAGE_DIR = Path(tokenopt.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: name -> (source file, is a package)."""
    found = {"tokenopt": (PACKAGE_DIR / "__init__.py", True)}
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="tokenopt."):
        rel = Path(*info.name.split(".")[1:])
        found[info.name] = (PACKAGE_DIR / rel / "__init__.py", True) if info.ispkg else \
            (PACKAGE_DIR / rel.with_suffix(".py"), False)
    return found


MODULES = _modules()


def _import_statements(name: str) -> list[tuple[str, tuple[str, ...], int]]:
    """``(module, names, line)`` of every import in ``name``'s source, relative ones resolved; names is
    empty for ``import x``."""
    source, is_package = MODULES[name]
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            found += [(a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{mod}" if mod else base
            found.append((mod, tuple(a.name for a in node.names), node.lineno))
    return found


def _is_ours(module: str) -> bool:
    return module == "tokenopt" or module.startswith("tokenopt.")


def _imports(name: str, known: set[str]) -> set[str]:
    """The tokenopt modules that ``name`` imports anywhere in its source."""
    out = set()
    for mod, names, _ in _import_statements(name):
        if not _is_ours(mod):
            continue
        if not names:
            out.add(_known_prefix(mod, known))
        for n in names:   # `from tokenopt.x import y` where y is a module is an import of that module
            out.add(f"{mod}.{n}" if f"{mod}.{n}" in known else _known_prefix(mod, known))
    out.discard(None)
    out.discard(name)
    return out


def _known_prefix(dotted: str, known: set[str]) -> str | None:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


@functools.lru_cache(maxsize=None)
def _read_graph() -> dict[str, frozenset[str]]:
    known = set(MODULES)
    return {name: frozenset(_imports(name, known)) for name in MODULES}


def import_graph() -> dict[str, set[str]]:
    """``{module: the tokenopt modules it imports}`` (a fresh copy: tests may add edges)."""
    return {name: set(targets) for name, targets in _read_graph().items()}


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component, as ``[a, b, ..., a]`` (Tarjan, then a shortest loop)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_shortest_loop(graph, comp) for comp in components]


def _shortest_loop(graph, comp: set[str]) -> list[str]:
    start = min(comp)
    paths, seen = [[start]], {start}
    while paths:
        nxt = []
        for path in paths:
            for w in sorted(graph[path[-1]] & comp):
                if w == start:
                    return path + [start]
                if w not in seen:
                    seen.add(w)
                    nxt.append(path + [w])
        paths = nxt
    raise AssertionError(f"no loop through {start}")   # cannot happen in a strongly connected component


def layer_of(module: str) -> tuple[int, str] | None:
    best = None
    for rank, layer, prefixes in LAYERS:
        for p in prefixes:
            if module == p or (p != "tokenopt" and module.startswith(p + ".")):
                if best is None or len(p) > best[0]:
                    best = (len(p), rank, layer)
    return None if best is None else best[1:]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for a in sorted(graph):
        ra, la = layer_of(a)
        for b in sorted(graph[a]):
            rb, lb = layer_of(b)
            if rb > ra or (rb == ra and lb != la):
                bad.append(f"{a} ({la}) -> {b} ({lb})")
    return bad


# ----------------------------------------------------------------------------------------------

def test_every_module_imports():
    failed = {}
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:   # report them all, not just the first
            failed[name] = f"{type(e).__name__}: {e}"
    assert not failed, "modules that do not import:\n" + "\n".join(f"  {k}: {v}" for k, v in failed.items())


def test_every_import_of_tokenopt_resolves():
    """Late imports run only when their function does: one that names a moved module fails here, not in use."""
    bad = []
    for name in MODULES:
        for mod, names, line in _import_statements(name):
            if not _is_ours(mod):
                continue
            if mod not in MODULES:
                bad.append(f"{name}:{line}: no module {mod}")
                continue
            target = importlib.import_module(mod)
            bad += [f"{name}:{line}: {mod} has no {n}" for n in names
                    if n != "*" and f"{mod}.{n}" not in MODULES and not hasattr(target, n)]
    assert not bad, "imports that name nothing:\n  " + "\n  ".join(bad)


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert {"tokenopt.cli.apply", "tokenopt.cli.inspect", "tokenopt.cli.measure", "tokenopt.cli.train"} <= \
        graph["tokenopt.cli"]                                   # from tokenopt.cli import apply, ...: submodules
    assert "tokenopt.sources" in graph["tokenopt.demo"]         # from tokenopt import sources
    assert "tokenopt.passes" in graph["tokenopt.plan"]          # from tokenopt.passes import get_pass: the package
    assert "tokenopt.ops.native.build" in graph["tokenopt.ops.native"]   # the __init__ of a subpackage
    assert "tokenopt.analysis" in graph["tokenopt.cli.common"]  # an import inside a function counts


def test_there_is_no_import_circle():
    circles = find_circles(import_graph())
    assert not circles, "import circles:\n" + "\n".join("  " + " -> ".join(c) for c in circles)


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"


def test_no_layer_imports_one_above_it():
    bad = layer_violations(import_graph())
    assert not bad, ("imports that point up or sideways (the code is in the wrong place):\n  "
                     + "\n  ".join(bad))


def test_a_planted_circle_is_named():
    graph = import_graph()
    graph["tokenopt.cli.common"] = graph["tokenopt.cli.common"] | {"tokenopt.cli.apply"}
    assert ["tokenopt.cli.apply", "tokenopt.cli.common", "tokenopt.cli.apply"] in find_circles(graph)
    assert "tokenopt.cli.common (entry) -> tokenopt.cli.apply (entry)" not in layer_violations(graph)
    graph["tokenopt.ops.tome"] = graph["tokenopt.ops.tome"] | {"tokenopt.pipeline"}
    assert "tokenopt.ops.tome (ops) -> tokenopt.pipeline (pipeline)" in layer_violations(graph)


def test_cli_verb_modules_share_only_common():
    """The app (cli/__init__) imports the verb modules; they share cli/common.py and nothing else of the CLI."""
    graph = import_graph()
    parts = [m for m in MODULES if m.startswith("tokenopt.cli.")]
    assert "tokenopt.cli.common" in parts and len(parts) > 2
    bad = [f"{m} -> {t}" for m in parts for t in sorted(graph[m])
           if (t == "tokenopt.cli" or t.startswith("tokenopt.cli.")) and not
           (t == "tokenopt.cli.common" and m != t)]
    assert not bad, "a CLI module imports another verb module or the app (share it through cli/common.py): " + \
        ", ".join(bad)


# ------------------------------------------------------------------------------------------------
# Nothing outside passes/ names a pass (DESIGN.md): the planner, the pipeline, the command line,
# training and export ask the registry and the records a pass fills in (LayerStep, the learned
# kinds, the token state's obligations), so a new pass needs no edit anywhere else. The docs
# generator is exempt: it writes one page per pass, by name.

EXEMPT_FROM_PASS_NAMES = ("tokenopt.passes", "tokenopt.docsgen")


def _names_a_pass(name: str, pass_names: set[str], pass_modules: set[str]) -> list[str]:
    source, _ = MODULES[name]
    found = []
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in pass_names:
            found.append(f"{name}:{node.lineno}: the string {node.value!r}")
    for module, names, line in _import_statements(name):
        targets = {module} | {f"{module}.{n}" for n in names}
        for t in sorted(targets & pass_modules):
            found.append(f"{name}:{line}: imports {t}")
    return found


def test_no_pass_is_named_outside_passes():
    from tokenopt.passes import available_passes

    pass_names = set(available_passes())
    pass_modules = {m for m in MODULES if m.startswith("tokenopt.passes.") and m != "tokenopt.passes.base"}
    found = [hit for name in sorted(MODULES) if not any(name == e or name.startswith(e + ".")
                                                        for e in EXEMPT_FROM_PASS_NAMES)
             for hit in _names_a_pass(name, pass_names, pass_modules)]
    assert not found, "pass names outside tokenopt/passes:\n  " + "\n  ".join(found)


def test_the_pass_name_check_finds_a_planted_name(tmp_path, monkeypatch):
    """The check above fails on a module that branches on a pass name or imports a pass module."""
    planted = tmp_path / "planted.py"
    planted.write_text('from tokenopt.passes.spa import gates_of\nif rule == "tosa":\n    pass\n')
    monkeypatch.setitem(MODULES, "tokenopt.planted", (planted, False))
    hits = _names_a_pass("tokenopt.planted", {"tosa", "spa"}, {"tokenopt.passes.spa"})
    assert hits == ["tokenopt.planted:2: the string 'tosa'", "tokenopt.planted:1: imports tokenopt.passes.spa"]
