"""Getting started and troubleshooting: ``tokenopt`` commands run while the site builds, output as is.

Commands run in-process through the Typer app (the same code as the console script) in a
scratch folder holding a copy of ``recipes/``, with an empty ``TOKENOPT_CACHE`` so that what a
first-time user sees is what the page shows. The model is the ``digits`` demo architecture with
random weights (``timm:...?img_size=32&...``): nothing is downloaded or trained, so accuracies are
chance; the trained demo's numbers come from a real run, kept in ``docs/hooks/captured/``.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import tempfile
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

from tokenopt.docsgen.examples import demo_arch_spec

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MODEL = demo_arch_spec("digits")
COLUMNS = 96        # the terminal width commands print for: their tables fit the page at 800 px
TIMINGS: dict[str, float] = {}     # seconds per command of the last build, for the build log


@dataclass
class Run:
    argv: list[str]
    output: str
    exit_code: int

    def markdown(self, shown_argv: list[str] | None = None) -> str:
        cmd = "tokenopt " + " ".join(_quote(a) for a in (shown_argv or self.argv))
        status = "" if self.exit_code == 0 else f"\n[exit status {self.exit_code}]"
        # every transcript wraps long lines (a command with a long model spec) rather than run off the
        # page; tables are printed COLUMNS wide, which fits. An error is read, not copied: no copy button.
        fence = "``` { .console .wrap }" if self.exit_code == 0 else "``` { .console .wrap .nocopy }"
        return f"{fence}\n$ {cmd}\n{self.output.rstrip()}{status}\n```"


def _quote(arg: str) -> str:
    return shlex.quote(arg)


class Session:
    """A scratch folder where commands run, one after another, sharing their files."""

    def __init__(self, root: Path, recipes_dir: Path):
        self.root = root
        self.cache = root / ".cache"
        self.work = root / "work"
        self.work.mkdir(parents=True)
        self.cache.mkdir()
        shutil.copytree(recipes_dir, self.work / "recipes")

    def write(self, name: str, text: str) -> Path:
        path = self.work / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    def image_folder(self, name: str, per_class: int) -> Path:
        """An ImageFolder ``name/<digit>/<i>.png`` of scikit-learn's bundled digits (8 x 8, scaled up)."""
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        root = self.work / name
        counts: dict[int, int] = {}
        for image, label in zip(digits.images, digits.target):
            if counts.get(int(label), 0) >= per_class:
                continue
            counts[int(label)] = counts.get(int(label), 0) + 1
            folder = root / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (image * (255 / 16)).astype("uint8")
            Image.fromarray(pixels).convert("RGB").resize((32, 32)).save(folder / f"{counts[int(label)]}.png")
        return root

    def run(self, *argv: str) -> Run:
        import time

        from typer.testing import CliRunner

        from tokenopt.cli import app

        old, start = os.getcwd(), time.perf_counter()
        os.chdir(self.work)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")      # warnings print as a user sees them (once per place)
                result = CliRunner().invoke(app, list(argv), env={"COLUMNS": str(COLUMNS), "TOKENOPT_CACHE": str(self.cache),
                                                                  "TOKENOPT_NATIVE": os.environ.get("TOKENOPT_NATIVE")})
        finally:
            os.chdir(old)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise RuntimeError(f"tokenopt {' '.join(argv)} raised {result.exception!r}") from result.exception
        text = "\n".join(line.rstrip() for line in _ANSI.sub("", result.output).splitlines())
        text = text.replace(str(self.work) + os.sep, "").replace(str(self.work), ".")
        TIMINGS[" ".join(argv[:2])] = time.perf_counter() - start
        return Run(list(argv), text, result.exit_code)


@contextlib.contextmanager
def session(recipes_dir: Path):
    with tempfile.TemporaryDirectory(prefix="tokenopt-docs-run-") as tmp:
        yield Session(Path(tmp), recipes_dir)


def _expect(run: Run, ok: bool) -> Run:
    """The page explains a success or a failure; the build stops if the command did otherwise."""
    if (run.exit_code == 0) != ok:
        raise RuntimeError(f"`tokenopt {' '.join(run.argv)}` exited {run.exit_code}, the page expects "
                           f"{'success' if ok else 'an error'}:\n{run.output}")
    return run


