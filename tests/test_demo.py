"""Demo models: architecture strings, the train-once cache, the shipped weights (sha256-checked), and (slow) the accuracy they reach."""
import json

import pytest
import torch

from tokenopt import demo
from tokenopt.data import get_dataset, get_loader
from tokenopt.demo_specs import DEMO_METHODS, MethodSpec
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

    # a demo that neither the cache nor the package has (the shipped ones always load: see below)
    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path))
    monkeypatch.setitem(demo.DEMOS, "tiny", TINY)
    res = CliRunner().invoke(app, ["inspect", "demo:tiny"])
    assert res.exit_code == 2, res.output
    assert "tokenopt demo --model tiny" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "demos").exists()


def test_the_shipped_demo_weights_load_with_an_empty_cache_and_keep_their_accuracy(tmp_path, monkeypatch):
    """The package data itself: every demo model and method ships for the current specs, and reading it back
    (float16 -> float32) gives the test top-1 the manifest recorded at training time."""
    from tokenopt import demo_methods, demo_shipped, sources

    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path))
    manifest = demo_shipped.read_manifest()
    from tokenopt.demo_specs import MAIN_DEMOS

    assert sorted(manifest["models"]) == sorted(MAIN_DEMOS)     # the demos `tokenopt demo` runs by default
    assert {n: sorted(m) for n, m in manifest["methods"].items()} == \
        {n: sorted(s.recipe for s in DEMO_METHODS[n]) for n in MAIN_DEMOS}
    assert sum((demo_shipped.SHIPPED_DIR / f).stat().st_size for f in manifest["files"]) < 5e6
    monkeypatch.setattr(demo, "_train_demo", lambda *a, **k: pytest.fail("the shipped weights should serve"))
    monkeypatch.setattr(demo_methods, "_train", lambda *a, **k: pytest.fail("the shipped parts should serve"))
    model, base = sources.load_model("demo:digits")
    assert base == {"kind": "demo", "name": "digits"} and not (tmp_path / "demos").exists()
    test = get_dataset("digits", "test", model=model)
    loader = get_loader(test, 256, train=False)
    assert evaluate(model, loader)["top1"] == manifest["models"]["digits"]["info"]["test"]["top1"]
    example = next(iter(loader))[0][:2]
    for spec in DEMO_METHODS["digits"]:
        gm, info = demo_methods.demo_method("digits", model, spec.recipe, example)
        assert info["shipped"] and evaluate(gm, loader)["top1"] == info["test"]["top1"], spec.recipe


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "digits-clutter"])
def test_retraining_lands_in_the_accuracy_band_of_the_shipped_weights(name, tmp_path):
    """`tokenopt demo --retrain` from scratch (minutes per model): the demo model and each method reach the
    shipped weights' test top-1 within 5 points (digits-clutter's seeds 0 and 1 differ by 4)."""
    from tokenopt import demo_methods, demo_shipped

    shipped = demo_shipped.read_manifest()
    model, info = demo.demo_model(name, cache_dir=tmp_path, force=True, quiet=True)
    assert info["test"]["top1"] == pytest.approx(shipped["models"][name]["info"]["test"]["top1"], abs=0.05)
    test = get_dataset(demo.DEMOS[name].dataset, "test", model=model)
    example = torch.stack([test[i][0] for i in range(2)])
    for spec in DEMO_METHODS[name]:
        _, got = demo_methods.demo_method(name, model, spec.recipe, example, cache_dir=tmp_path, force=True)
        want = shipped["methods"][name][spec.recipe]["info"]["test"]["top1"]
        assert got["test"]["top1"] == pytest.approx(want, abs=0.05), spec.recipe


# ------------------------------------------------------------------------------------------------
# Shipped weights: the package data `tokenopt demo` uses without training, checked by sha256.

TINY_METHODS = (MethodSpec("tosa-keep50", epochs=0), MethodSpec("spa-bypass-second-half", epochs=0))


@pytest.fixture(scope="module")
def _tiny_package(tmp_path_factory):
    """A tiny demo model and two methods trained into a cache, then shipped into a package folder of their own
    (once per module: training is the slow part)."""
    from tokenopt import demo_methods
    from tokenopt.demo_package import ship_demo_weights

    root = tmp_path_factory.mktemp("shipped")
    cache, package = root / "cache", root / "package"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(demo.DEMOS, "tiny", TINY)
        mp.setitem(DEMO_METHODS, "tiny", TINY_METHODS)
        model, info = demo.demo_model("tiny", cache_dir=cache, quiet=True)
        example = torch.stack([get_dataset("digits", "test", 16, demo.MEAN, demo.STD)[i][0] for i in range(2)])
        trained = {m.recipe: demo_methods.demo_method("tiny", model, m.recipe, example, cache_dir=cache)
                   for m in TINY_METHODS}
        rows = ship_demo_weights(cache, package, names=["tiny"])
    return {"model": model, "info": info, "trained": trained, "rows": rows, "package": package, "example": example}


@pytest.fixture
def shipped_tiny(_tiny_package, tmp_path, monkeypatch):
    """The package of :func:`_tiny_package`, copied (a test may damage it) and installed as the shipped weights,
    with an empty cache."""
    import shutil

    from tokenopt import demo_shipped

    package = tmp_path / "package"
    shutil.copytree(_tiny_package["package"], package)
    monkeypatch.setitem(demo.DEMOS, "tiny", TINY)
    monkeypatch.setitem(DEMO_METHODS, "tiny", TINY_METHODS)
    monkeypatch.setattr(demo_shipped, "SHIPPED_DIR", package)
    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path / "empty-cache"))
    return {**_tiny_package, "package": package}


