"""The optimized module is called as the original was (issue 23, items 1-3): Hugging Face keyword
arguments, input sizes, and the example size the API and the CLI choose. Each case is the user's
call on a small random-init model; where a limit stays, one clear message names the argument."""
from __future__ import annotations

import pytest
import torch

import tokenopt
from tokenopt.calling import CallError
from tokenopt.record import record_of

transformers = pytest.importorskip("transformers")

TOME = {"version": 1, "rules": [{"pass": "tome", "r": 2}]}


def hf_vit(image_size=32):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(cfg).eval()


@pytest.fixture(scope="module")
def optimized():
    model = hf_vit()
    return model, tokenopt.optimize(model, TOME)


def test_return_dict_false_gives_the_tuple_the_original_gives(optimized):
    model, fast = optimized
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = fast(x, return_dict=False)
        want = fast(x)
    assert isinstance(out, tuple) and torch.equal(out[0], want.logits)
    assert type(model(x, return_dict=False)) is tuple
    assert isinstance(fast(pixel_values=x, return_dict=True), type(want))     # True is the default


def test_flags_at_their_default_are_accepted(optimized):
    _, fast = optimized
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = fast(x, output_hidden_states=False, output_attentions=None, labels=None)
        assert torch.equal(a.logits, fast(x).logits)


@pytest.mark.parametrize("kwargs, words", [
    ({"labels": torch.tensor([1, 2])}, "labels= is not taken by the optimized ViTForImageClassification: the loss "
                                       "is not part of its graph"),
    ({"output_hidden_states": True}, "output_hidden_states=True is not available on the optimized "
                                     "ViTForImageClassification"),
    ({"interpolate_pos_encoding": True}, "interpolate_pos_encoding=True is not available on the optimized "
                                         "ViTForImageClassification: it was captured with interpolate_pos_encoding at "
                                         "its default"),
])
def test_what_the_graph_cannot_honour_is_one_clear_message(optimized, kwargs, words):
    _, fast = optimized
    with pytest.raises(CallError) as e:
        fast(torch.randn(2, 3, 32, 32), **kwargs)
    assert str(e.value).startswith(words)


def test_a_keyword_the_graph_never_saw_is_named(optimized):
    """ViTForImageClassification.forward takes **kwargs: a keyword it does not name reaches them."""
    _, fast = optimized
    with pytest.raises(TypeError, match=r"^colour=1 is not available on the optimized ViTForImageClassification: it "
                                        r"was captured without colour\."):
        fast(torch.randn(2, 3, 32, 32), colour=1)


def test_an_unknown_keyword_of_a_closed_signature_is_a_type_error():
    from vit_models import ExplicitViT

    fast = tokenopt.optimize(ExplicitViT().eval(), TOME)
    with pytest.raises(TypeError, match=r"^ExplicitViT.forward\(\) got an unexpected keyword argument 'colour'$"):
        fast(torch.randn(2, 3, 32, 32), colour=1)


def test_another_size_names_the_size_it_was_built_for(optimized):
    _, fast = optimized
    with pytest.raises(CallError) as e:
        fast(torch.randn(2, 3, 48, 48))
    assert str(e.value).startswith("the optimized ViTForImageClassification was built for pixel_values of size "
                                   "3x32x32 (besides the batch), got 3x48x48")
    with torch.no_grad():
        assert fast(torch.randn(5, 3, 32, 32)).logits.shape == (5, 5)     # any batch still


def test_the_api_traces_at_the_configs_size_as_the_cli_does():
    """A config saying 64 px: tokenopt.optimize traces at 64 (it traced at 224 before), and the result
    runs on 64 px input."""
    model = hf_vit(image_size=64)
    fast = tokenopt.optimize(model, TOME)
    assert record_of(fast).analysis.input_shape == (2, 3, 64, 64)
    with torch.no_grad():
        assert fast(torch.randn(1, 3, 64, 64)).logits.shape == (1, 5)


# --- resolution: where the original runs at another size, the optimized one does too, within its recipe

def hf_dinov2(**extra):
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, **extra)
    return transformers.Dinov2Model(cfg).eval()


@pytest.fixture(scope="module")
def dinov2():
    return hf_dinov2()


def test_an_exported_dinov2_runs_at_another_size_and_r0_is_the_original_there(dinov2):
    same = tokenopt.optimize(dinov2, {"version": 1, "rules": [{"pass": "tome", "r": 0}]}, report=False)
    assert record_of(same).capture == "export"
    assert record_of(same).dynamic_axes == {0: {2: (8, 16, 512), 3: (8, 16, 512)}}
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want, got = dinov2(x), same(x)
    assert got.last_hidden_state.shape == (2, 145, 32)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)