# ------------------------------------------------------------------------------ getting started


def getting_started(recipes_dir: Path, captured: dict[str, str]) -> str:
    m = MODEL
    with session(recipes_dir) as s:
        validate = _expect(s.run("validate", "recipes/tome-r8.yaml", m), True)
        inspect_model = _expect(s.run("inspect", m), True)
        apply = _expect(s.run("apply", "recipes/tome-r8.yaml", m, "-o", "vit.tokenopt.pt", "--check"), True)
        inspect_art = _expect(s.run("inspect", "vit.tokenopt.pt", "--graph", "svg", "-o", "vit.svg"), True)
        evaluate = _expect(s.run("eval", m, "--data", "digits", "--recipe", "recipes/tome-r8.yaml", "--limit", "128"), True)
        train = _expect(s.run("train", "recipes/tosa-keep50.yaml", m, "--data", "digits", "-o", "tosa.tokenopt.pt",
                              "--selector-epochs", "1", "--limit", "256", "--eval-images", "128"), True)
    parts = [
        "# Getting started", "",
        "## Install and try it", "",
        "The README's two commands: install and run the demo, then install the test extra and run the tests.", "",
        "```bash",
        "pip install torch==2.14.1 torchvision==0.29.1 -e . && tokenopt demo",
        "pip install torch==2.14.1 torchvision==0.29.1 -e '.[test]' && python -m pytest -q",
        "```", "",
        "`tokenopt demo` trains two small ViTs on scikit-learn's bundled handwritten digits (once; they are "
        "cached), applies the shipped ToMe and ToFu recipes and compares them. From a real run of "
        "`tokenopt demo --model digits` (2-core CPU; training took about three minutes):", "",
        "``` { .console .wrap }", captured.get("demo", "(no captured run)").rstrip(), "```", "",
        "## The verbs on a small ViT", "",
        "The commands below ran while this site was built, on the `digits` demo architecture with "
        "random weights (so accuracies are chance level, and nothing is downloaded or trained first):", "",
        "``` { .text .wrap }", m, "```", "",
        "Any `timm:` name takes constructor arguments after `?`; a trained model is a weights file "
        "with `--arch`, a `package.module:factory`, or `demo:digits` once `tokenopt demo` has trained it.", "",
        "**validate** checks a recipe and, given a model, plans it block by block without rewriting:", "",
        validate.markdown(), "",
        "**inspect** shows the blocks tokenopt finds, and why anything else is not a block:", "",
        inspect_model.markdown(), "",
        "**apply** rewrites, prints the per-layer table, checks the result against the original on a "
        "fixed random batch (`--check`) and saves an artifact (weights, recipe, manifest):", "",
        apply.markdown(), "",
        "**inspect** on the artifact rebuilds it and writes the rewritten graph (inserted nodes "
        "highlighted; `--graph text|svg|mermaid`):", "",
        inspect_art.markdown(), "",
        "**eval** measures top-1 on a data set (`digits`, `digits-clutter` or an ImageFolder), and the "
        "agreement with the original model:", "",
        evaluate.markdown(), "",
        "**train** fits ToSA's selectors to the original model's attention (no labels needed), and with "
        "`--finetune-epochs` fine-tunes the backbone with the recipe in the loop:", "",
        train.markdown(), "",
    ]
    if captured.get("trained"):
        parts += ["## On the trained demo model", "",
                  "From a real run on `demo:digits` (trained by `tokenopt demo` above), same machine:", "",
                  "``` { .console .wrap }", captured["trained"].rstrip(), "```", ""]
    parts += ["Next: the [recipe reference](reference/recipes.md), the [command-line reference](reference/cli.md), "
              "the passes ([ToMe](passes/tome.md) and the others) with the graphs they produce, and "
              "[troubleshooting](troubleshooting.md).", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ troubleshooting

_UNTRACEABLE = '''
    """A small ViT whose forward branches on the data: torch.fx cannot follow that."""
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, dim=64, heads=4):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))


    class GatedViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 64, 8, 8)
            self.blocks = nn.Sequential(Block(), Block())
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            if t.norm() > 100:            # a Python `if` on a tensor's value
                t = t / t.norm()
            return self.head(self.blocks(t).mean(1))


    class FixedViT(GatedViT):
        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = torch.where(t.norm() > 100, t / t.norm(), t)     # the same, as tensor code
            return self.head(self.blocks(t).mean(1))
'''

BEIT = "timm:beit_base_patch16_224?img_size=32&patch_size=8&embed_dim=64&depth=2&num_heads=4&num_classes=10"


def troubleshooting(recipes_dir: Path) -> str:
    import torch

    from tokenopt import sources

    m = MODEL
    with session(recipes_dir) as s:
        s.write("my_vits.py", _UNTRACEABLE)
        untraceable = _expect(s.run("inspect", "my_vits:GatedViT", "--input-size", "3,32,32"), False)
        fixed = _expect(s.run("inspect", "my_vits:FixedViT", "--input-size", "3,32,32"), True)
        refused = _expect(s.run("inspect", BEIT), True)
        refused_apply = _expect(s.run("apply", "recipes/tome-r8.yaml", BEIT, "-o", "beit.tokenopt.pt"), False)
        s.write("typo.yaml", """
            version: 1
            rules:
              - pass: tome
                layers: all
                rr: 8
        """)
        typo = _expect(s.run("validate", "typo.yaml"), False)
        s.write("nomatch.yaml", """
            version: 1
            rules:
              - pass: tome
                layers: "blocks.1?"
                r: 8
        """)
        nomatch = _expect(s.run("validate", "nomatch.yaml", m), False)
        strict = _expect(s.run("apply", "recipes/tome-r16.yaml", m, "-o", "r16.tokenopt.pt", "--strict"), False)
        loose = _expect(s.run("validate", "recipes/tome-r16.yaml", m), True)
        auto = _expect(s.run("apply", "recipes/tofu-auto-r8.yaml", m, "-o", "auto.tokenopt.pt"), False)
        s.image_folder("my_images", per_class=1)
        auto_ok = _expect(s.run("apply", "recipes/tofu-auto-r8.yaml", m, "-o", "auto.tokenopt.pt",
                                "--calibration", "my_images"), True)
        s.write("tosa-all.yaml", """
            version: 1
            rules:
              - pass: tosa
                layers: all
                keep: 0.5
        """)
        tosa_first = _expect(s.run("validate", "tosa-all.yaml", m), False)
        untrained = _expect(s.run("apply", "recipes/tosa-keep50.yaml", m, "-o", "tosa.tokenopt.pt", "--check"), True)
        torch.manual_seed(0)
        model, _ = sources.load_model(m)
        torch.save(model, s.work / "whole_model.pt")
        pickled = _expect(s.run("inspect", "whole_model.pt"), False)
        demo = _expect(s.run("eval", "demo:digits", "--data", "digits"), False)
        missing = _expect(s.run("apply", "recipes/tome-r8.yaml", "my_weights.safetensors", "-o", "out.pt"), False)

    code = textwrap.dedent(_UNTRACEABLE).strip()
    sections = [
        ("The model cannot be traced (Python control flow on tensor values)",
         "tokenopt captures the model with `torch.fx`, which runs `forward` on symbolic values; a Python "
         "`if`, `while` or `bool()` on a tensor's *value* has no answer then, and `torch.export` (tried "
         "next) cannot guard on it either. For a model file `my_vits.py` with such an `if`:",
         [untraceable.markdown(),
          f'<details markdown="1">\n<summary><code>my_vits.py</code>: <code>GatedViT</code> branches on a '
          f'value, <code>FixedViT</code> computes the same as tensor code</summary>\n\n```python\n{code}\n```\n\n'
          '</details>'],
         "Write the branch as tensor code (`torch.where`, masking), move it into a submodule and name "
         "that module with `--leaf` (it is then kept whole, and must not contain the attention), or "
         "give the branch's value as a constant. The fixed model traces:",
         [fixed.markdown()]),
        ("A block is refused",
         "Some attention is tied to a fixed grid of tokens: a relative-position bias table (BEiT), "
         "windows (Swin), rotary tables (EVA-02), spatial reduction (PVT). Removing or moving tokens "
         "there would be wrong, so the analysis refuses those blocks and says why:",
         [refused.markdown()],
         "A recipe on such a model leaves the refused blocks alone with a warning; when every block it "
         "selects is refused, there is nothing to do, and that is an error:",
         [refused_apply.markdown(),
          "Pick a model whose blocks `inspect` reports `ok`, or select only those blocks with `layers:`."]),
        ("A key in the recipe is misspelt",
         "Every rule's keys are checked against its pass's options; the message names the file and line, "
         "and the closest valid key:",
         [typo.markdown()],
         "Fix the key; the [recipe reference](reference/recipes.md) lists every key, its type and default.",
         []),
        ("`layers:` matches no block",
         "A selector that picks nothing is almost always a mistake (a misspelt path, a range from a deeper "
         "model), so it is an error rather than a silent no-op; the message lists the blocks the model has:",
         [nomatch.markdown()],
         "Use a path from the list, an index range within it, or a depth-relative selector "
         "(`all`, `first-half`, `second-half`).", []),
        ("A block cannot take the requested reduction",
         "Merging removes at most half of a block's non-prefix tokens. With `strict: true` (or `--strict`) "
         "asking for more is an error:",
         [strict.markdown()],
         "Without `--strict` the block merges the most it can and the plan says so:",
         [loose.markdown(), "Lower `r`, use a decreasing schedule (`r: {start: 16, end: 4}`), or drop `--strict`."]),
        ("ToFu `op: auto` without calibration images",
         "`op: auto` measures each block's linearity on real images before choosing prune or MLERP:",
         [auto.markdown()],
         "Give it images with `--calibration`: `digits`, `digits-clutter` or an ImageFolder "
         "(`my_images/<class>/<image>.png`; here ten digits from scikit-learn's bundled set):",
         [auto_ok.markdown()]),
        ("ToSA on the first block",
         "A ToSA selector reads the attention of the block before the one it selects for; block 0 has none:",
         [tosa_first.markdown()],
         "Start the rule at block 1 (`layers: \"1-5\"`) or use `second-half`.", []),
        ("ToSA selectors were never trained",
         "A freshly applied ToSA recipe has untrained selectors: they pick tokens from the previous "
         "layer's attention alone. Using the model warns (and `--strict` refuses):",
         [untrained.markdown()],
         "Train them: `tokenopt train recipes/tosa-keep50.yaml MODEL --data DATA -o OUT` "
         "([getting started](getting-started.md) shows a run).", []),
        ("A checkpoint is a pickled model",
         "A file saved with `torch.save(model)` holds Python objects; loading it runs code from the file, "
         "so tokenopt refuses unless told to trust it:",
         [pickled.markdown()],
         "Save and load a state dict instead (`torch.save(model.state_dict(), ...)` and `--arch` for the "
         "architecture), or pass `--trust-pickle` for a file you made yourself.", []),
        ("A demo model that was never trained",
         "`demo:digits` and `demo:digits-clutter` are read from the cache; loading never trains them:",
         [demo.markdown()],
         "Run `tokenopt demo` once (or `tokenopt demo --model digits`).", []),
        ("A file that is not there",
         "Paths are checked before anything runs; nothing is written when a command fails:",
         [missing.markdown()], "Check the path (relative paths are from the current folder).", []),
    ]
    out = ["# Troubleshooting", "",
           "What users run into, with the messages tokenopt prints: each command below ran while this site "
           "was built (model: the `digits` demo architecture with random weights, see "
           "[getting started](getting-started.md)). Every user error is one message on stderr and exit "
           "status 2, with no traceback and no half-written output file.", ""]
    for title, intro, shown, advice, more in sections:
        out += [f"## {title}", "", intro, "", *[x + "\n" for x in shown], advice, "", *[x + "\n" for x in more]]
    return "\n".join(out)
