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
