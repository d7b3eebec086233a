"""Loading the ViTs people have: hf:<dir> (save_pretrained folders), open_clip:<arch>, torchvision:<name>.

Every folder and checkpoint is written by the test from a tiny random-init config; the network is
cut off for the whole module, so a loader that tried to download would fail here.
"""
from __future__ import annotations

import json
import shutil
import socket
import sys
import warnings

import pytest
import torch
from typer.testing import CliRunner

from tokenopt import sources
from tokenopt.cli import app
from tokenopt.errors import ModelLoadError
from tokenopt.record import record_of

try:
    import transformers
except ImportError:   # the [hf] extra is not installed: the Hugging Face tests skip, the rest run
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs transformers (pip install 'tokenopt[hf]')")

runner = CliRunner()
TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hf_models():
    """(folder name, model) of each Hugging Face family, tiny and random."""
    T = transformers
    torch.manual_seed(0)
    return {
        "vit": T.ViTForImageClassification(T.ViTConfig(**TINY, intermediate_size=64, num_labels=10)),
        "deit": T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**TINY, intermediate_size=64, num_labels=10)),
        "beit": T.BeitForImageClassification(T.BeitConfig(**TINY, intermediate_size=64, num_labels=10,
                                                          use_relative_position_bias=True)),
        "clip": T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**TINY, intermediate_size=64, projection_dim=16)),
        "clip-bare": T.CLIPVisionModel(T.CLIPVisionConfig(**TINY, intermediate_size=64)),
        "siglip": T.SiglipVisionModel(T.SiglipVisionConfig(**TINY, intermediate_size=64)),
        "dinov2": T.Dinov2Model(T.Dinov2Config(**TINY, mlp_ratio=2)),
        "dinov2-reg": T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**TINY, mlp_ratio=2,
                                                                              num_register_tokens=4)),
    }


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    if transformers is None:
        pytest.skip("needs transformers (pip install 'tokenopt[hf]')")
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, model in hf_models().items():
        model.eval().save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return [v for v in out.values() if isinstance(v, torch.Tensor)] if hasattr(out, "values") else [out]


@needs_hf
@pytest.mark.parametrize("name", ["vit", "deit", "beit", "clip", "clip-bare", "siglip", "dinov2", "dinov2-reg"])
def test_hf_folder_loads_the_saved_model(hf_dirs, name):
    folder, saved = hf_dirs[name]
    model, base = sources.load_model(f"hf:{folder}")
    assert type(model) is type(saved) and not model.training
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for got, want in zip(outputs(model, x), outputs(saved, x), strict=True):
        assert torch.equal(got, want)
    assert base["kind"] == "hf" and base["spec"] == f"hf:{folder}" and base["class"] == type(saved).__name__
    assert model.tokenopt_base is base
    assert sources.base_to_spec(base) == f"hf:{folder}"


@needs_hf
def test_hf_base_rebuilds_without_the_folder(hf_dirs, tmp_path):
    """An artifact stores the config: the base model is rebuilt even after the folder is gone."""
    folder, saved = hf_dirs["dinov2-reg"]
    moved = tmp_path / "copy"
    saved.save_pretrained(moved)
    model, base = sources.load_model(f"hf:{moved}")
    for f in moved.iterdir():
        f.unlink()
    moved.rmdir()
    rebuilt = sources.build_base(base)
    assert type(rebuilt) is type(model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(outputs(rebuilt.eval(), x)[0], outputs(model, x)[0])


@needs_hf
def test_multimodal_folder_gives_its_vision_tower(tmp_path):
    T = transformers
    torch.manual_seed(0)
    clip = T.CLIPModel(T.CLIPConfig(vision_config=dict(TINY, intermediate_size=64),
                                    text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                                     intermediate_size=16, vocab_size=50, max_position_embeddings=8),
                                    projection_dim=8)).eval()
    clip.save_pretrained(tmp_path / "clip")
    model, base = sources.load_model(f"hf:{tmp_path / 'clip'}")
    assert type(model).__name__ == "CLIPVisionModelWithProjection"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():   # CLIP's image embedding: the projected pooled output of its vision model
        assert torch.equal(model(x).image_embeds, clip.visual_projection(clip.vision_model(x).pooler_output))


@needs_hf
def test_hf_folder_without_weights_is_random_init(tmp_path):
    cfg = transformers.ViTConfig(**TINY, intermediate_size=64)
    cfg.architectures = ["ViTModel"]
    tmp_path.joinpath("config.json").write_text(cfg.to_json_string())
    model, _ = sources.load_model(f"hf:{tmp_path}")
    assert type(model).__name__ == "ViTModel"
    assert model.tokenopt_data_config == {"input_size": (3, 32, 32)}   # the config's image size


