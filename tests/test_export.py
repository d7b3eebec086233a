"""Export out: saved optimized models as torch.export programs (.pt2) and ONNX files, equal to eager.

The reference is the eager optimized model rebuilt from the same artifact; the exported program
runs on batches of other sizes than the example it was exported with (the batch axis is dynamic).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import timm
import torch
from typer.testing import CliRunner

import tokenopt
from tokenopt import deploy
from tokenopt.cli import app
from tokenopt.tokens import TokenCount
from tokenopt.record import Record, update_record

runner = CliRunner()
KW = dict(img_size=32, patch_size=8, depth=3, num_classes=10, embed_dim=32, num_heads=2)
BASE = {"kind": "timm", "name": "vit_small_patch16_224", "kwargs": KW}
RECIPES = {
    "tome": [{"pass": "tome", "r": 2}],
    "tofu-prune": [{"pass": "tofu", "r": 2, "op": "prune"}],
    "tofu-mlerp": [{"pass": "tofu", "layers": "1-2", "r": 3, "op": "mlerp"}],
    "tosa": [{"pass": "tosa", "layers": "1-2", "keep": 0.5}],
    # SPA exports in its padded layout (layout auto); its random-init gates keep different counts
    "spa-bypass": [{"pass": "spa", "layers": "1-2", "max_keep": 0.75}],
    "spa-prune": [{"pass": "spa", "layers": "1-2", "mode": "prune", "max_keep": 0.75}],
}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def saved(tmp_path, name: str):
    """An artifact of the tiny ViT optimized by RECIPES[name] (with trained-looking random selector weights)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", **KW).eval()
    gm = tokenopt.optimize(model, {"version": 1, "rules": RECIPES[name]}, torch.randn(2, 3, 32, 32))
    update_record(gm, base=BASE)
    with torch.no_grad():   # selectors away from their init, so a wrong top-k would show
        for k, p in gm.named_parameters():
            if "selector" in k:
                p.add_(torch.randn_like(p))
    path = tmp_path / f"{name}.tokenopt.pt"
    tokenopt.save(gm, path)
    return path


def batch(n: int, seed: int = 5):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def eager(path, x):
    import warnings

    gm = tokenopt.load(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gm(x)


def pt2_round_trip(tmp_path, name):
    art = saved(tmp_path, name)
    res = deploy.export_artifact(art, tmp_path / "m.pt2")
    assert res.dynamic_batch and res.max_abs_diff <= 1e-5
    program = torch.export.load(tmp_path / "m.pt2")
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("tokenopt" in op for op in ops)          # PyTorch operators only, no native step
    module = program.module()
    for n in (1, 5):                                         # the example had 2 images
        x = batch(n)
        torch.testing.assert_close(module(x), eager(art, x), atol=1e-5, rtol=0)
    assert sorted(os.listdir(tmp_path)) == sorted([art.name, "m.pt2"])   # no temporary file left


@pytest.mark.slow   # ~10 s each on 2 busy cores; ToMe runs in the fast suite through the command line below
@pytest.mark.parametrize("name", list(RECIPES))
def test_pt2_round_trip_equals_eager(tmp_path, name):
    pt2_round_trip(tmp_path, name)


def onnx_round_trip(tmp_path, name):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    art = saved(tmp_path, name)
    res = deploy.export_artifact(art, tmp_path / "m.onnx", "onnx")
    assert res.dynamic_batch and res.max_abs_diff is not None and res.max_abs_diff <= 1e-5
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 4):
        x = batch(n)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), eager(art, x), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_onnx_round_trip_equals_eager(tmp_path, name):
    onnx_round_trip(tmp_path, name)


# ----------------------------------------------------------------------------------------------
# refusals

@pytest.fixture
def gate():
    from test_plan_tokens import ToyGate

    from tokenopt.passes import base as registry

    registry.register_pass("toy-gate")(ToyGate)
    yield
    registry._REGISTRY.pop("toy-gate")


def test_token_counts_that_vary_per_image_are_refused(tmp_path, gate):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", **KW).eval()
    gm = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "toy-gate", "layers": 1, "keep": 0.5},
                                                            {"pass": "tome", "layers": 2, "r": 2}]},
                           torch.randn(2, 3, 32, 32))
    update_record(gm, base=BASE)
    art = tmp_path / "gate.tokenopt.pt"
    tokenopt.save(gm, art)
    res = run("export", art, "-o", tmp_path / "gate.pt2")
    assert res.exit_code == 2, res.output
    assert "blocks.1 (layer 1) keeps a different number of tokens per image (≤ 17, ≈ 9 expected" in res.output
    assert "need static shapes" in res.output and "Traceback" not in res.output
    assert os.listdir(tmp_path) == [art.name]


def _plan(*steps):
    layers = [SimpleNamespace(path=f"blocks.{i}", block=i, tokens_out=t, step=s, rule=None)
              for i, (t, s) in enumerate(steps)]
    return SimpleNamespace(meta={"tokenopt": Record(plan=SimpleNamespace(layers=layers))})


