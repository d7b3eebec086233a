"""ToSA: bypassed tokens untouched, selected tokens run the original block, selectors train and save."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.fx as fx

import tokenopt
from tokenopt.analysis import analyse
from tokenopt.errors import PlanError, RecipeError
from tokenopt.passes.tosa import UntrainedSelectorWarning, selectors
from tokenopt.subgraph import extract_block
from tokenopt.record import record_of
from vit_models import ExplicitViT, MHAViT


def tiny_timm(depth=3):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, depth=depth, num_classes=10,
                             embed_dim=48, num_heads=4).eval()


def own_vit(kind):
    torch.manual_seed(0)
    return (ExplicitViT(img=32, patch=4, dim=48, depth=3) if kind == "softmax" else
            MHAViT(img=32, patch=4, dim=48, depth=3)).eval()


MODELS = {"sdpa": tiny_timm, "softmax": lambda: own_vit("softmax"), "mha": lambda: own_vit("mha")}


def recipe(keep=0.5, layers="1-2", bypass="block", input="map", **top):
    return {"version": 1, **top, "rules": [{"pass": "tosa", "layers": layers, "keep": keep, "bypass": bypass,
                                            "selector": {"input": input, "hidden": 8}}]}


def images(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def same(kind, got, want):
    """Bit for bit, except where an nn.MultiheadAttention was written out so the selector of the
    next layer reads its q and k (its fused kernel rounds differently): there to 1e-6."""
    if kind == "mha":
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, want)


def quiet(gm, x):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", UntrainedSelectorWarning)
        return gm(x)


class _Values(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.values = getattr(self, "values", {})
        self.values[n.name] = out
        return out


def node_values(gm, x) -> dict:
    it = _Values(gm)
    with torch.no_grad():
        it.run(x)
    return it.values


def selected(gm, block_index):
    """Name of the node holding block ``block_index``'s selected positions."""
    sel = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == f"tosa_selectors.{block_index}"][0]
    return next(iter(next(iter(sel.users)).users)).name


# ------------------------------------------------------------------------------------------------
# the rewrite


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("input", ["map", "pooled"])
def test_bypassed_tokens_untouched_and_selected_run_the_block(kind, input):
    model = MODELS[kind]()
    gm = tokenopt.optimize(model, recipe(input=input))
    reference = analyse(model, images(2))
    x = images()
    v = node_values(gm, x)
    for i in (1, 2):
        block = record_of(gm).analysis.blocks[i]
        idx = v[selected(gm, i)]
        prefix = record_of(gm).analysis.prefix_tokens
        n = block.tokens
        assert idx.shape == (4, prefix + round(0.5 * (n - prefix)))
        assert torch.equal(idx[:, :prefix], torch.arange(prefix).expand(4, -1))
        assert (idx[:, 1:] > idx[:, :-1]).all()                      # original order kept
        x_in, y = v[block.input], v[block.output]
        assert y.shape == x_in.shape
        mask = torch.ones(4, n, dtype=torch.bool)
        mask[torch.arange(4)[:, None], idx] = False
        assert torch.equal(y[mask], x_in[mask])                       # bypassed: bit for bit
        gathered = x_in.gather(1, idx[..., None].expand(-1, -1, x_in.shape[-1]))
        with torch.no_grad():
            expect = extract_block(reference.graph, reference.blocks[i])(gathered)
        got = y.gather(1, idx[..., None].expand(-1, -1, y.shape[-1]))
        same(kind, got, expect)


def test_bypass_attention_sends_every_token_through_the_mlp():
    model = tiny_timm()
    gm = tokenopt.optimize(model, recipe(bypass="attention"))
    v = node_values(gm, images())
    block = record_of(gm).analysis.blocks[1]
    idx = v[selected(gm, 1)]
    h, x_in, y = v[block.merge_point], v[block.input], v[block.output]
    mask = torch.ones(h.shape[:2], dtype=torch.bool)
    mask[torch.arange(len(idx))[:, None], idx] = False
    assert torch.equal(h[mask], x_in[mask])          # skipped the attention ...
    assert not torch.equal(y[mask], x_in[mask])      # ... but not the MLP
    assert record_of(gm).report.flops_after > record_of(tokenopt.optimize(model, recipe())).report.flops_after


