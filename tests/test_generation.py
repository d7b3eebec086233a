"""The demo generators: the DDIM sampler, the cache behind demo:digits-dit / demo:digits-unet, and
digits-FID written from its definition."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tokenopt.errors import ModelLoadError  # noqa: E402
from tokenopt.generation import fid, schedule  # noqa: E402
from tokenopt.sources.generator_models import DIT, build, call_inputs, class_count, example_of, predicted_noise  # noqa: E402
from tokenopt.sources.generator_specs import GENERATORS, GeneratorSpec  # noqa: E402

TINY_DIT = {**DIT, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}


def tiny_dit():
    torch.manual_seed(0)
    return build("DiTTransformer2DModel", TINY_DIT)


def sampler_of(model, label: int):
    example = example_of(model)

    def predict(x, t):
        args, kwargs = call_inputs(example, x, t, torch.full((len(x),), label))
        return predicted_noise(model(*args, **kwargs))
    return predict


def test_ddim_timesteps_run_from_the_noisiest_evenly():
    assert schedule.ddim_timesteps(4) == [999, 749, 499, 249]
    assert len(schedule.ddim_timesteps(50)) == 50 and schedule.ddim_timesteps(50)[-1] == 19
    with pytest.raises(ValueError):
        schedule.ddim_timesteps(0)


def test_add_noise_is_the_ddpm_forward_process():
    abar = schedule.alphas_cumprod()
    assert abar[0].item() == pytest.approx(1 - 1e-4) and abar[-1].item() < 1e-4
    x0, eps = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([0, 999])
    out = schedule.add_noise(x0, eps, t, abar)
    for i in range(2):
        a = abar[t[i]].item()
        assert torch.allclose(out[i], torch.full((1, 2, 2), a ** 0.5 + 2 * (1 - a) ** 0.5))


def test_ddim_with_a_perfect_noise_guess_returns_the_image_it_came_from():
    # if the predicted noise is exactly the noise in x_t, x0_hat is exact at the first step and every
    # later step keeps it: DDIM then returns the clean image (up to the clamp)
    x0 = torch.rand(1, 1, 4, 4) - 0.5
    start = torch.randn((1, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    abar = schedule.alphas_cumprod()
    a = abar[999].item()
    x0_true = (start - (1 - a) ** 0.5 * start) / a ** 0.5  # what this start means if the noise is `start`

    def predict(x, t):
        at = abar[t[0]].item()
        return (x - at ** 0.5 * x0_true.clamp(-1.5, 1.5)) / (1 - at) ** 0.5
    out = schedule.ddim_sample(predict, (1, 1, 4, 4), steps=5, seed=3)
    assert torch.allclose(out, x0_true.clamp(-1.5, 1.5), atol=1e-5)


def test_sampler_is_deterministic_under_a_seed_and_the_seed_matters():
    model = tiny_dit()
    a = schedule.ddim_sample(sampler_of(model, 3), (2, 1, 32, 32), steps=3, seed=0)
    b = schedule.ddim_sample(sampler_of(model, 3), (2, 1, 32, 32), steps=3, seed=0)
    c = schedule.ddim_sample(sampler_of(model, 3), (2, 1, 32, 32), steps=3, seed=1)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


def test_generators_know_their_classes():
    assert class_count(example_of(tiny_dit())) == 10
    assert class_count(example_of(torch.nn.Linear(2, 2))) is None
    assert set(GENERATORS) == {"digits-dit", "digits-unet"}


def test_a_trained_generator_is_cached_and_loads_as_a_demo_spec(tmp_path, monkeypatch):
    from tokenopt.generation import train
    from tokenopt.sources import load_model

    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path))
    spec = GeneratorSpec("DiTTransformer2DModel", TINY_DIT, epochs=1, batch_size=512)
    monkeypatch.setitem(GENERATORS, "digits-dit", spec)
    with pytest.raises(ModelLoadError, match=r"python -m tokenopt.generation.train digits-dit"):
        load_model("demo:digits-dit")
    model, info = train.generator_model("digits-dit")
    assert info["train"]["steps"] == 3 and info["spec_digest"] == spec.digest()   # 1437 digits / 512
    loaded, base = load_model("demo:digits-dit")
    assert base == {"kind": "demo", "name": "digits-dit"}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # a spec changed after training makes the cache stale: refused, not silently used
    monkeypatch.setitem(GENERATORS, "digits-dit", GeneratorSpec("DiTTransformer2DModel", TINY_DIT, epochs=2))
    with pytest.raises(ModelLoadError, match="not trained yet"):
        load_model("demo:digits-dit")
    assert json.loads((tmp_path / "demos" / "digits-dit.json").read_text())["class"] == "DiTTransformer2DModel"


@pytest.fixture(scope="module")
def _shipped_tiny_dit(tmp_path_factory):
    """A tiny digits-dit trained into a cache and shipped into a package folder of its own (once per module)."""
    from tokenopt.generation import train
    from tokenopt.generation.package import ship_generators

    root = tmp_path_factory.mktemp("gen-shipped")
    spec = GeneratorSpec("DiTTransformer2DModel", TINY_DIT, epochs=1, batch_size=512)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(GENERATORS, "digits-dit", spec)
        model, _ = train.generator_model("digits-dit", cache_dir=root / "cache", quiet=True)
        rows = ship_generators(root / "cache", root / "package", ["digits-dit"], samples=10, steps=2)
    return {"spec": spec, "model": model, "rows": rows, "package": root / "package"}


@pytest.fixture
def shipped_tiny_dit(_shipped_tiny_dit, tmp_path, monkeypatch):
    """That package copied (a test may damage it) and installed as the shipped generators, with an empty cache."""
    import shutil

    from tokenopt.sources import generator_specs as specs

    package = tmp_path / "package"
    shutil.copytree(_shipped_tiny_dit["package"], package)
    monkeypatch.setitem(GENERATORS, "digits-dit", _shipped_tiny_dit["spec"])
    monkeypatch.setattr(specs, "SHIPPED_DIR", package)
    monkeypatch.setenv("TOKENOPT_CACHE", str(tmp_path / "empty-cache"))
    return {**_shipped_tiny_dit, "package": package}


def test_a_shipped_generator_is_float16_listed_with_its_sha256_and_loads_with_an_empty_cache(shipped_tiny_dit,
                                                                                            monkeypatch):
    from safetensors.torch import load_file

    from tokenopt import demo_shipped
    from tokenopt.generation import train
    from tokenopt.sources import load_model

    package = shipped_tiny_dit["package"]
    assert sorted(p.name for p in package.iterdir()) == ["digits-dit.safetensors", "manifest.json"]
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["files"] == {"digits-dit.safetensors": demo_shipped.sha256_of(package / "digits-dit.safetensors")}
    entry = manifest["models"]["digits-dit"]
    assert entry["spec_digest"] == shipped_tiny_dit["spec"].digest() and entry["info"]["samples"]["n"] == 10
    assert {v.dtype for v in load_file(str(package / "digits-dit.safetensors")).values()} == {torch.float16}
    [row] = shipped_tiny_dit["rows"]
    assert row["name"] == "digits-dit" and row["changed"] == 0.0 and row["shipped"] == row["cached"]

    monkeypatch.setattr(train, "train_generator", lambda *a, **k: pytest.fail("the shipped weights should serve"))
    loaded, base = load_model("demo:digits-dit")
    assert base == {"kind": "demo", "name": "digits-dit"}
    for k, v in shipped_tiny_dit["model"].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    # a spec changed after shipping: the shipped weights are stale, not used
    monkeypatch.setitem(GENERATORS, "digits-dit", GeneratorSpec("DiTTransformer2DModel", TINY_DIT, epochs=2))
    with pytest.raises(ModelLoadError, match="none shipped for its spec"):
        load_model("demo:digits-dit")


def test_a_damaged_shipped_generator_is_one_message_and_exit_2(shipped_tiny_dit):
    from typer.testing import CliRunner

    from tokenopt.cli import app
    from tokenopt.sources import load_model

    weights = shipped_tiny_dit["package"] / "digits-dit.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"digits-dit.safetensors has sha256 [0-9a-f]{16}\.\.\., not [0-9a-f]{16}"):
        load_model("demo:digits-dit")
    res = CliRunner().invoke(app, ["inspect", "demo:digits-dit"])
    assert res.exit_code == 2, res.output
    assert "is damaged or was changed" in res.output
    assert "python -m tokenopt.generation.train digits-dit" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------- FID

def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(fid.frechet_distance(feats, feats)) < 1e-8


def test_fid_of_gaussians_matches_the_closed_form():
    # N(0, I) against N(m, s^2 I) in d dims: |m|^2 + d (1 + s^2 - 2 s); large samples get close to it
    rng = np.random.default_rng(1)
    d, m, s = 4, 0.5, 2.0
    a = rng.normal(size=(200_000, d))
    b = rng.normal(loc=m, scale=s, size=(200_000, d))
    assert fid.frechet_distance(a, b) == pytest.approx(d * m * m + d * (1 + s * s - 2 * s), rel=0.02)


def test_fid_grows_with_the_shift_and_is_symmetric():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(1000, 6)), rng.normal(size=(1000, 6))
    shifts = [fid.frechet_distance(a, b + k) for k in (0.0, 0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts) and shifts[0] < 0.1
    assert shifts[2] == pytest.approx(6.0, abs=0.3)    # |(1,...,1)|^2 = 6, covariances equal
    assert fid.frechet_distance(b, a) == pytest.approx(fid.frechet_distance(a, b), abs=1e-9)


def test_fid_refuses_mismatched_features():
    with pytest.raises(ValueError, match="same d"):
        fid.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_trained_generator_draws_the_asked_class_above_chance(name):
    """Needs demo:digits and the generator trained (tokenopt demo --model digits; python -m tokenopt.generation.train)."""
    from tokenopt.generation import quality
    from tokenopt.sources import load_model

    model, _ = load_model(f"demo:{name}")
    gen = quality.generator_of(model)
    labels = quality.balanced_labels(100, 10)
    images = quality.sample(model, gen, labels, steps=25, seed=0)
    _, classes = fid.features_and_classes(fid.digits_classifier(), images)
    assert (classes == labels.numpy()).mean() > 0.3    # chance: 0.1


def test_a_dit_as_wide_as_its_token_count_is_not_taken_for_rope():
    # demo:digits-dit: 64 channels on 64 patches. adaLN's scale (B, 1, 64) multiplies the normed tokens
    # before q/k; its channel axis has the token count's size, which once read as a RoPE table
    from tokenopt.analysis import analyse

    torch.manual_seed(0)
    model = build("DiTTransformer2DModel", {**DIT, "num_layers": 1})
    blocks = analyse(model).blocks
    assert [b.tokens for b in blocks] == [64] and blocks[0].refusal is None
