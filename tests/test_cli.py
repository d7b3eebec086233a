"""The command line: happy paths, and every user error as exit 2, one message, no file, no traceback."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tokenopt.cli import app, main

TOME = "version: 1\nrules:\n  - pass: tome\n    r: 2\n"
TINY_KW = dict(img_size=32, patch_size=8, depth=2, num_classes=10)

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def write(folder, name, text):
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def leftovers(folder):
    """Temporary files atomic writes would leave behind if they failed to clean up."""
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def recipe(work):
    return write(work, "tome.yaml", TOME)


@pytest.fixture(scope="module")
def applied(work, recipe, tiny_vit_spec):
    """``tokenopt apply --check`` on the tiny timm ViT, run once for the tests that read its artifact."""
    out = work / "vit.tokenopt.pt"
    result = run("apply", recipe, tiny_vit_spec, "-o", out, "--check")
    return result, out


@pytest.fixture(scope="module")
def weights(work):
    """A trained-looking tiny ViT saved three ways: state dict, safetensors, whole pickled module."""
    model = timm.create_model("vit_small_patch16_224", **TINY_KW).eval()
    sd = model.state_dict()
    torch.save({"state_dict": sd, "epoch": 7}, work / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(work / "w.safetensors"))
    torch.save(model, work / "whole.pt")
    return model


# ------------------------------------------------------------------------------ happy paths

def test_apply_check_prints_table_and_writes_artifact(applied):
    result, out = applied
    assert result.exit_code == 0, result.output
    assert "tokens in → out" in result.stdout and "17 → 15" in result.stdout and "15 → 13" in result.stdout
    assert "top-1 agreement" in result.stdout and "max |original - optimized|" in result.stdout
    assert f"saved {out}" in result.stdout
    from tokenopt.ops import native
    step = "native" if native.status().startswith("on") else "PyTorch operators"
    assert f"merge step for eager CPU inference: {step}" in result.stdout
    payload = torch.load(out, weights_only=True)
    assert payload["format"] == "tokenopt-artifact"
    assert payload["manifest"]["base"]["name"] == "vit_small_patch16_224"


def test_inspect_artifact(applied):
    _, out = applied
    result = run("inspect", out)
    assert result.exit_code == 0, result.output
    s = result.stdout
    assert "base model: timm:vit_small_patch16_224?img_size=32" in s
    assert "pass: tome" in s and "merge r=2" in s and "17 → 15" in s
    assert "blocks.1" in s and "prefix tokens: 1" in s and "inserted by the recipe" in s


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_inspect_artifact_graph_files(applied, work):
    _, out = applied
    svg = work / "graph.svg"
    result = run("inspect", out, "--graph", "svg", "-o", svg)
    assert result.exit_code == 0, result.output
    text = svg.read_text()
    assert "<svg" in text and "#ffd8a8" in text and "tome_merge" in text   # Graphviz's SVG, after its XML prolog
    assert ET.fromstring(text).tag == "{http://www.w3.org/2000/svg}svg"
    mmd = work / "graph.mmd"  # format taken from the suffix
    assert run("inspect", out, "-o", mmd).exit_code == 0
    assert mmd.read_text().startswith("flowchart TD") and "class " in mmd.read_text()
    assert leftovers(work) == []


def test_inspect_graph_text_to_stdout(applied):
    _, out = applied
    result = run("inspect", out, "--graph", "text")
    assert result.exit_code == 0, result.output
    marked = [line for line in result.stdout.splitlines() if line.startswith("* ")]
    assert any("tome_merge" in line and "ToMe merge r=2" in line for line in marked)
    assert "prefix tokens" in result.stderr and "prefix tokens" not in result.stdout  # graph alone on stdout


def test_inspect_model(tiny_vit_spec):
    result = run("inspect", tiny_vit_spec)
    assert result.exit_code == 0, result.output
    s = result.stdout
    assert "2 transformer block(s)" in s and "blocks.0" in s and "sdpa" in s
    assert "prefix tokens: 1" in s and "pooling: cls" in s


def test_validate_recipe_only(recipe):
    result = run("validate", recipe)
    assert result.exit_code == 0, result.output
    assert "tome" in result.stdout and "r=2" in result.stdout and "valid recipe" in result.stdout


def test_validate_plans_against_model(recipe, tiny_vit_spec):
    result = run("validate", recipe, tiny_vit_spec)
    assert result.exit_code == 0, result.output
    assert "17 → 15" in result.stdout and "15 → 13" in result.stdout and "17 → 13 tokens" in result.stdout


def test_validate_reports_shortfall_as_warning(work, tiny_vit_spec):
    r = write(work, "big.yaml", "version: 1\nrules:\n  - pass: tome\n    r: 9\n")
    result = run("validate", r, tiny_vit_spec)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "r=9" in result.stderr


@pytest.mark.parametrize("source", ["state dict", "safetensors", "pickle"])
def test_apply_from_files(work, recipe, weights, tiny_vit_spec, source):
    model_file, extra = {
        "state dict": (work / "w.pth", ["--arch", tiny_vit_spec]),
        "safetensors": (work / "w.safetensors", ["--arch", tiny_vit_spec]),
        "pickle": (work / "whole.pt", ["--trust-pickle", "--arch", tiny_vit_spec]),
    }[source]
    out = work / f"from-{source.replace(' ', '-')}.pt"
    result = run("apply", recipe, model_file, "-o", out, *extra)
    assert result.exit_code == 0, result.output
    payload = torch.load(out, weights_only=True)
    base = payload["manifest"]["base"]
    assert base["weights"] == str(model_file)
    assert base["kind"] == "timm"
    # the artifact holds the file's weights, not a fresh random init
    assert torch.equal(payload["state_dict"]["head.weight"], weights.state_dict()["head.weight"])


def test_apply_pickle_whose_class_rebuilds_another_model_asks_for_arch(work, recipe, weights):
    """A pickled timm model is known only by its class, which builds timm's default ViT-B: refused, not saved."""
    out = work / "from-pickle-alone.pt"
    result = run("apply", recipe, work / "whole.pt", "--trust-pickle", "-o", out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.stderr.split())
    assert f"cannot save {out}: its manifest would rebuild the base model as " \
           "timm.models.vision_transformer:VisionTransformer called with no arguments" in text
    assert "pass --arch naming it" in text and not out.exists()


