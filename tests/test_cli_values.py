"""The command line's numbers and its usage errors, checked against values computed here.

``apply --check`` must print the real difference between the original and the optimized model
(0 at r=0, the difference recomputed here at r>0). Usage errors are run with real files and a
real model, so that the one bad flag is the only reason the command can fail.
"""
from __future__ import annotations

import copy
import math
import os
import re

import pytest
import timm
import torch
from typer.testing import CliRunner

import tokenopt
from tokenopt.cli import app

# conftest's tiny ViT made narrower (64 wide, 2 heads): the same 17 tokens, a quarter of the work
SMALL_KW = dict(img_size=32, patch_size=8, depth=2, num_classes=10, embed_dim=64, num_heads=2)
SMALL = "timm:vit_small_patch16_224?" + "&".join(f"{k}={v}" for k, v in SMALL_KW.items())
CHECK = re.compile(r"check on (\d+) random inputs \(seed 0\): max \|original - optimized\| = (\S+), "
                   r"(?:top-1 agreement (\d+)/(\d+) \((\d+)%\)|mean cosine similarity ([\d.]+))")

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def recipe_text(r: int, outputs: str | None = None) -> str:
    head = f"version: 1\noutputs: {outputs}\n" if outputs else "version: 1\n"
    return head + f"rules:\n  - pass: tome\n    r: {r}\n"


def check_line(result) -> re.Match:
    assert result.exit_code == 0, result.output
    m = CHECK.search(result.stdout)
    assert m is not None, result.stdout
    return m


def close_to_printed(printed: str, value: float, digits: int) -> bool:
    """``printed`` is ``value`` written with ``digits`` significant digits (half a unit of slack)."""
    if value == 0:
        return float(printed) == 0
    unit = 10 ** (math.floor(math.log10(abs(value))) - digits + 1)
    return abs(float(printed) - value) <= 0.5 * unit * 1.001


def check_batch(n: int = 8) -> torch.Tensor:
    """The batch ``--check`` documents: n random images from a generator seeded with 0."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_values")


@pytest.fixture(scope="module")
def recipes(work):
    paths = {}
    for name, text in {"r0": recipe_text(0), "r2": recipe_text(2), "tokens-r0": recipe_text(0, "tokens"),
                       "tokens-r2": recipe_text(2, "tokens")}.items():
        paths[name] = work / f"{name}.yaml"
        paths[name].write_text(text)
    return paths


@pytest.fixture(scope="module")
def base(work):
    """A tiny timm ViT with known weights, saved as a state dict the CLI loads with --arch."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = timm.create_model("vit_small_patch16_224", **SMALL_KW).eval()
    torch.save(model.state_dict(), work / "w.pth")
    return model


def leftovers(folder):
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


# ------------------------------------------------------------------------------ apply --check values

def test_check_at_r0_prints_zero_difference_and_full_agreement(work, recipes):
    """r=0 changes nothing: --check must print a difference of 0 and 100% top-1 agreement."""
    result = run("apply", recipes["r0"], SMALL, "-o", work / "r0.pt", "--check")
    m = check_line(result)
    assert m.group(1) == "8"
    assert float(m.group(2)) == 0.0
    assert (m.group(3), m.group(4), m.group(5)) == ("8", "8", "100")


def test_check_at_r2_prints_the_real_difference(work, recipes, base):
    """At r=2 the printed max |difference| and agreement equal what this test computes itself
    (original vs the saved artifact, and vs tokenopt.optimize, on the seeded batch of 8)."""
    out = work / "r2.pt"
    result = run("apply", recipes["r2"], work / "w.pth", "--arch", SMALL, "-o", out, "--check")
    m = check_line(result)
    x = check_batch()
    with torch.no_grad():
        original = base(x)
        saved = tokenopt.load(out)(x)
        fresh = tokenopt.optimize(copy.deepcopy(base), recipes["r2"], report=False)(x)
    torch.testing.assert_close(saved, fresh)              # the artifact is the model that was checked
    diff = (original - saved).abs().max().item()
    assert diff > 1e-3                                     # r=2 really changes the logits
    assert float(m.group(2)) > 0
    assert close_to_printed(m.group(2), diff, 3), (m.group(2), diff)
    agree = (original.argmax(-1) == saved.argmax(-1)).sum().item()
    assert (int(m.group(3)), int(m.group(4)), int(m.group(5))) == (agree, 8, round(100 * agree / 8))