def test_an_exported_dinov2_merges_at_another_size(dinov2):
    fast = tokenopt.optimize(dinov2, TOME, report=False)
    with torch.no_grad():
        for h, w in ((96, 96), (96, 80), (32, 32)):
            out = fast(torch.randn(2, 3, h, w))
            assert out.pooler_output.shape == (2, 32) and torch.isfinite(out.last_hidden_state).all()
    with pytest.raises(CallError) as e:
        fast(torch.randn(1, 3, 16, 16))
    assert str(e.value) == (
        "the optimized Dinov2Model was built for pixel_values of size 3x64x64; at 16x16 encoder.layer.1 would get 3 "
        "tokens, but its step (merge r=2) needs at least 5. Use a larger input, or optimize again with an example "
        "of that size (API: example_input=...; CLI: --input-size).")
    with pytest.raises(CallError, match=r"^the optimized Dinov2Model takes pixel_values of height and width that are "
                                        r"multiples of 8 from 16 to 512 \(it was built for 3x64x64\), got 3x97x96"):
        fast(torch.randn(1, 3, 97, 96))
    with pytest.raises(CallError, match=r"got 1x64x64: only its height and width may change"):
        fast(torch.randn(1, 1, 64, 64))


@pytest.mark.filterwarnings("ignore:ToSA selectors")        # untrained: the size check comes first
def test_a_recipe_tied_to_its_grid_refuses_another_size_naming_the_size_it_was_built_for(dinov2):
    fast = tokenopt.optimize(dinov2, {"version": 1, "rules": [{"pass": "tosa", "layers": 1, "keep": 0.5}]},
                             report=False)
    with torch.no_grad():
        assert fast(torch.randn(1, 3, 64, 64)).last_hidden_state.shape == (1, 65, 32)
    with pytest.raises(CallError) as e:
        fast(torch.randn(1, 3, 96, 96))
    assert str(e.value) == (
        "the optimized Dinov2Model was built for pixel_values of size 3x64x64; at 96x96 its recipe cannot run: "
        "encoder.layer.1 (attend 32/64 + 1 prefix, bypass block, selector map) attends a fixed 32 of its "
        "64 tokens, with a selector trained on that grid, so it needs that grid. Resize the input to 3x64x64, or "
        "optimize again with an example of the new size (API: example_input=...; CLI: --input-size).")


def test_an_hf_vit_optimized_with_interpolate_pos_encoding_takes_other_sizes():
    """HF ViT takes another size with interpolate_pos_encoding=True: optimized from an example with that
    flag, the result does too, and a call that leaves the flag out gets it (no TypeError)."""
    model = hf_vit()
    x = torch.randn(2, 3, 32, 32)
    example = tokenopt.Example((x,), {"interpolate_pos_encoding": True})
    same = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tome", "r": 0}]}, example, report=False)
    fast = tokenopt.optimize(model, TOME, example, report=False)
    assert record_of(fast).dynamic_axes == {0: {2: (8, 16, 512), 3: (8, 16, 512)}}
    y = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        want = model(y, interpolate_pos_encoding=True).logits
        assert torch.equal(same(y, interpolate_pos_encoding=True).logits, want)
        assert torch.equal(same(y).logits, want)
        assert torch.equal(same(x).logits, model(x).logits)
        assert fast(y).logits.shape == (2, 5)


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_timm_vit_with_dynamic_img_size_runs_at_another_size(capture):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=5,
                              dynamic_img_size=True).eval()
    same = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tome", "r": 0}]}, report=False, capture=capture)
    fast = tokenopt.optimize(model, TOME, report=False, capture=capture)
    assert record_of(fast).capture == capture and sorted(record_of(fast).dynamic_axes[0]) == [2, 3]
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
        assert fast(x).shape == (2, 5)
    with pytest.raises(CallError, match=r"^the optimized VisionTransformer was built for x of size 3x64x64; at 16x16 "
                                        r"blocks.0 would get 2 tokens, but its step \(merge r=2\) needs at least 5\."
                       if capture == "fx" else r"^the optimized VisionTransformer takes x of height and width that "
                                               r"are multiples of 16 from 32 to 1024"):
        fast(torch.randn(1, 3, 16, 16))


def test_an_fx_graph_that_does_not_follow_another_size_refuses_it(monkeypatch):
    """Where the original runs at another size but the rewritten fx graph does not, one clear message."""
    import tokenopt.calling as calling

    monkeypatch.setattr(calling, "_runs_bigger", lambda *a: False)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=5,
                              dynamic_img_size=True).eval()
    fast = tokenopt.optimize(model, TOME, report=False, capture="fx")
    assert record_of(fast).dynamic_axes == {}
    with pytest.raises(CallError) as e:
        fast(torch.randn(1, 3, 96, 96))
    assert str(e.value) == (
        "the optimized VisionTransformer was built for x of size 3x64x64 (besides the batch), got 3x96x96: the "
        "original runs at other sizes, but its graph traced by torch.fx does not after the rewrite, and its recipe "
        "planned the tokens of each layer for that grid. Optimize again with an example of the new size (API: "
        "example_input=...; CLI: --input-size).")