def test_apply_check_with_token_outputs(work, tiny_vit_spec):
    r = write(work, "tokens.yaml", "version: 1\noutputs: tokens\nrules:\n  - pass: tome\n    r: 2\n")
    out = work / "tokens.pt"
    result = run("apply", r, tiny_vit_spec, "-o", out, "--check")
    assert result.exit_code == 0, result.output
    assert "mean cosine similarity" in result.stdout  # compared with the unmodified model's patch tokens
    assert torch.load(out, weights_only=True)["manifest"]["outputs"] == "tokens"


def test_apply_with_input_size_and_leaf(work, recipe, user_models):
    out = work / "own.pt"
    result = run("apply", recipe, "tokenopt_user_models:make_vit?img=48", "-o", out,
                 "--input-size", "3,48,48", "--leaf", "GELU")
    assert result.exit_code == 0, result.output
    manifest = torch.load(out, weights_only=True)["manifest"]
    assert manifest["example_input_shape"] == [2, 3, 48, 48] and manifest["leaf_modules"] == ["GELU"]
    assert "37 → 35" in result.stdout  # 36 patches + cls


# ------------------------------------------------------------------------------ user errors

BAD_RECIPES = {
    "malformed YAML": ("version: 1\nrules:\n  - pass: tome\n    r: 2\n   layers: all\n", "line 5"),
    "unknown pass": ("version: 1\nrules:\n  - pass: tomme\n    r: 2\n", "unknown pass 'tomme'"),
    "unknown key": ("version: 1\nrules:\n  - pass: tome\n    r: 2\n    rate: 3\n", "unknown option 'rate'"),
    "selector matching nothing": ("version: 1\nrules:\n  - pass: tome\n    layers: 'stages.*'\n    r: 2\n",
                                  "matches no block"),
    "r too large under strict": ("version: 1\nstrict: true\nrules:\n  - pass: tome\n    r: 9\n", "r=9"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe(work, tiny_vit_spec, case):
    text, expect = BAD_RECIPES[case]
    r = write(work, "bad.yaml", text)
    out = work / "out.pt"
    result = run("apply", r, tiny_vit_spec, "-o", out)
    assert_user_error(result, out, expect)
    assert "bad.yaml" in result.stderr


def bad_model_cases(work, weights):
    trunc = work / "trunc.pt"
    data = (work / "w.pth").read_bytes()
    trunc.write_bytes(data[: len(data) // 3])
    return {
        "no transformer blocks": (["tokenopt_user_models:make_cnn"], "no transformer blocks"),
        "truncated checkpoint": ([trunc, "--arch", "timm:vit_small_patch16_224"], "truncated"),
        "pickle without trust": ([work / "whole.pt"], "VisionTransformer"),
        "missing file": ([work / "missing.pt"], "not found"),
        "state dict without arch": ([work / "w.pth"], "--arch"),
        "unknown timm model": (["timm:vit_tiny_patch99"], "unknown timm model"),
        "bad factory path": ([work / "w.pth", "--arch", "nosuchpkg:make"], "cannot import module 'nosuchpkg'"),
        "arch that does not fit": ([work / "w.pth", "--arch", "timm:vit_small_patch16_224"], "wrong shape"),
    }


@pytest.mark.parametrize("case", ["no transformer blocks", "truncated checkpoint", "pickle without trust",
                                  "missing file", "state dict without arch", "unknown timm model",
                                  "bad factory path", "arch that does not fit"])
def test_bad_model(work, recipe, weights, user_models, case):
    args, expect = bad_model_cases(work, weights)[case]
    out = work / "out.pt"
    result = run("apply", recipe, *args, "-o", out)
    assert_user_error(result, out, expect)
    if case == "pickle without trust":
        assert "--trust-pickle" in result.stderr


def test_missing_recipe(work, tiny_vit_spec):
    out = work / "out.pt"
    assert_user_error(run("apply", work / "nope.yaml", tiny_vit_spec, "-o", out), out, "recipe file not found")


def test_output_in_missing_folder(work, recipe, tiny_vit_spec):
    out = work / "no" / "such" / "dir" / "out.pt"
    result = run("apply", recipe, tiny_vit_spec, "-o", out)
    assert_user_error(result, out, "output folder does not exist")
    assert str(out.parent) in result.stderr


def test_inspect_graph_into_missing_folder(tiny_vit_spec, work):
    out = work / "nowhere" / "g.svg"
    assert_user_error(run("inspect", tiny_vit_spec, "--graph", "svg", "-o", out), out, "does not exist")


def test_inspect_graph_svg_without_graphviz(applied, work, monkeypatch):
    """No `dot`: --graph svg stops with how to install Graphviz and writes nothing; Mermaid and text
    need no Graphviz and still work."""
    from tokenopt import graph_export
    _, artifact = applied
    monkeypatch.setattr(graph_export.shutil, "which", lambda name: None)
    out = work / "nodot.svg"
    result = run("inspect", artifact, "--graph", "svg", "-o", out)
    assert_user_error(result, out, "Graphviz's `dot` program is not on PATH")
    assert "apt-get install graphviz" in result.stderr and "brew install graphviz" in result.stderr
    assert "conda install" in result.stderr
    assert result.stderr.count("error:") == 1 and result.stdout == ""   # failed before reading the model
    mmd = work / "nodot.mmd"
    assert run("inspect", artifact, "--graph", "mermaid", "-o", mmd).exit_code == 0
    assert mmd.read_text().startswith("flowchart TD")
    result = run("inspect", artifact, "--graph", "text")
    assert result.exit_code == 0 and "* %tome_merge" in result.stdout


def test_validate_bad_recipe(work):
    r = write(work, "bad.yaml", "version: 1\nrules:\n  - pass: tome\n    r: [2\n")
    result = run("validate", r)
    assert result.exit_code == 2 and "could not parse YAML" in result.stderr


@pytest.mark.parametrize("args", [
    ["apply", "r.yaml"],                                   # missing MODEL and -o
    ["apply", "r.yaml", "m.pt"],                           # missing -o
    ["apply", "r.yaml", "m.pt", "-o", "x.pt", "--input-size", "3,x"],
    ["inspect", "m.pt", "--graph", "png"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(args):
    assert run(*args).exit_code == 2


def test_main_exits_2(work):
    r = write(work, "bad.yaml", "version: 2\nrules: []\n")
    with pytest.raises(SystemExit) as e:
        main(["validate", str(r)])
    assert e.value.code == 2


def test_python_m_tokenopt_error_is_one_message(work, user_models):
    """In a real process: exit 2, `error:` on stderr, no traceback, no file (the factory found via PYTHONPATH)."""
    out = work / "out.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(user_models), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "tokenopt", "apply", str(work / "tome.yaml"),
                           "tokenopt_user_models:make_cnn", "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: Sequential has no transformer blocks")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


def assert_user_error(result, out, expect):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.startswith("error: "), result.stderr
    assert expect in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    if out.parent.exists():
        assert leftovers(out.parent) == []


def test_train_help_names_every_epochs_option_in_80_columns():
    """At COLUMNS=80 the option column must show each name whole: `--gate-epochs` was an alias of
    `--selector-epochs` and showed only as `--selector-epochs,-…`."""
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    options = {line.split()[1] for line in result.output.splitlines() if line.startswith("│    --")}
    assert {"--selector-epochs", "--gate-epochs", "--finetune-epochs", "--masks"} <= options
    assert not any("…" in o or o.endswith(",") for o in options), options
    assert max(len(line) for line in result.output.splitlines()) <= 80


@pytest.mark.parametrize("flag,recipe_text,message", [
    ("--gate-epochs", "version: 1\nrules:\n  - pass: tosa\n    layers: 1\n    keep: 0.5\n",
     "--gate-epochs trains SPA gates, and the recipe has none: use --selector-epochs"),
    ("--gate-epochs", "version: 1\nrules:\n  - pass: tome\n    r: 1\n",
     "--gate-epochs trains SPA gates, and the recipe has none: use --finetune-epochs"),
    ("--selector-epochs", "version: 1\nrules:\n  - pass: spa\n    layers: 1\n",
     "--selector-epochs trains ToSA selectors, and the recipe has none: use --gate-epochs"),
])
def test_train_epochs_flag_of_the_other_pass_is_refused(work, tiny_vit_spec, flag, recipe_text, message):
    recipe = work / f"other-phase-{flag}-{len(recipe_text)}.yaml"
    recipe.write_text(recipe_text)
    out = work / "never.pt"
    result = run("train", recipe, tiny_vit_spec, "--data", "digits", "-o", out, flag, "1", "--finetune-epochs", "1")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and not out.exists()


def test_train_help_says_masks_are_relative_to_the_training_folder():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())
    assert ("one PNG per training image, at its path relative to the training folder (for --data D with train/: "
            "image D/train/cat/1.jpg, mask DIR/cat/1.png)") in text


@pytest.mark.parametrize("verb", ["apply", "inspect"])
def test_arch_help_is_whole_in_80_columns(verb):
    """At COLUMNS=80 the --arch help showed `timm:<name>[?key=valu…`: every name must show whole."""
    result = runner.invoke(app, [verb, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    lines = result.output.splitlines()
    option = re.compile(r"^│\s+(\*\s+)?--")
    start = next(i for i, line in enumerate(lines) if option.match(line) and "--arch " in line)
    end = next(i for i in range(start + 1, len(lines)) if option.match(lines[i]) or lines[i].startswith("╰"))
    text = " ".join(" ".join(line.replace("│", " ").split()) for line in lines[start:end])
    text = text.split("Architecture for a state dict: ", 1)[1]
    assert "…" not in text, text
    assert ("timm:<name>, open_clip:<arch>, torchvision:<name> or package.module:factory, each optionally followed "
            "by ?key=value&... (constructor arguments).") in text, text
    assert max(len(line) for line in lines) <= 80