@pytest.mark.parametrize("kind", list(MODELS))
def test_keep_all_is_the_original(kind):
    model = MODELS[kind]()
    gm = tokenopt.optimize(model, recipe(keep=1.0, layers="1-2"))
    x = images()
    with torch.no_grad():
        same(kind, quiet(gm, x), model(x))


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_dense_outputs_keep_every_token_in_place(keep):
    model = tiny_timm()
    x = images()
    dense = tokenopt.optimize(model, recipe(keep=keep), outputs="tokens")
    full = tokenopt.optimize(model, recipe(keep=1.0), outputs="tokens")
    out, ref = quiet(dense, x), quiet(full, x)
    assert out.shape == ref.shape == (4, 64, 48)
    if keep == 1.0:
        assert torch.equal(out, ref)
        return
    # tokens the last layer skipped are the final norm of its input, at their own positions
    v = node_values(dense, x)
    last = record_of(dense).analysis.blocks[2]
    idx = v[selected(dense, 2)]
    norm = model.norm(v[last.input])[:, 1:]
    skipped = torch.ones(4, 65, dtype=torch.bool)
    skipped[torch.arange(4)[:, None], idx] = False
    skipped = skipped[:, 1:]
    assert skipped.sum() == 4 * 32
    torch.testing.assert_close(out[skipped], norm[skipped], rtol=0, atol=1e-6)


def test_chained_layers_read_the_most_recent_logits():
    """Layer 2's selector reads layer 1's logits among its selected tokens, written over layer 0's map."""
    model = tiny_timm()
    gm = tokenopt.optimize(model, recipe(layers="1-2"))
    v = node_values(gm, images())
    sel2 = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "tosa_selectors.2")
    fed = v[sel2.args[0].name]
    full0 = v[next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "tosa_selectors.1").args[0].name]
    idx = v[selected(gm, 1)]
    assert fed.shape == full0.shape == (4, 4, 65, 65)
    inside = torch.zeros(4, 65, 65, dtype=torch.bool)
    inside[torch.arange(4)[:, None, None], idx[:, :, None], idx[:, None, :]] = True
    inside = inside[:, None].expand_as(fed)
    assert torch.equal(fed[~inside], full0[~inside])
    assert not torch.equal(fed[inside], full0[inside])


def test_selector_flops_are_counted():
    model = tiny_timm()
    gm = tokenopt.optimize(model, recipe(input="map"))
    from tokenopt.flops import flops_by_node
    per_node = flops_by_node(gm, images(1))
    sel = [n.name for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("tosa_selectors")]
    conv = 2 * 65 * 65 * (4 * 8 * 3)        # two convolutions per query row, heads -> 8 -> heads, width 3
    assert all(per_node[s] == conv for s in sel)
    row = record_of(gm).report.rows[1]
    assert row.flops_after > conv and row.flops_after < row.flops_before
    # the report's selector column: the selector convolutions plus the logits q k^T it reads
    # (embed 48 = 4 heads x 12); layer 1 ran on its 32 + 1 selected tokens only, so the map
    # layer 2's selector reads costs 33 x 33; nothing in non-selective layers
    report = record_of(gm).report
    assert [r.selector_flops for r in report.rows] == [0, conv + 65 * 65 * 48, conv + 33 * 33 * 48]
    assert "of which selector MFLOPs" in str(report)


