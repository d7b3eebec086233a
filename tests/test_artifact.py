"""Artifacts: one weights_only-loadable file that rebuilds the optimized model bit for bit."""
from __future__ import annotations

import os

import pytest
import torch

import tokenopt
from tokenopt import artifact, sources
from tokenopt.errors import ModelLoadError, TokenoptError
from tokenopt.pipeline import optimize
from tokenopt.record import record_of, update_record


@pytest.fixture(scope="module")
def optimized(tiny_vit_spec, tome_recipe):
    model, base = sources.load_model(tiny_vit_spec)
    gm = optimize(model, tome_recipe)
    update_record(gm, base=base)
    return gm


@pytest.fixture(scope="module")
def saved(optimized, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "vit.tokenopt.pt"
    artifact.save(optimized, path)
    return path


def batch(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_round_trip_is_bit_exact(optimized, saved):
    loaded = tokenopt.load(saved)
    x = batch()
    with torch.no_grad():
        assert torch.equal(optimized(x), loaded(x))
    assert not loaded.training
    assert record_of(loaded).recipe.to_dict() == record_of(optimized).recipe.to_dict()
    assert [r.tokens_out for r in record_of(loaded).report.rows] == [15, 13]


def test_file_is_plain_data(saved, tiny_vit_spec):
    payload = torch.load(saved, weights_only=True)
    assert payload["format"] == "tokenopt-artifact" and payload["format_version"] == 1
    assert payload["recipe"]["rules"] == [{"pass": "tome", "layers": "all", "r": 2, "prop_attn": True,
                                          "order": "original"}]
    m = payload["manifest"]
    assert m["tokenopt"] == tokenopt.__version__ and m["torch"] == str(torch.__version__)
    assert sources.base_to_spec(m["base"]) == tiny_vit_spec
    assert m["example_input_shape"] == [2, 3, 32, 32] and m["outputs"] == "logits"
    assert m["report"]["rows"][0]["tokens_out"] == 15
    assert "blocks.0.attn.qkv.weight" in payload["state_dict"]


def test_saved_weights_are_the_optimized_ones(optimized, saved):
    # a fresh timm model has other random weights: load must replace them all
    loaded = artifact.load(saved)
    for k, v in optimized.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_class_fallback_without_base(user_models, tome_recipe, tmp_path):
    from tokenopt_user_models import TinyViT

    gm = optimize(TinyViT().eval(), tome_recipe)
    path = artifact.save(gm, tmp_path / "own.pt")
    assert torch.load(path, weights_only=True)["manifest"]["base"] == {
        "kind": "class", "class": "tokenopt_user_models:TinyViT"}
    x = batch()
    with torch.no_grad():
        assert torch.equal(gm(x), artifact.load(path)(x))


def test_class_that_needs_arguments_asks_for_arch(user_models, tome_recipe, tmp_path):
    from tokenopt_user_models import WideViT

    gm = optimize(WideViT(48).eval(), tome_recipe)
    path = artifact.save(gm, tmp_path / "wide.pt")
    with pytest.raises(ModelLoadError) as e:
        artifact.load(path)
    msg = str(e.value)
    assert str(path) in msg and "WideViT" in msg and "arch=" in msg
    x = batch()
    with torch.no_grad():
        want = gm(x)
        assert torch.equal(artifact.load(path, arch="tokenopt_user_models:WideViT?dim=48")(x), want)
        assert torch.equal(artifact.load(path, arch=WideViT(48))(x), want)


def test_wrong_arch_is_a_clear_error(saved):
    with pytest.raises(ModelLoadError, match="(?s)do not fit the architecture VisionTransformer: 12 missing: blocks.2.*arch="):
        artifact.load(saved, arch="timm:vit_small_patch16_224?img_size=32&patch_size=8&depth=3&num_classes=10")


def test_save_needs_an_optimized_module(tmp_path):
    with pytest.raises(TokenoptError, match="not an optimized module"):
        artifact.save(torch.nn.Linear(2, 2), tmp_path / "x.pt")
    assert os.listdir(tmp_path) == []


def test_save_into_missing_folder(optimized, tmp_path):
    with pytest.raises(TokenoptError, match="output folder does not exist"):
        artifact.save(optimized, tmp_path / "missing" / "x.pt")
    assert not (tmp_path / "missing").exists()


def test_failed_save_leaves_no_file(optimized, tmp_path, monkeypatch):
    target = tmp_path / "x.pt"

    def broken_save(obj, f, *a, **k):
        f.write(b"half of a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        artifact.save(optimized, target)
    assert os.listdir(tmp_path) == []


def test_not_an_artifact(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(ModelLoadError, match="not a tokenopt artifact"):
        artifact.load(path)


def test_newer_format_version_is_refused(saved, tmp_path):
    payload = torch.load(saved, weights_only=True)
    payload["format_version"] = 99
    path = tmp_path / "future.pt"
    torch.save(payload, path)
    with pytest.raises(ModelLoadError, match="format version 99.*Upgrade tokenopt"):
        artifact.load(path)


# ------------------------------------------------------------------------------ a base that rebuilds exactly

SMALL_KW = dict(img_size=64, depth=4, num_classes=3)
SMALL_ARCH = "timm:vit_small_patch16_224?img_size=64&depth=4&num_classes=3"


@pytest.fixture(scope="module")
def python_built(tome_recipe):
    """What a user writes: a timm model made in Python (no spec, no pretrained weights), optimized."""
    import timm

    model = timm.create_model("vit_small_patch16_224", **SMALL_KW).eval()
    return tokenopt.optimize(model, tome_recipe, torch.randn(2, 3, 64, 64))


def test_save_refuses_a_base_that_rebuilds_another_model(python_built, tmp_path):
    # recorded as its class alone, it would rebuild timm's default: 224 px, 12 blocks, 1000 classes
    with pytest.raises(ModelLoadError) as e:
        tokenopt.save(python_built, tmp_path / "small.pt")
    msg = str(e.value)
    assert msg.startswith(f"cannot save {tmp_path / 'small.pt'}: its manifest would rebuild the base model as "
                          "timm.models.vision_transformer:VisionTransformer called with no arguments")
    assert "96 extra: blocks.4.norm1.weight" in msg and "pos_embed (1, 17, 384) vs (1, 197, 768)" in msg
    assert 'arch="timm:vit_small_patch16_224?' in msg and "--arch" in msg
    assert os.listdir(tmp_path) == []


def test_save_with_arch_loads_the_same_model(python_built, tmp_path):
    path = tokenopt.save(python_built, tmp_path / "small.pt", arch=SMALL_ARCH)
    assert sources.base_to_spec(torch.load(path, weights_only=True)["manifest"]["base"]) == SMALL_ARCH
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(tokenopt.load(path)(x), python_built(x))
    with pytest.raises(ModelLoadError, match="timm could not build"):   # a named arch that cannot be built
        tokenopt.save(python_built, tmp_path / "bad.pt", arch="timm:vit_small_patch16_224?depth=x")


def test_model_loaded_from_a_spec_records_its_base(tome_recipe, tmp_path):
    model, _ = sources.load_model(SMALL_ARCH)
    fast = tokenopt.optimize(model, tome_recipe, torch.randn(2, 3, 64, 64))
    path = tokenopt.save(fast, tmp_path / "spec.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tokenopt.load(path)(x), fast(x))


def test_an_artifact_whose_base_rebuilds_otherwise_asks_for_arch(python_built, tmp_path):
    """Files written before save checked: the replay fails, and the message names arch=, not --input-size."""
    path = tokenopt.save(python_built, tmp_path / "small.pt", arch=SMALL_ARCH)
    payload = torch.load(path, weights_only=True)
    payload["manifest"]["base"] = {"kind": "class", "class": "timm.models.vision_transformer:VisionTransformer"}
    torch.save(payload, path)
    with pytest.raises(TokenoptError) as e:
        tokenopt.load(path)
    msg = str(e.value)
    assert f"replaying the recipe saved in {path} failed" in msg
    assert "pass arch= (CLI: --arch) naming its architecture" in msg and "--input-size" not in msg
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(tokenopt.load(path, arch=SMALL_ARCH)(x), python_built(x))


class _WithConstant(torch.nn.Module):
    """A forward that makes a tensor from no input: fx stores it as ``_tensor_constantN`` on the module traced."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.proj(x) + torch.ones(3)


def test_tracing_leaves_the_users_model_as_it_was():
    from tokenopt.trace import trace

    m = _WithConstant()
    first, second = trace(m), trace(m)
    names = [[n.target for n in g.graph.nodes if n.op == "get_attr"] for g in (first, second)]
    # a second trace names its constant as a fresh model's first trace does (artifacts rebuild from a fresh model)
    assert names == [["_tensor_constant0"], ["_tensor_constant0"]]
    assert not [k for k in vars(m) if k.startswith("_tensor_constant")]
    x = torch.randn(2, 3)
    assert torch.equal(second(x), m(x))


def test_an_artifact_of_a_second_optimize_of_the_same_swin_loads(tmp_path):
    """Swin's forward makes tensors from no input; optimizing the same model twice in a process used to save
    an artifact naming ``_tensor_constant5`` that the rebuilt base does not have."""
    spec = ("timm:swin_tiny_patch4_window7_224?img_size=64&embed_dim=16&depths=2,2&num_heads=1,2&window_size=4"
            "&num_classes=3")
    model, _ = sources.load_model(spec)
    x = torch.randn(2, 3, 64, 64)
    recipe = {"version": 1, "rules": [{"pass": "tome", "r": 2, "layers": "stage2"}]}
    tokenopt.optimize(model, recipe, x)
    again = tokenopt.optimize(model, recipe, x)
    path = tokenopt.save(again, tmp_path / "swin.pt")
    with torch.no_grad():
        assert torch.allclose(tokenopt.load(path)(x), again(x), atol=1e-6)
