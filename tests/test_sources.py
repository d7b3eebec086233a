"""Loading models from timm names, factories, state dicts, safetensors and pickles (tokenopt.sources)."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from tokenopt import sources
from tokenopt.errors import ModelLoadError

TINY_KW = dict(img_size=32, patch_size=8, depth=2, num_classes=10)


def tiny_vit():
    return timm.create_model("vit_small_patch16_224", **TINY_KW).eval()


def load_error(*args, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as e:
        sources.load_model(*args, **kwargs)
    return str(e.value)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ specs

def test_query_values_are_typed():
    name, kw = sources.parse_query("vit_small_patch16_224?img_size=64,48&drop_rate=0.1&class_token=false"
                              "&global_pool=avg&depth=4&init_values=none")
    assert name == "vit_small_patch16_224"
    assert kw == {"img_size": (64, 48), "drop_rate": 0.1, "class_token": False, "global_pool": "avg",
                  "depth": 4, "init_values": None}
    assert type(kw["depth"]) is int


def test_bad_query_is_an_error():
    assert "key=value" in load_error("timm:vit_small_patch16_224?img_size")


def test_timm_spec_builds_random_model_with_kwargs(tiny_vit_spec):
    model, base = sources.load_model(tiny_vit_spec)
    assert not model.training
    assert model.patch_embed.img_size == (32, 32) and len(model.blocks) == 2
    assert base == {"kind": "timm", "name": "vit_small_patch16_224", "kwargs": TINY_KW}
    assert sources.base_to_spec(base) == tiny_vit_spec


def test_unknown_timm_name_suggests_close_ones():
    msg = load_error("timm:vit_smal_patch16_224")
    assert "unknown timm model 'vit_smal_patch16_224'" in msg and "vit_small_patch16_224" in msg


def test_bad_timm_kwarg_names_it():
    msg = load_error("timm:vit_small_patch16_224?depth=1&not_an_option=3")
    assert "not_an_option" in msg


def test_factory_spec(user_models):
    model, base = sources.load_model("tokenopt_user_models:make_vit?dim=16&depth=1")
    assert len(model.blocks) == 1 and model.head.in_features == 16
    assert base == {"kind": "factory", "factory": "tokenopt_user_models:make_vit", "kwargs": {"dim": 16, "depth": 1}}


@pytest.mark.parametrize("arch, expect", [
    ("no_such_pkg.models:make", "cannot import module 'no_such_pkg.models'"),
    ("tokenopt_user_models:make_vti", "did you mean make_vit"),
    ("tokenopt_user_models:not_a_model", "returned a int, not an nn.Module"),
    ("tokenopt_user_models:make_vit?colour=3", "colour"),
    ("vit_small", "cannot read the architecture"),
])
def test_bad_factory_paths(user_models, tmp_path, arch, expect):
    sd = tmp_path / "w.pt"
    torch.save(tiny_vit().state_dict(), sd)
    assert expect.lower() in load_error(sd, arch=arch).lower()


# ------------------------------------------------------------------------------ files

@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
], ids=["plain", "state_dict", "model+module.", "compiled"])
def test_state_dict_with_arch(tmp_path, tiny_vit_spec, wrap):
    src = tiny_vit()
    path = tmp_path / "w.pth"
    torch.save(wrap(src.state_dict()), path)
    model, base = sources.load_model(path, arch=tiny_vit_spec)
    assert same_weights(model, src) and not model.training
    assert base["kind"] == "timm" and base["weights"] == str(path)


def test_safetensors_with_arch(tmp_path, tiny_vit_spec):
    src = tiny_vit()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model, _ = sources.load_model(path, arch=tiny_vit_spec)
    assert same_weights(model, src)


def test_state_dict_into_built_module(tmp_path):
    src = tiny_vit()
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    model, _ = sources.load_model(path, arch=timm.create_model("vit_small_patch16_224", **TINY_KW))
    assert same_weights(model, src)


def test_state_dict_without_arch(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_vit().state_dict(), path)
    msg = load_error(path)
    assert str(path) in msg and "--arch" in msg and "holds only weights" in msg


def test_wrong_arch_lists_keys(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_vit().state_dict(), path)
    msg = load_error(path, arch="timm:vit_small_patch16_224?img_size=32&patch_size=8&depth=3&num_classes=10")
    assert "missing: blocks.2." in msg and "+" in msg  # a few keys listed, the rest counted
    msg = load_error(path, arch="timm:vit_small_patch16_224?img_size=32&patch_size=8&depth=2&num_classes=5")
    assert "wrong shape" in msg and "head.weight (10, 384) vs (5, 384)" in msg


def test_missing_file(tmp_path):
    msg = load_error(tmp_path / "nope.pt")
    assert "not found" in msg and "nope.pt" in msg


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_corrupt_checkpoint(tmp_path, tiny_vit_spec, damage):
    path = tmp_path / "w.pt"
    torch.save(tiny_vit().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint"}[damage])
    msg = load_error(path, arch=tiny_vit_spec)
    assert f"cannot read checkpoint {path}" in msg
    assert ("empty" if damage == "empty" else "truncated, corrupt") in msg


def test_corrupt_safetensors(tmp_path, tiny_vit_spec):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4)}, str(path))
    path.write_bytes(path.read_bytes()[:-5])
    assert "not a valid safetensors file" in load_error(path, arch=tiny_vit_spec)


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    src = tiny_vit()
    torch.save(src, path)
    msg = load_error(path)
    assert "timm.models.vision_transformer.VisionTransformer" in msg.split("and run code from:")[1][:60]
    assert "--trust-pickle" in msg and "--arch" in msg
    model, base = sources.load_model(path, trust_pickle=True)
    assert isinstance(model, nn.Module) and same_weights(model, src)
    assert base["kind"] == "class" and base["class"] == "timm.models.vision_transformer:VisionTransformer"


def test_pickled_module_with_arch_uses_its_weights(tmp_path, tiny_vit_spec):
    path = tmp_path / "whole.pt"
    src = tiny_vit()
    torch.save({"model": src, "epoch": 1}, path)
    model, base = sources.load_model(path, arch=tiny_vit_spec, trust_pickle=True)
    assert same_weights(model, src) and base["kind"] == "timm"


def test_artifact_is_not_a_base_model(tmp_path):
    path = tmp_path / "a.pt"
    torch.save({"format": "tokenopt-artifact", "format_version": 1}, path)
    assert "tokenopt artifact" in load_error(path)


# ------------------------------------------------------------------------------ the registry

def test_model_help_lists_every_source():
    from tokenopt.cli.common import MODEL_HELP

    for spec in ("timm:<name>", "open_clip:<arch>", "torchvision:<name>", "hf:<folder>", "demo:digits",
                 "package.module:factory", "--trust-pickle"):
        assert spec in MODEL_HELP


def test_a_registered_source_loads_rebuilds_and_shows_in_the_help(monkeypatch):
    from tokenopt.sources import registry

    class ToySource(registry.Source):
        kind, prefix, help, names_arch = "toy", "toy:", "toy:<width>", True

        def parse(self, spec):
            return {"kind": self.kind, "width": int(spec[len(self.prefix):])}

        def build(self, base):
            return nn.Linear(base["width"], 2)

        def to_spec(self, base):
            return f"toy:{base['width']}"

    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))   # registered for this test only
    registry.register_source(ToySource)
    model, base = sources.load_model("toy:5")
    assert isinstance(model, nn.Linear) and model.in_features == 5 and model.tokenopt_base == base
    assert sources.build_base(base).in_features == 5 and sources.base_to_spec(base) == "toy:5"
    assert "toy:<width>" in sources.model_help() and "toy:<width>" in sources.arch_help()
    assert "already names the architecture" in load_error("toy:5", arch="timm:vit_small_patch16_224")
    with pytest.raises(ValueError, match="needs a kind of its own"):
        registry.register_source(ToySource)