@needs_hf
def test_hf_weights_that_do_not_cover_the_class_are_an_error(tmp_path):
    transformers.ViTModel(transformers.ViTConfig(**TINY, intermediate_size=64)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["ViTForImageClassification"]   # the classifier is not in the weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"do not cover ViTForImageClassification: 2 missing, e.g. classifier"):
        sources.load_model(f"hf:{tmp_path}")


def test_hf_folder_without_config_exits_2_naming_it(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    res = run("inspect", f"hf:{tmp_path}")
    assert res.exit_code == 2
    assert f"{tmp_path} has no config.json" in res.output and "save_pretrained" in res.output
    assert "Traceback" not in res.output


def test_hf_unknown_architecture_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    res = run("inspect", f"hf:{tmp_path}")
    assert res.exit_code == 2
    assert "does not know how to build BertModel" in res.output and "Supported: ViT" in res.output


HF_REFUSED = {   # family -> (model, what the message must say about it)
    "swinv2": (lambda T: T.Swinv2ForImageClassification(T.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3)),
        ["Swinv2ForImageClassification is a Swin V2 model, not yet supported", "cosine attention",
         "continuous position bias", "Swin (v1) is supported"]),
    "vit_mae": (lambda T: T.ViTMAEModel(T.ViTMAEConfig(**TINY, intermediate_size=64)),
                ["ViTMAEModel is a ViTMAE (masked autoencoder), not supported",
                 "masks a random subset of the patches", "outputs change from one call to the next"]),
}


@needs_hf
@pytest.mark.parametrize("family", list(HF_REFUSED))
def test_hf_family_that_cannot_be_rewritten_says_why(tmp_path, family):
    make, says = HF_REFUSED[family]
    make(transformers).save_pretrained(tmp_path)
    res = run("inspect", f"hf:{tmp_path}")
    assert res.exit_code == 2 and "Traceback" not in res.output
    text = " ".join(res.output.split())    # rich wraps long lines
    for phrase in says:
        assert phrase in text
    assert "pass a factory" not in text and "does not know how to build" not in text


@needs_hf
def test_vitmae_through_a_factory_names_its_random_masking(tmp_path, monkeypatch):
    """fx cannot trace ViTMAE and export's check fails: because the model differs from itself, not the graph."""
    (tmp_path / "tokenopt_mae_factory.py").write_text(
        "import transformers as T\n\n\ndef mae():\n    return T.ViTMAEModel(T.ViTMAEConfig(image_size=32, "
        "patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = run("inspect", "tokenopt_mae_factory:mae")
    assert res.exit_code == 2 and "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert "cannot trace ViTMAEModel with torch.fx" in text
    assert "ViTMAEModel gives different outputs on two calls with the same input" in text
    assert "--capture fx" not in text and "does not reproduce" not in text


@needs_hf
def test_hf_folder_without_image_processor_warns_once(hf_dirs, tmp_path):
    from tokenopt.sources import SourceWarning

    folder, _ = hf_dirs["vit"]
    with pytest.warns(SourceWarning) as caught:
        sources.load_model(f"hf:{folder}")
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert msg.startswith(f"hf:{folder}: the folder has no preprocessor_config.json, so images will be "
                          "preprocessed with defaults: 32x32 (the config's image_size), bicubic resize, "
                          "crop_pct 0.875, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).")
    res = run("inspect", f"hf:{folder}")
    assert res.exit_code == 0 and res.output.count("warning: ") == 1
    assert "no preprocessor_config.json" in res.output
    processor_folder = tmp_path / "with-processor"     # the same model, with its image processor saved
    shutil.copytree(folder, processor_folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(processor_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SourceWarning)
        sources.load_model(f"hf:{processor_folder}")


@pytest.mark.parametrize("module,spec,extra", [("transformers", "hf:{dir}", "hf"),
                                               ("open_clip", "open_clip:ViT-B-32", "openclip")])
def test_missing_extra_names_the_install_command(monkeypatch, tmp_path, module, spec, extra):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ViTModel"], "model_type": "vit"}))
    monkeypatch.setitem(sys.modules, module, None)   # `import module` now raises ImportError
    res = run("inspect", spec.format(dir=tmp_path))
    assert res.exit_code == 2, res.output
    assert f"needs the Python package '{module}', which is not installed" in res.output
    assert f"pip install 'tokenopt[{extra}]'" in res.output
    assert "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------
# open_clip and torchvision

OPEN_CLIP = "open_clip:ViT-B-32?image_size=32&patch_size=8&width=64&layers=2&head_width=32&embed_dim=16"


def test_open_clip_random_init_is_the_visual_tower():
    open_clip = pytest.importorskip("open_clip")
    model, base = sources.load_model(OPEN_CLIP)
    assert isinstance(model, open_clip.transformer.VisionTransformer)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    assert base == {"kind": "open_clip", "name": "ViT-B-32", "kwargs": {
        "image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "embed_dim": 16}}
    assert sources.base_to_spec(base) == OPEN_CLIP
    assert model.tokenopt_data_config["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert model.tokenopt_data_config["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("layout", ["whole-clip", "visual-only"])
def test_open_clip_weights_from_a_local_checkpoint(tmp_path, layout):
    pytest.importorskip("open_clip")
    trained, _ = sources.load_model(OPEN_CLIP)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    state = trained.state_dict()
    if layout == "whole-clip":   # what open_clip's training saves: the whole CLIP, under DDP's prefix
        state = {"state_dict": {**{f"module.visual.{k}": v for k, v in state.items()},
                                "module.logit_scale": torch.tensor(1.0)}, "epoch": 3}
    torch.save(state, tmp_path / "ckpt.pt")
    model, base = sources.load_model(OPEN_CLIP, weights=tmp_path / "ckpt.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    assert base["weights"] == str(tmp_path / "ckpt.pt")


def test_open_clip_checkpoint_is_read_weights_only(tmp_path):
    pytest.importorskip("open_clip")
    torch.save({"state_dict": {}, "cfg": torch.nn.Identity()}, tmp_path / "evil.pt")
    res = run("inspect", OPEN_CLIP, "--weights", tmp_path / "evil.pt")
    assert res.exit_code == 2 and "--trust-pickle" in res.output


def test_torchvision_random_init():
    torchvision = pytest.importorskip("torchvision")
    model, base = sources.load_model("torchvision:vit_b_32?image_size=32&num_classes=10")
    assert isinstance(model, torchvision.models.VisionTransformer) and model.image_size == 32
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert sources.base_to_spec(base) == "torchvision:vit_b_32?image_size=32&num_classes=10"
    assert model.tokenopt_base == base


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ModelLoadError, match="Did you mean vit_b_16"):
        sources.load_model("torchvision:vit_b_61")
    pytest.importorskip("open_clip")
    with pytest.raises(ModelLoadError, match="Did you mean ViT-B-32"):
        sources.load_model("open_clip:ViT-B-23")


def test_weights_and_arch_together_is_one_message(tmp_path):
    res = run("inspect", "timm:vit_small_patch16_224", "--weights", tmp_path / "w.pt", "--arch", "timm:x")
    assert res.exit_code == 2 and "not both" in res.output


@needs_hf
def test_optimized_hf_model_saves_and_reloads_without_the_folder(hf_dirs, tmp_path):
    """The artifact records the base (its config, the spec): tokenopt.load needs neither the folder nor --arch."""
    import shutil

    import tokenopt

    folder, saved = hf_dirs["vit"]
    copy = tmp_path / "vit"
    shutil.copytree(folder, copy)
    model, _ = sources.load_model(f"hf:{copy}")
    fast = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tome", "r": 2}]}, torch.randn(2, 3, 32, 32))
    tokenopt.save(fast, tmp_path / "vit.tokenopt.pt")
    shutil.rmtree(copy)
    again = tokenopt.load(tmp_path / "vit.tokenopt.pt")
    assert record_of(again).manifest["base"]["spec"] == f"hf:{copy}"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got, want = again(x), fast(x)
    assert type(got) is type(want) and torch.equal(got.logits, want.logits)


@pytest.mark.slow   # ~10 s: two HF captures (the model and the teacher)
@needs_hf
def test_cli_fine_tunes_an_hf_classifier(hf_dirs, tmp_path):
    """train/eval read a ModelOutput's logits (the model's own preprocessing from its folder)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    recipe = tmp_path / "tome.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: tome\n    r: 2\n")
    res = run("train", recipe, f"hf:{hf_dirs['vit'][0]}", "--data", tmp_path / "imgs", "-o", tmp_path / "out.pt",
              "--finetune-epochs", "1", "--eval-images", "4", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    assert "tome, fine-tuned (1 ep)" in res.output and (tmp_path / "out.pt").is_file()