def test_one_graph_under_torch_compile():
    model = tiny_timm()
    gm = tokenopt.optimize(model, recipe())
    for m in selectors(gm).values():
        m.trained.fill_(True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(images())
    assert explained.graph_count == 1 and explained.graph_break_count == 0


# ------------------------------------------------------------------------------------------------
# recipes and errors


def test_shipped_recipes_plan_on_any_depth():
    from pathlib import Path
    for name in ("tosa-keep50.yaml", "tosa-keep70.yaml"):
        path = Path(__file__).parents[1] / "recipes" / name
        for depth in (2, 4):
            gm = tokenopt.optimize(tiny_timm(depth), path)
            acted = [r for r in record_of(gm).report.rows if r.acted != "-"]
            assert acted and acted[0].index >= 1


@pytest.mark.parametrize("keep, says", [(1.5, "fraction in (0, 1]"), (0, "at least 1 token"), (0.0, "fraction"),
                                        ("half", "fraction")])
def test_keep_out_of_range_names_the_line(tmp_path, keep, says):
    path = tmp_path / "r.yaml"
    path.write_text(f"version: 1\nrules:\n  - pass: tosa\n    layers: 1-2\n    keep: {keep}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml, line 3") as e:
        tokenopt.optimize(tiny_timm(), path)
    assert says in str(e.value)


def test_keep_more_tokens_than_the_layer_has(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nrules:\n  - pass: tosa\n    layers: 2\n    keep: 65\n")
    with pytest.raises(RecipeError, match=r"line 3 .*keep=65 at blocks.2 .*only 64 tokens"):
        tokenopt.optimize(tiny_timm(), path)


def test_tosa_after_a_merge_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nrules:\n  - pass: tome\n    r: 2\n  - pass: tosa\n    layers: 2\n    keep: 0.5\n")
    with pytest.raises(RecipeError, match=r"line 5 .*blocks.2 \(2\) gets 61 of its 65 tokens after an earlier merge"):
        tokenopt.optimize(tiny_timm(), path)


def test_selective_first_layer_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nrules:\n  - pass: tosa\n    layers: all\n    keep: 0.5\n")
    with pytest.raises(RecipeError, match=r"line 3 .*layer 0 \(blocks.0\) cannot be selective"):
        tokenopt.optimize(tiny_timm(), path)


def test_untrained_selectors_warn_once_and_strict_refuses():
    model = tiny_timm()
    gm = tokenopt.optimize(model, recipe())
    with pytest.warns(UntrainedSelectorWarning, match=r"layer\(s\) 1, 2 were never trained"):
        gm(images())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm(images())                                  # once per model
    strict = tokenopt.optimize(model, recipe(strict=True))
    with pytest.raises(PlanError, match="strict: true"):
        strict(images())
    for m in selectors(strict).values():
        m.trained.fill_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strict(images())


# ------------------------------------------------------------------------------------------------
# training and artifacts


@pytest.fixture(scope="module")
def trained():
    """An ExplicitViT (default init: peaked attention) with ToSA selectors before and after training."""
    from tokenopt.data import get_dataset
    from tokenopt.train.selector import held_out_kl, train_selectors

    model = own_vit("softmax")
    data = torch.utils.data.Subset(get_dataset("digits", "train", 32), range(384))
    test = get_dataset("digits", "test", 32)
    held_out = torch.stack([test[i][0] for i in range(64)])
    out = {}
    for input in ("map", "pooled"):
        gm = tokenopt.optimize(model, recipe(input=input), held_out[:2])
        before = held_out_kl(gm, model, held_out)
        train_selectors(gm, model, data, epochs=2, batch_size=32, lr=3e-3, quiet=True)
        out[input] = (gm, before, held_out_kl(gm, model, held_out))
    return model, out, held_out


@pytest.mark.parametrize("input", ["map", "pooled"])
def test_selector_training_lowers_held_out_kl(trained, input):
    _, out, _ = trained
    gm, before, after = out[input]
    assert set(before) == set(after) == {1, 2}
    for i in before:
        assert after[i] < 0.9 * before[i], (i, before[i], after[i])
    assert all(bool(m.trained) for m in selectors(gm).values())
    assert not any(p.requires_grad is False for p in trained[0].parameters())   # the user's model is left as it was


def test_trained_artifact_round_trips_bit_exact(trained, tmp_path):
    model, out, held_out = trained
    gm = out["map"][0]
    path = tmp_path / "tosa.tokenopt.pt"
    tokenopt.save(gm, path, arch="vit_models:ExplicitViT?img=32&patch=4&dim=48&depth=3")   # ExplicitViT() alone
    loaded = tokenopt.load(path, arch=own_vit("softmax"))                                    # would be dim 64
    assert set(loaded.state_dict()) == set(gm.state_dict())
    assert any(k.startswith("tosa_selectors.1.conv1") for k in loaded.state_dict())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")                # trained selectors: no warning
        assert torch.equal(loaded(held_out), gm(held_out))


def test_finetune_trains_the_backbone_not_the_selectors():
    from tokenopt.data import get_dataset
    from tokenopt.train.selector import finetune

    model = tiny_timm()
    gm = tokenopt.optimize(model, recipe())
    sel = {k: v.clone() for k, v in gm.state_dict().items() if k.startswith("tosa_selectors")}
    qkv = model.blocks[1].attn.qkv.weight.clone()
    teacher_before = tiny_timm()
    data = torch.utils.data.Subset(get_dataset("digits", "train", 32), range(64))
    finetune(gm, model, data, epochs=1, batch_size=32, distill=True, quiet=True)
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in sel.items())
    assert not torch.equal(model.blocks[1].attn.qkv.weight, qkv)      # shared with gm: trained
    assert all(p.requires_grad for p in model.parameters())
    del teacher_before


def test_finetune_can_keep_training_the_selectors():
    from tokenopt.data import get_dataset
    from tokenopt.train.selector import finetune

    model = own_vit("softmax")
    gm = tokenopt.optimize(model, recipe(input="pooled"))
    sel = {k: v.clone() for k, v in gm.state_dict().items() if k.startswith("tosa_selectors")}
    data = torch.utils.data.Subset(get_dataset("digits", "train", 32), range(64))
    result = finetune(gm, model, data, epochs=1, batch_size=32, selector_weight=1.0, quiet=True)
    assert result.steps == 2
    assert not torch.equal(gm.state_dict()["tosa_selectors.1.conv2.weight"], sel["tosa_selectors.1.conv2.weight"])