def test_check_tokens_at_r0_is_exact(work, recipes):
    """outputs: tokens at r=0: the patch tokens are unchanged, so 0 difference and cosine 1.0000."""
    result = run("apply", recipes["tokens-r0"], SMALL, "-o", work / "t0.pt", "--check")
    m = check_line(result)
    assert float(m.group(2)) == 0.0 and m.group(6) == "1.0000"


def test_check_tokens_at_r2_prints_the_real_difference(work, recipes, base):
    """outputs: tokens at r=2: the printed difference and mean cosine equal those between the
    original model's own patch tokens (forward_features without the cls token) and the artifact's."""
    out = work / "t2.pt"
    result = run("apply", recipes["tokens-r2"], work / "w.pth", "--arch", SMALL, "-o", out, "--check")
    m = check_line(result)
    x = check_batch()
    with torch.no_grad():
        original = base.forward_features(x)[:, 1:]
        saved = tokenopt.load(out)(x)
    assert saved.shape == original.shape == (8, 16, 64)
    diff = (original - saved).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(original.flatten(1), saved.flatten(1), dim=-1).mean().item()
    assert diff > 1e-3 and float(m.group(2)) > 0
    assert close_to_printed(m.group(2), diff, 3), (m.group(2), diff)
    assert abs(float(m.group(6)) - cos) <= 0.5001e-4, (m.group(6), cos)
    assert cos < 0.9999                                    # the tokens did change


TORCHVISION_VIT = ("torchvision.models.vision_transformer:VisionTransformer?image_size=32&patch_size=8&num_layers=2"
                   "&num_heads=2&hidden_dim=64&mlp_dim=128&num_classes=10")