def test_packed_layouts_export_only_with_a_capacity():
    """The pass says, in its plan, whether a layer's shapes depend on the images; export reads only that."""
    from tokenopt.passes.spa import SPA, SPAOptions

    fixed = (TokenCount.fixed(17), None)
    block = SimpleNamespace(path="blocks.1", index=1, tokens=17, refused_by=None, window=None)
    spa = SPA()

    def step(layout):
        params = spa.layer_options(SPAOptions(layout=layout), 1, "rule 1")[0]
        return spa.plan_layer(block, params, TokenCount.fixed(17), 1)

    assert deploy.export_problem(_plan(fixed, fixed)) is None
    for layout in ("padded", "auto"):      # a fixed capacity per image (auto pads under export)
        s = step(layout)
        assert s.tokens_out == 17 and deploy.export_problem(_plan(fixed, (TokenCount(17, 9.0), s))) is None
    why = deploy.export_problem(_plan(fixed, (TokenCount(17, 9.0), step("packed"))))
    assert why.startswith("blocks.1 (layer 1) packs the kept tokens") and "packed layout" in why
    # a count varying per image with no padded step behind it is refused as such
    why = deploy.export_problem(_plan(fixed, (TokenCount(17, 9.0), None)))
    assert why.startswith("blocks.1 (layer 1) keeps a different number of tokens per image")


# ----------------------------------------------------------------------------------------------
# the command

def test_cli_export_round_trip_equals_eager(tmp_path):
    art = saved(tmp_path, "tome")
    res = run("export", art, "-o", tmp_path / "m.pt2")
    assert res.exit_code == 0, res.output
    assert "dynamic batch" in res.output and "max abs difference to eager" in res.output
    program = torch.export.load(tmp_path / "m.pt2")
    assert not any("tokenopt" in str(n.target) for n in program.graph.nodes)   # no native step
    module, reference = program.module(), tokenopt.load(art)
    for n in (1, 5):                                         # the example had 2 images
        x = batch(n)
        with torch.no_grad():
            torch.testing.assert_close(module(x), reference(x), atol=1e-5, rtol=0)
    assert sorted(os.listdir(tmp_path)) == sorted([art.name, "m.pt2"])   # no temporary file left


@pytest.mark.slow
def test_static_batch_flag_fixes_the_batch(tmp_path):
    art = saved(tmp_path, "tome")
    res = run("export", art, "-o", tmp_path / "m.pt2", "--static-batch")
    assert res.exit_code == 0, res.output
    module = torch.export.load(tmp_path / "m.pt2").module()
    module(batch(2))
    with pytest.raises(Exception):
        module(batch(3))


@pytest.mark.slow
def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    art = saved(tmp_path, "tome")
    monkeypatch.setattr(deploy, "TOLERANCE", -1.0)
    res = run("export", art, "-o", tmp_path / "m.pt2")
    assert res.exit_code == 2 and "differs from the eager model" in res.output
    assert os.listdir(tmp_path) == [art.name]


def test_not_an_artifact_and_a_missing_folder_exit_2(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    res = run("export", tmp_path / "plain.pt", "-o", tmp_path / "m.pt2")
    assert res.exit_code == 2 and "not a tokenopt artifact" in res.output
    art = saved(tmp_path, "tome")
    res = run("export", art, "-o", tmp_path / "nope" / "m.pt2")
    assert res.exit_code == 2 and "output folder does not exist" in res.output


@pytest.mark.slow
def test_hugging_face_vit_exports(tmp_path):
    """A Hugging Face ViT (captured with torch.export) optimized, saved, exported: the program returns
    the same ModelOutput fields as eager."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=10)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    model, _ = tokenopt.sources.load_model(f"hf:{tmp_path / 'vit'}")
    fast = tokenopt.optimize(model, {"version": 1, "rules": RECIPES["tome"]}, torch.randn(2, 3, 32, 32))
    tokenopt.save(fast, tmp_path / "vit.tokenopt.pt")
    res = deploy.export_artifact(tmp_path / "vit.tokenopt.pt", tmp_path / "vit.pt2")
    assert res.dynamic_batch and res.max_abs_diff <= 1e-5
    x = batch(4)
    got = torch.export.load(tmp_path / "vit.pt2").module()(x)
    with torch.no_grad():
        torch.testing.assert_close(got.logits, fast(x).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_spa_selection_breaks_ties_in_onnx_as_in_eager(tmp_path):
    """ONNX has no stable sort: under deploy.export_onnx the selection orders by TopK, whose ties
    go to the lower index, as the stable sort's do. Many tied probabilities, a cap below the count
    at the threshold: which tied tokens stay must not change."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tokenopt.ops.gates import select_tokens

    class Select(torch.nn.Module):
        def forward(self, prob):
            valid = torch.ones_like(prob, dtype=torch.bool)
            return select_tokens(prob, valid, 1, 0.5, 2, 5).to(torch.int64)

    prob = torch.tensor([[0.9, 0.7, 0.7, 0.7, 0.2, 0.7, 0.7, 0.7, 0.7, 0.6],
                         [0.1, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]])
    want = Select()(prob)
    assert want[0].tolist() == [1, 1, 1, 1, 0, 1, 1, 0, 0, 0]       # 5 of the 0.7s: the first five
    assert want[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]       # none at 0.5: lo = 2, the first two
    program, _ = deploy.export_onnx(Select(), prob, dynamic_batch=False)
    program.save(str(tmp_path / "s.onnx"))
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: prob.numpy()})[0]
    assert got.tolist() == want.tolist()
