"""Demo models: architecture strings, the train-once cache, and (slow) the accuracy they reach."""
import json

import pytest
import torch

from tokenopt import demo
from tokenopt.data import get_dataset, get_loader
from tokenopt.errors import ModelLoadError, TokenoptError
from tokenopt.train import evaluate

TINY = demo.DemoSpec(
    dataset="digits", timm_name="vit_small_patch16_224",
    timm_kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10),
    epochs=1, batch_size=128, lr=3e-3, warmup_epochs=0.2,
)


def test_arch_string_round_trips_and_rebuilds_the_model():
    kwargs = dict(img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=4, num_classes=10,
                  class_token=False, global_pool="avg", mlp_ratio=2.5)
    arch = demo.format_arch("vit_small_patch16_224", kwargs)
    assert arch == ("timm:vit_small_patch16_224?img_size=64&patch_size=8&embed_dim=96&depth=2&num_heads=4"
                    "&num_classes=10&class_token=false&global_pool=avg&mlp_ratio=2.5")
    assert demo.parse_arch(arch) == ("vit_small_patch16_224", kwargs)
    model = demo.build_arch(arch)
    assert model.patch_embed.img_size == (64, 64) and len(model.blocks) == 2 and model.num_prefix_tokens == 0
    with pytest.raises(ModelLoadError, match="timm:NAME"):
        demo.parse_arch("vit_small_patch16_224")
    with pytest.raises(ModelLoadError, match="bad keyword argument 'depth'"):
        demo.parse_arch("timm:vit_small_patch16_224?depth")


def test_demo_model_trains_once_then_comes_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setitem(demo.DEMOS, "tiny", TINY)
    model, info = demo.demo_model("tiny", cache_dir=tmp_path, quiet=True)
    files = sorted(p.name for p in (tmp_path / "demos").iterdir())
    assert files == ["tiny.json", "tiny.safetensors"]
    assert info["arch"].startswith("timm:vit_small_patch16_224?img_size=16&patch_size=8")
    assert info["dataset"] == "digits" and info["test"]["n"] == 360 and 0 <= info["test"]["top1"] <= 1
    assert json.loads((tmp_path / "demos" / "tiny.json").read_text())["test"] == info["test"]
    assert not model.training

    # timm's data config now describes the demo's real input, not vit_small's 224 px
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 16, 16) and cfg["mean"] == (0.5, 0.5, 0.5)

    def no_training(*a, **k):
        raise AssertionError("the cached model should have been reused")

    monkeypatch.setattr(demo, "_train_demo", no_training)
    again, info2 = demo.demo_model("tiny", cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert info2["test"] == info["test"] and info2["weights"].endswith("tiny.safetensors")
    assert resolve_data_config({}, model=again)["input_size"] == (3, 16, 16)

    # a changed recipe must not reuse stale weights
    monkeypatch.setitem(demo.DEMOS, "tiny", demo.DemoSpec(**{**TINY.__dict__, "lr": 1e-3}))
    with pytest.raises(AssertionError, match="should have been reused"):
        demo.demo_model("tiny", cache_dir=tmp_path)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path / "tc"))
    assert demo.default_cache_dir() == tmp_path / "tc"
    monkeypatch.delenv("TOKENOPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache_dir() == tmp_path / "xdg" / "tokenopt"


def test_unknown_demo_is_a_user_error():
    with pytest.raises(TokenoptError, match="unknown demo model 'mnist'.*digits-clutter"):
        demo.demo_model("mnist")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "digits-clutter"])
def test_demo_models_reach_their_accuracy(name):
    # uses the user's cache ($TOKENOPT_CACHE or ~/.cache/tokenopt): trains only the first time
    model, info = demo.demo_model(name, quiet=True)
    spec = demo.DEMOS[name]
    test = get_dataset(spec.dataset, "test", spec.image_size, demo.MEAN, demo.STD)
    measured = evaluate(model, get_loader(test, 256, train=False))
    assert measured["n"] == 360
    assert measured["top1"] == pytest.approx(info["test"]["top1"])
    assert measured["top1"] >= spec.min_top1


def test_loading_a_demo_spec_reads_the_cache_and_never_trains(tmp_path, monkeypatch):
    from tokenopt import sources

    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path))
    monkeypatch.setitem(demo.DEMOS, "tiny", TINY)
    with pytest.raises(ModelLoadError, match=r"demo:tiny is not trained yet(.|\n)*`tokenopt demo --model tiny`"):
        sources.load_model("demo:tiny")
    assert not (tmp_path / "demos").exists()                 # nothing was trained or written

    trained, _ = demo.demo_model("tiny", quiet=True)         # what `tokenopt demo --model tiny` does

    def no_training(*a, **k):
        raise AssertionError("loading a demo spec must not train")

    monkeypatch.setattr(demo, "_train_demo", no_training)
    model, base = sources.load_model("demo:tiny")
    assert base == {"kind": "demo", "name": "tiny"} and not model.training
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values()))

    # weights trained from another spec are stale: refused, not reused
    monkeypatch.setitem(demo.DEMOS, "tiny", demo.DemoSpec(**{**TINY.__dict__, "lr": 1e-3}))
    with pytest.raises(ModelLoadError, match="not trained yet"):
        sources.load_model("demo:tiny")
    with pytest.raises(ModelLoadError, match="unknown demo model 'mnist'"):
        sources.load_model("demo:mnist")


def test_cli_on_an_untrained_demo_is_exit_2_with_the_command_to_run(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tokenopt.cli import app

    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path))
    res = CliRunner().invoke(app, ["inspect", "demo:digits-clutter"])
    assert res.exit_code == 2, res.output
    assert "tokenopt demo --model digits-clutter" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "demos").exists()