def _head_input(model, head: str, x):
    got = []
    h = model.get_submodule(head).register_forward_hook(lambda m, inp, out: got.append(inp[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    return got[0]


def test_check_on_a_zero_head_says_so_and_compares_the_features(work, recipes):
    """torchvision's ViT starts with a zero head: every output is 0, so "difference 0, 8/8 agree" would
    mean nothing. --check says so and compares what goes into `heads.head` (values recomputed here)."""
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = torchvision.models.vision_transformer.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    torch.save(model.state_dict(), work / "tv.pth")
    out = work / "tv.pt"
    result = run("apply", recipes["r2"], work / "tv.pth", "--arch", TORCHVISION_VIT, "-o", out, "--check")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    m = re.search(r"check on 8 random inputs \(seed 0\): uninformative: the original model's output is all zero for "
                  r"every input, so it cannot show a difference \(a zero-initialised or untrained head\?\)\. "
                  r"Compared the features going into its head `heads.head` instead: max \|original - optimized\| = "
                  r"(\S+), mean cosine similarity ([\d.]+)\. Load trained weights to check the outputs\.", text)
    assert m is not None, text
    assert "top-1 agreement" not in text
    x = check_batch()
    a, b = _head_input(model, "heads.head", x), _head_input(tokenopt.load(out), "heads.head", x)
    diff = (a - b).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
    assert diff > 1e-3 and close_to_printed(m.group(1), diff, 3), (m.group(1), diff)
    assert abs(float(m.group(2)) - cos) <= 0.5001e-4, (m.group(2), cos)


@pytest.mark.parametrize("spec,dim", [
    ("open_clip:ViT-B-32?image_size=32&patch_size=8&width=64&layers=2&head_width=32&embed_dim=16", 16),
    ("timm:vit_small_patch16_224?img_size=32&patch_size=8&depth=2&num_classes=0&embed_dim=64&num_heads=2", 64),
])
def test_check_on_an_embedding_reports_cosine_not_top1(work, recipes, spec, dim):
    """open_clip's image embedding and a timm ViT without a classifier: no classifier Linear makes the
    output, so top-1 agreement would compare arbitrary feature indices; the check gives cosine similarity."""
    if spec.startswith("open_clip"):
        pytest.importorskip("open_clip")
    result = run("apply", recipes["r2"], spec, "-o", work / f"emb{dim}.pt", "--check")
    m = check_line(result)
    assert m.group(3) is None and 0.9 < float(m.group(6)) < 1.0
    assert (f"(the {dim}-d output is an embedding, not class logits: no classifier Linear produces it, so no top-1 "
            "agreement)") in " ".join(result.stdout.split())


# ------------------------------------------------------------------------------ usage errors, real files

def flat(text: str) -> str:
    """Typer's error panel without its box characters and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def assert_usage_error(result, *expect, absent=None):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    text = flat(result.output)
    for e in expect:
        assert e in text, (e, text)
    if absent is not None:
        assert not absent.exists()
        assert leftovers(absent.parent) == []


BAD_SIZES = ["0,32,32", "a,b,c", "3,-32,32", "-32", "3,x", "1,3,32,32", "32x", "0", "3.0,32,32"]


@pytest.fixture(scope="module")
def commands(work, recipes):
    """Each command taking --input-size, with a real recipe, a real model and (where there is one)
    an output path that must stay absent."""
    return {
        "apply": (["apply", recipes["r2"], SMALL, "-o", work / "size.pt"], work / "size.pt"),
        "validate": (["validate", recipes["r2"], SMALL], None),
        "inspect": (["inspect", SMALL, "--graph", "svg", "-o", work / "size.svg"], work / "size.svg"),
    }


@pytest.mark.parametrize("size", BAD_SIZES)
@pytest.mark.parametrize("command", ["apply", "validate", "inspect"])
def test_bad_input_size_is_the_only_error(commands, command, size):
    """With real files the validator alone rejects a bad --input-size: exit 2, the option named,
    the accepted forms shown, no traceback, no output file."""
    args, out = commands[command]
    result = run(*args, "--input-size", size)
    assert_usage_error(result, "Invalid value for --input-size", repr(size), "write C,H,W", absent=out)


@pytest.mark.parametrize("size", ["3,32,32", "3x32x32", "32,32", "32"])
def test_good_input_sizes_are_accepted(recipes, size):
    """The forms the help promises plan the tiny ViT at 32x32 (so the validator is not over-strict)."""
    result = run("validate", recipes["r2"], SMALL, "--input-size", size)
    assert result.exit_code == 0, result.output
    assert "17 → 13 tokens" in result.stdout


def test_apply_without_output(recipes):
    """A real recipe and model but no -o: click names the missing option."""
    assert_usage_error(run("apply", recipes["r2"], SMALL), "Missing option", "--output")


def test_apply_without_model(recipes):
    """A real recipe and nothing else: the missing MODEL argument is named."""
    assert_usage_error(run("apply", recipes["r2"]), "Missing argument", "MODEL")


def test_apply_unknown_option(work, recipes):
    """A misspelt flag with everything else valid: named, with the right spelling, and no file."""
    out = work / "typo.pt"
    result = run("apply", recipes["r2"], SMALL, "-o", out, "--chek")
    assert_usage_error(result, "No such option", "--chek", "--check", absent=out)


def test_inspect_unknown_graph_format(work):
    """--graph png on a real model: the bad choice and the valid ones are named, no file."""
    out = work / "g.svg"
    result = run("inspect", SMALL, "--graph", "png", "-o", out)
    assert_usage_error(result, "--graph", "'png'", "text", "svg", "mermaid", absent=out)


def test_inspect_output_suffix_without_graph(work):
    """-o graph.png without --graph on a real model: the format cannot be told from the suffix,
    and the message says to add --graph; nothing is written."""
    out = work / "graph.png"
    result = run("inspect", SMALL, "-o", out)
    assert_usage_error(result, "Invalid value for --output", "graph.png", "--graph text|svg|mermaid", absent=out)


def test_eval_r_values_not_integers(recipes):
    """eval --r with a non-integer, everything else real (recipe, model, built-in data): one error line."""
    result = run("eval", SMALL, "--data", "digits", "--recipe", recipes["r2"], "--sweep", "tome",
                 "--r", "0,x")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "--r '0,x'" in result.stderr and "0,4,8" in result.stderr
    assert "Traceback" not in result.output
