"""The documentation's code runs: every Python block in docs/ is executed, every shell command that
names a shipped recipe or a demo model at least plans.

Python blocks: each ```` ```python ```` block of a hand-written page (docs/**/*.md, not docs/hooks/,
whose pages are generated while the site builds) runs on its own, in a fresh namespace: a reader
copies one block, so one block must be enough (its imports, its model). The working directory is
a temporary folder holding the repository's ``recipes/``, so ``"recipes/tome-r13.yaml"`` resolves
as it does for a user in a checkout, and files a block writes land there.

An HTML comment on the line before a block says how to run it:

    <!-- docs-test: skip (needs ImageNet) -->     not run; the reason in parentheses is required
    <!-- docs-test: slow (it trains) -->          run only with ``-m slow``

Shell blocks (bash, sh, shell, console) of docs/ and the README: each command naming
``recipes/<name>.yaml`` needs that file, and ``tokenopt validate`` must accept it on the model the
command names when that is a ``timm:`` name (also as ``--arch``) or ``demo:NAME`` (planned on the
demo's architecture, so no trained cache is needed); a ``demo:NAME`` must be a demo that exists.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<what>\w+)\s*(?:\((?P<reason>[^)]*)\))?\s*-->")
SHELL = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    marker: str | None          # skip | slow | None
    reason: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def hand_written_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if DOCS / "hooks" not in p.parents)


def blocks(page: Path, text: str | None = None) -> list[Block]:
    text = page.read_text() if text is None else text
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = [ln for ln in text[:m.start()].splitlines() if ln.strip()]
        mark = MARKER.search(before[-1]) if before else None
        body = "\n".join(ln[len(m["indent"]):] for ln in m["body"].splitlines())
        found.append(Block(page, line, m["lang"].lower(), body, mark and mark["what"], mark and mark["reason"]))
    return found


PYTHON = [b for p in hand_written_pages() for b in blocks(p) if b.lang in ("python", "py")]


def _param(b: Block):
    marks = [pytest.mark.slow] if b.marker == "slow" else []
    return pytest.param(b, id=b.id, marks=marks)


def test_the_docs_have_python_blocks_and_every_marker_is_known():
    assert len(PYTHON) >= 2
    for p in hand_written_pages():
        for b in blocks(p):
            if b.marker is not None:
                assert b.marker in ("skip", "slow"), f"{b.id}: unknown docs-test marker {b.marker!r}"
            if b.marker == "skip":
                assert b.reason and b.reason.strip(), f"{b.id}: a skipped block needs a reason: (needs ...)"


@pytest.mark.parametrize("block", [_param(b) for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path, monkeypatch):
    if block.marker == "skip":
        pytest.skip(f"{block.id}: {block.reason}")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    code = compile(block.code, f"{block.id}", "exec")
    exec(code, {"__name__": "__docs__"})


def test_blocks_are_read_from_markdown_with_their_markers():
    """The reader itself: fences (also indented ones), languages, the marker on the line before."""
    text = ("# t\n\n<!-- docs-test: skip (needs a GPU) -->\n```python\nx = 1\n```\n\n"
            "  ```bash\n  tokenopt demo && tokenopt eval demo:digits \\\n    --data digits  # sweep\n  ```\n\n"
            "<!-- docs-test: slow -->\n\n```python\ny = 2\n```\n")
    got = blocks(DOCS / "probe.md", text)
    assert [(b.lang, b.marker, b.reason, b.line) for b in got] == [
        ("python", "skip", "needs a GPU", 4), ("bash", None, None, 8), ("python", "slow", None, 15)]
    assert got[0].code == "x = 1" and got[2].code == "y = 2"
    assert commands(got[1].code) == [["tokenopt", "demo"], ["tokenopt", "eval", "demo:digits", "--data", "digits"]]


# ------------------------------------------------------------------------------ shell commands


def commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split as a shell would."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        command: list[str] = []
        for w in words + ["&&"]:
            if w in ("&&", "||", ";", "|"):
                if command:
                    out.append(command)
                command = []
            else:
                command.append(w)
    return out


def _demo_arch(name: str) -> str:
    from tokenopt.demo_specs import DEMOS

    spec = DEMOS[name]
    return f"timm:{spec.timm_name}?" + "&".join(f"{k}={v}" for k, v in spec.timm_kwargs.items())


def _model_of(words: list[str]) -> str | None:
    """The model a command names, as something validate can plan on without files: a timm name or
    a demo's architecture; None when the model is a file or a placeholder."""
    for w in words:
        if w.startswith("demo:"):
            return _demo_arch(w[len("demo:"):])
        if w.startswith("timm:"):
            return w
    return None


def shell_checks() -> list[tuple[str, str, str | None]]:
    """(where, recipe or demo name, model) for each recipe or demo: named in a shell block."""
    pages = hand_written_pages() + [ROOT / "README.md"]
    checks = []
    for page in pages:
        for b in blocks(page):
            if b.lang not in SHELL:
                continue
            for words in commands(b.code):
                for w in words:
                    if w.startswith("demo:"):
                        checks.append((b.id, w, None))
                recipes = [w for w in words if re.fullmatch(r"recipes/[\w.-]+\.ya?ml", w)]
                for r in recipes:
                    checks.append((b.id, r, _model_of(words)))
    return checks


SHELL_CHECKS = shell_checks()


def test_the_docs_name_shipped_recipes_and_demos():
    names = {c[1] for c in SHELL_CHECKS}
    assert {"recipes/tome-r13.yaml", "recipes/spa-bypass-second-half.yaml", "demo:digits-clutter"} <= names


@pytest.mark.parametrize("name,model", sorted({(c[1], c[2]) for c in SHELL_CHECKS}, key=str),
                         ids=lambda v: str(v))
def test_shell_commands_name_recipes_and_demos_that_work(name, model):
    from tokenopt.demo_specs import DEMOS
    from tokenopt.sources.generator_specs import GENERATORS

    where = [c[0] for c in SHELL_CHECKS if (c[1], c[2]) == (name, model)]
    if name.startswith("demo:"):
        known = sorted([*DEMOS, *GENERATORS])
        assert name[len("demo:"):] in known, f"{where}: no demo called {name!r} (demos: {known})"
        return
    assert (ROOT / name).is_file(), f"{where}: {name} is not a shipped recipe"
    from tokenopt.cli import app

    args = ["validate", str(ROOT / name)] + ([model] if model else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{where}: tokenopt {' '.join(args)}\n{result.output}"