def test_shipping_writes_float16_files_listed_with_their_sha256(shipped_tiny):
    from tokenopt import demo_shipped

    package = shipped_tiny["package"]
    assert sorted(p.name for p in package.iterdir()) == [
        "manifest.json", "tiny.safetensors", "tiny.spa-bypass-second-half.safetensors",
        "tiny.spa-bypass-second-half.yaml", "tiny.tosa-keep50.safetensors", "tiny.tosa-keep50.yaml"]
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["files"] == {n: demo_shipped.sha256_of(package / n) for n in manifest["files"]}
    assert len(manifest["files"]) == 5 and manifest["models"]["tiny"]["spec_digest"] == TINY.digest()
    from safetensors.torch import load_file
    stored = load_file(str(package / "tiny.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    # top-1 read back from float16 is the cached float32 one, for the model and each method
    assert [(r["method"], r["shipped"]) for r in shipped_tiny["rows"]] == \
        [(r["method"], r["cached"]) for r in shipped_tiny["rows"]]
    assert [r["method"] for r in shipped_tiny["rows"]] == ["", "tosa-keep50", "spa-bypass-second-half"]


def test_loading_uses_the_shipped_weights_and_never_trains(shipped_tiny, monkeypatch):
    from tokenopt import demo_methods, sources

    def no_training(*a, **k):
        raise AssertionError("shipped weights should have been used")

    monkeypatch.setattr(demo, "_train_demo", no_training)
    monkeypatch.setattr(demo_methods, "_train", no_training)
    model, _ = sources.load_model("demo:tiny")
    for k, v in shipped_tiny["model"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v.half().float() if v.is_floating_point() else v), k
    again, info = demo.demo_model("tiny")
    assert info["shipped"] and info["test"] == shipped_tiny["info"]["test"]

    gm, minfo = demo_methods.demo_method("tiny", again, "spa-bypass-second-half", shipped_tiny["example"])
    assert minfo["shipped"] and minfo["test"]["n"] == 360
    gates = demo_methods.learned_state(gm)
    want = demo_methods.learned_state(shipped_tiny["trained"]["spa-bypass-second-half"][0])
    assert sorted(gates) == sorted(want) and any(k.endswith(".trained") for k in gates)
    assert all(torch.equal(gates[k], want[k].half().float() if want[k].is_floating_point() else want[k]) for k in want)


def test_the_recipe_stored_beside_the_parts_is_used_not_the_shipped_one(shipped_tiny, monkeypatch, tmp_path):
    from tokenopt import demo_methods
    from tokenopt.record import record_of

    # a later edit of recipes/tosa-keep50.yaml (another keep) must not reach the shipped selectors
    edited = tmp_path / "recipes"
    edited.mkdir()
    (edited / "tosa-keep50.yaml").write_text("version: 1\nrules:\n  - {pass: tosa, layers: second-half, keep: 0.25}\n")
    monkeypatch.setattr(demo_methods, "SHIPPED_RECIPES", edited)
    monkeypatch.setattr(demo_methods, "_train", lambda *a, **k: pytest.fail("the shipped selectors should serve"))
    model, _ = demo.demo_model("tiny")
    gm, _ = demo_methods.demo_method("tiny", model, "tosa-keep50", shipped_tiny["example"])
    assert record_of(gm).recipe.rules[0].options.keep == 0.5


def test_a_damaged_shipped_file_is_one_message_and_exit_2(shipped_tiny):
    from typer.testing import CliRunner

    from tokenopt import sources
    from tokenopt.cli import app

    weights = shipped_tiny["package"] / "tiny.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"tiny.safetensors has sha256 [0-9a-f]{16}\.\.\., not [0-9a-f]{16}"):
        sources.load_model("demo:tiny")
    res = CliRunner().invoke(app, ["inspect", "demo:tiny"])
    assert res.exit_code == 2, res.output
    assert "is damaged or was changed" in res.output and "tokenopt demo --retrain" in res.output
    assert "Traceback" not in res.output


def test_demo_prints_the_trained_methods_and_tokens_kept_per_image(shipped_tiny, monkeypatch):
    from typer.testing import CliRunner

    from tokenopt import demo_methods
    from tokenopt.cli import app

    monkeypatch.setattr(demo_methods, "_train", lambda *a, **k: pytest.fail("the shipped parts should serve"))
    res = CliRunner().invoke(app, ["demo", "-m", "tiny", "-r", "tome-r8", "-r", "tosa-keep50",
                                   "-r", "spa-bypass-second-half"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in res.output.splitlines() if line.startswith("│")}
    assert list(rows) == ["original", "tome-r8", "tosa-keep50", "spa-bypass-second-half"]
    assert rows["tome-r8"][-1] == "" and rows["tosa-keep50"][-1] == ""
    lo, mean, hi = (float(v) for v in rows["spa-bypass-second-half"][-1].split("/"))
    assert 1 <= lo <= mean <= hi <= 5     # TINY: 4 patch tokens + the class token
    caption = " ".join(res.output.split())      # the caption wraps at the table's width
    assert "Trained parts: tosa-keep50 (shipped), spa-bypass-second-half (shipped)." in caption
    assert "tokens kept/img: of the 5 per image, those that run a gated block" in caption


def test_the_demos_run_by_default_are_the_ones_shipped_trained():
    """`tokenopt demo` without --model must not train anything: every default demo ships its weights."""
    from tokenopt import demo_shipped
    from tokenopt.demo_specs import DEMOS, MAIN_DEMOS

    assert set(MAIN_DEMOS) <= set(DEMOS)
    for name in MAIN_DEMOS:
        assert demo_shipped.model_entry(name, DEMOS[name].digest()) is not None, name
    unshipped = [n for n in DEMOS if demo_shipped.model_entry(n, DEMOS[n].digest()) is None]
    assert unshipped and not set(unshipped) & set(MAIN_DEMOS)
