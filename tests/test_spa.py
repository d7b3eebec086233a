"""The spa pass: each rewritten block against a per-image loop through the original block on its
kept tokens, keep-everything is the original, padded equals packed, one compiled graph, gates in
state_dict and artifacts, gradients reach the gate, the report, and the user errors."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.fx as fx
from typer.testing import CliRunner

import tokenopt
from tokenopt.analysis import analyse
from tokenopt.cli import app
from tokenopt.errors import PlanError, RecipeError
from tokenopt.passes.spa import UntrainedGateWarning, capture_gate_outputs, force_keep, gates_of
from tokenopt.subgraph import extract_block
from tokenopt.record import record_of
from vit_models import ExplicitViT, MHAViT


def tiny_timm(depth=3, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, depth=depth, num_classes=10,
                             embed_dim=48, num_heads=4, **kw).eval()


def own_vit(kind):
    torch.manual_seed(0)
    return (ExplicitViT(img=32, patch=4, dim=48, depth=3) if kind == "softmax" else
            MHAViT(img=32, patch=4, dim=48, depth=3)).eval()


def hf_vit():
    """A Hugging Face ViT (fx cannot trace it: torch.export captures it), at unit-gain weights so
    its blocks are far from the identity and a per-image comparison shows something."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, image_size=32,
        patch_size=4, num_labels=10))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p[0].numel() ** -0.5) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


MODELS = {"sdpa": tiny_timm, "softmax": lambda: own_vit("softmax"), "mha": lambda: own_vit("mha"), "hf_vit": hf_vit}
CAPTURE = {"hf_vit": "export"}          # the others trace with fx


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def recipe(layers="1-2", **options):
    top = {k: options.pop(k) for k in ("strict", "outputs") if k in options}
    return {"version": 1, **top, "rules": [{"pass": "spa", "layers": layers, **options}]}


def images(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def optimize(model, rec, **kw):
    """tokenopt.optimize without the FLOPs report (it runs the model three more times), unless asked."""
    kw.setdefault("report", False)
    return tokenopt.optimize(model, rec, **kw)


def trained(gm):
    for g in gates_of(gm).values():
        g.trained.fill_(True)
    return gm


def run_capturing(gm, x):
    """Outputs, every node's value, and the gates' decisions of one eval forward."""
    values = {}

    class Values(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n.name] = out
            return out

    with torch.no_grad(), capture_gate_outputs(gm) as seen:
        out = Values(gm).run(x)
    return out, values, seen


# ------------------------------------------------------------------------------------------------
# the rewrite against per-image references


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("mode", ["bypass", "prune"])
def test_a_gate_keeping_everything_is_the_original(kind, mode):
    model = MODELS[kind]()
    gm = trained(optimize(model, recipe(threshold=0.0, mode=mode), example_input=images(2),
                          capture=CAPTURE.get(kind, "auto")))
    x = images()
    with torch.no_grad():
        got, want = logits(gm(x)), logits(model(x))
    if kind in ("sdpa", "hf_vit") and mode == "bypass":
        assert torch.equal(got, want)          # the same kernels on the same tokens
    else:   # an explicit chain or a written-out MHA now runs as SDPA per image: rounding differs
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, layout", [(k, "packed") for k in MODELS] + [("sdpa", "padded")] + [
    pytest.param(k, "padded", marks=pytest.mark.slow) for k in ("softmax", "mha", "hf_vit")])
def test_bypass_block_equals_a_per_image_loop_on_the_kept_tokens(kind, layout):
    model, capture = MODELS[kind](), CAPTURE.get(kind, "auto")
    gm = trained(optimize(model, recipe(layout=layout), example_input=images(2), capture=capture))
    reference = analyse(model, images(2), capture=capture)
    _, v, seen = run_capturing(gm, images())
    assert sorted(seen) == [1, 2]
    for i in (1, 2):
        block = record_of(gm).analysis.blocks[i]
        keep = seen[i].keep
        counts = keep.sum(1).tolist()
        assert len(set(counts)) > 1 and min(counts) < keep.shape[1]      # images keep different numbers
        x_in, y = v[block.input], v[block.output]
        assert torch.equal(y[~keep], x_in[~keep])                          # skipped the block, bit for bit
        run_block = extract_block(reference.graph, reference.blocks[i])
        for b in range(x_in.shape[0]):
            with torch.no_grad():
                expect = run_block(x_in[b:b + 1, keep[b]])
            torch.testing.assert_close(y[b:b + 1, keep[b]], expect, rtol=0, atol=1e-5)


def prune_reference(model, gm, x, seen, head, capture="auto"):
    """The original blocks image by image, each SPA layer first dropping the tokens its gate left."""
    reference = analyse(model, x[:2], capture=capture)
    blocks = [extract_block(reference.graph, b) for b in reference.blocks]
    _, v, _ = run_capturing(gm, x)
    first = v[record_of(gm).analysis.blocks[1].input]       # before the first SPA layer, as the original
    out = []
    for b in range(x.shape[0]):
        h, present = first[b:b + 1], torch.arange(first.shape[1])
        for i, blk in list(enumerate(blocks))[1:]:
            if i in seen:
                k = seen[i].keep[b]
                assert torch.equal(seen[i].valid[b].nonzero().squeeze(1), present)
                sel = k[present]
                h, present = h[:, sel], present[sel]
            with torch.no_grad():
                h = blk(h)
        with torch.no_grad():
            out.append(head(h))
    return torch.cat(out)


@pytest.mark.parametrize("pool, layout", [("token", "packed"), ("avg", "padded"),
                                          pytest.param("avg", "packed", marks=pytest.mark.slow),
                                          pytest.param("token", "padded", marks=pytest.mark.slow)])
def test_prune_equals_a_per_image_loop_and_pools_the_kept_tokens(pool, layout):
    model = tiny_timm(depth=4, global_pool=pool)
    gm = trained(optimize(model, recipe(layers="1-2", mode="prune", layout=layout)))
    x = images()
    out, _, seen = run_capturing(gm, x)
    assert (seen[2].valid.sum(1) < seen[1].valid.sum(1)).all()       # layer 1 pruned for good
    assert not (seen[2].keep & ~seen[2].valid).any()
    want = prune_reference(model, gm, x, seen, lambda h: model.forward_head(model.norm(h)))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["softmax", "mha"])
def test_prune_with_explicit_and_mha_attention(kind):
    model = MODELS[kind]()
    gm = trained(optimize(model, recipe(layers="1-2", mode="prune")))
    x = images()
    out, _, seen = run_capturing(gm, x)
    if kind == "softmax":
        head = lambda h: model.fc(model.norm(h)[:, 0])         # noqa: E731
    else:
        head = lambda h: model.head(model.norm(h).mean(dim=1))  # noqa: E731
    torch.testing.assert_close(out, prune_reference(model, gm, x, seen, head), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["bypass", "prune"])
def test_padded_layout_equals_packed(mode):
    model = tiny_timm()
    x = images(5)
    packed = trained(optimize(model, recipe(mode=mode, layout="packed", max_keep=0.75)))
    padded = trained(optimize(model, recipe(mode=mode, layout="padded", max_keep=0.75)))
    padded.load_state_dict(packed.state_dict())        # the same gates
    with torch.no_grad():
        torch.testing.assert_close(padded(x), packed(x), rtol=0, atol=1e-5)
    _, _, seen = run_capturing(padded, x)
    assert (seen[1].keep[:, 1:].sum(1) <= 48).all()      # max_keep 0.75 of 64: the padded capacity


@pytest.mark.slow    # each strategy against the per-image reference is in test_spa_ops (fast)
@pytest.mark.parametrize("strategy", ["loop", "padded", "blockdiag", "containers"])
def test_every_attention_strategy_gives_the_same_model(strategy):
    model = tiny_timm()
    x = images()
    base = trained(optimize(model, recipe(mode="prune")))
    other = trained(optimize(model, recipe(mode="prune", attention=strategy)))
    other.load_state_dict(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x), base(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["bypass", "prune"])
def test_one_compiled_graph_in_padded_mode(mode):
    model = tiny_timm(depth=2)
    gm = trained(optimize(model, recipe(layers="1", mode=mode)))      # layout auto: padded while compiling
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(images())
    assert explained.graph_count == 1 and explained.graph_break_count == 0


@pytest.mark.slow
def test_compiled_padded_model_equals_eager():
    model = tiny_timm(depth=2)
    gm = trained(optimize(model, recipe(layers="1", mode="prune")))
    x = images()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()      # reset() keeps the counts of earlier tests in this process
    compiled = torch.compile(gm)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), gm(x), rtol=0, atol=1e-5)
        compiled(images(4, seed=2))                       # other images, other counts: no recompile
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_exported_model_runs_padded_and_equals_eager():
    model = tiny_timm()
    gm = trained(optimize(model, recipe(mode="prune")))
    ep = torch.export.export(gm, (images(),), strict=False)
    other = images(4, seed=7)                             # other images keep other counts
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(other), gm(other), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# training, capture, forcing


@pytest.mark.parametrize("mode, layout", [("bypass", "packed"), ("prune", "packed"), ("prune", "padded")])
def test_task_loss_reaches_the_gates_through_the_packed_path(mode, layout):
    model = tiny_timm()
    gm = optimize(model, recipe(mode=mode, layout=layout))
    gm.train()
    torch.manual_seed(3)
    with capture_gate_outputs(gm) as seen:
        gm(images()).logsumexp(-1).sum().backward()
    for i, gate in gates_of(gm).items():
        assert gate.score.weight.grad is not None and gate.score.weight.grad.abs().sum() > 0, i
        assert seen[i].prob.requires_grad                       # ready for the label loss
    # in eval mode the decision is the thresholded probability and no straight-through term runs
    gm.eval()
    for g in gates_of(gm).values():
        g.trained.fill_(True)
    with torch.no_grad(), capture_gate_outputs(gm) as seen:
        gm(images())
    p, keep, valid = seen[1].prob, seen[1].keep, seen[1].valid
    assert torch.equal(keep[:, 1:], (p[:, 1:] >= 0.5) | keep[:, 1:] & (p[:, 1:] < 0.5))  # bounds may add some
    assert valid.all() and keep[:, 0].all()


def test_training_forward_equals_the_hard_selection():
    """The straight-through term is zero in value: a training forward gives what eval gives for the
    same decisions."""
    model = tiny_timm()
    gm = trained(optimize(model, recipe(mode="prune")))
    x = images()
    gm.train()
    torch.manual_seed(4)
    with capture_gate_outputs(gm) as seen:
        out_train = gm(x)
    decided = {i: o.keep for i, o in seen.items()}
    gm.eval()
    gates = gates_of(gm)
    originals = {i: g.forward for i, g in gates.items()}
    try:
        for i, g in gates.items():   # replay the sampled decisions in eval mode
            def fixed(x_, pos=None, valid=None, i=i, g=g):
                keep = decided[i]
                from tokenopt.ops.gates import from_grid
                return from_grid(keep, pos, False), keep, None
            g.forward = fixed
        with torch.no_grad():
            out_eval = gm(x)
    finally:
        for i, g in gates.items():
            g.forward = originals[i]
    torch.testing.assert_close(out_train.detach(), out_eval, rtol=0, atol=1e-6)


def test_force_keep_keeps_half_of_each_images_tokens():
    model = tiny_timm()
    gm = optimize(model, recipe(mode="prune"))
    with force_keep(gm, 0.5, seed=0), warnings.catch_warnings():
        warnings.simplefilter("error")          # forced gates: no untrained warning
        _, _, seen = run_capturing(gm, images())
    assert seen[1].keep[:, 1:].sum(1).tolist() == [32] * 4
    assert seen[2].keep[:, 1:].sum(1).tolist() == [16] * 4
    assert all(g.forced is None for g in gates_of(gm).values())


# ------------------------------------------------------------------------------------------------
# gates as submodules, artifacts, warnings, outputs, report


def test_gates_are_in_the_state_dict_and_artifacts_round_trip(tmp_path):
    model = tiny_timm()
    gm = trained(optimize(model, recipe(gate={"hidden": 8})))
    keys = [k for k in gm.state_dict() if k.startswith("spa_gates.")]
    assert "spa_gates.1.score.0.weight" in keys and "spa_gates.2.trained" in keys
    assert sorted(gates_of(gm)) == sorted(gates_of(torch.nn.Sequential(gm))) == [1, 2]   # e.g. inside DDP
    with torch.no_grad():
        for g in gates_of(gm).values():
            g.score[2].bias.add_(0.3)          # something training would have changed
    path = tmp_path / "spa.tokenopt.pt"
    # made in Python, the model is known by its class alone, which builds timm's default: save is told how it was built
    tokenopt.save(gm, path, arch="timm:vit_small_patch16_224?img_size=32&patch_size=4&depth=3&num_classes=10"
                                 "&embed_dim=48&num_heads=4")
    loaded = tokenopt.load(path, arch=tiny_timm())
    x = images()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(loaded(x), gm(x))


def test_untrained_gates_warn_once_and_strict_refuses():
    model = tiny_timm()
    gm = optimize(model, recipe())
    with pytest.warns(UntrainedGateWarning, match=r"layer\(s\) 1, 2 were never trained"):
        gm(images())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm(images())
    strict = optimize(model, recipe(strict=True))
    with pytest.raises(PlanError, match="strict: true"):
        strict(images())
    trained(strict)(images())


def test_bypass_returns_every_patch_token_in_place():
    model = tiny_timm()
    x = images()
    gm = trained(optimize(model, recipe(outputs="tokens")))
    full = optimize(model, {"version": 1, "outputs": "tokens", "rules": [{"pass": "tome", "r": 0}]})
    out, v, seen = run_capturing(gm, x)
    assert out.shape == (4, 64, 48)
    last = record_of(gm).analysis.blocks[2]
    skipped = ~seen[2].keep
    norm = model.norm(v[last.input])
    assert skipped.any()      # tokens the last layer skipped are the final norm of its input, in place
    torch.testing.assert_close(out[skipped[:, 1:]], norm[:, 1:][skipped[:, 1:]], rtol=0, atol=1e-6)
    everything = trained(optimize(model, recipe(outputs="tokens", threshold=0.0)))
    with torch.no_grad():
        assert torch.equal(everything(x), full(x))


def test_prune_refuses_token_outputs():
    with pytest.raises(PlanError, match="(?s)mode: prune drops tokens for good.*Use mode: bypass"):
        optimize(tiny_timm(), recipe(mode="prune", outputs="tokens"))


def test_report_gives_expected_and_maximum_tokens_and_the_gate_cost():
    model = tiny_timm()
    gm = optimize(model, recipe(mode="prune", max_keep=0.5, threshold=0.5, min_keep=4), report=True)
    rows = record_of(gm).report.rows
    assert rows[1].tokens_out.max == 1 + 32 and rows[1].tokens_out.varies
    assert rows[2].tokens_out.max == 1 + 16
    # (1 - 0.5) * 64 = 32 expected, but at 32 = max_keep images may still keep fewer: planned just below
    assert rows[1].tokens_out.expected == pytest.approx(1 + 31.5)
    assert rows[1].measured_out is not None
    assert rows[1].selector_flops == 65 * 48          # one linear 48 -> 1 on every token of the image
    # layer 2's gate reads only the tokens layer 1 kept (FLOPs are counted on one example image)
    kept = rows[2].selector_flops / 48
    assert kept == int(kept) and 1 + 4 <= kept <= 33
    assert rows[0].selector_flops == 0
    assert "≤ 33" in str(record_of(gm).report)


# ------------------------------------------------------------------------------------------------
# user errors


@pytest.mark.parametrize("option, says", [("threshold: 1.5", "threshold must be a probability in [0, 1]"),
                                          ("threshold: -0.1", "threshold must be a probability in [0, 1]"),
                                          ("min_keep: 0.6\n    max_keep: 0.3", "min_keep (0.6) is above max_keep"),
                                          ("max_keep: 0", "max_keep must be at least 1")])
def test_bad_options_name_the_line(tmp_path, option, says):
    path = tmp_path / "r.yaml"
    path.write_text(f"version: 1\nrules:\n  - pass: spa\n    layers: 1-2\n    {option}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml, line 3") as e:
        optimize(tiny_timm(), path)
    assert says in str(e.value)


def test_min_keep_count_above_max_keep_fraction_names_the_layer(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nrules:\n  - pass: spa\n    layers: 1-2\n    min_keep: 40\n    max_keep: 0.5\n")
    with pytest.raises(RecipeError, match=r"line 3 .*min_keep=40 is 40 tokens at blocks.1 \(1\) but max_keep=0.5 "
                                          r"is 32"):
        optimize(tiny_timm(), path)


def test_spa_after_a_merge_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nrules:\n  - pass: tome\n    r: 2\n  - pass: spa\n    layers: 2\n")
    with pytest.raises(RecipeError, match=r"(?s)line 5 .*blocks.2 \(2\) gets 61 of its 65 tokens after an earlier "
                                          r"merge.*Apply spa to layers before"):
        optimize(tiny_timm(), path)


def test_a_merge_after_spa_prune_is_refused():
    rules = [{"pass": "spa", "layers": "1", "mode": "prune"}, {"pass": "tome", "layers": "2", "r": 2}]
    with pytest.raises(PlanError, match=r"(?s)blocks.2: tome cannot merge a packed token stream.*use spa mode: bypass"):
        optimize(tiny_timm(), {"version": 1, "rules": rules})
    # bypass leaves every token in place: merging afterwards is fine
    rules[0]["mode"] = "bypass"
    optimize(tiny_timm(), {"version": 1, "rules": rules}, report=False)


MODEL = "timm:vit_small_patch16_224?img_size=32&patch_size=4&depth=3&num_classes=10&embed_dim=48&num_heads=4"


@pytest.mark.parametrize("rules, says", [
    ("  - pass: spa\n    layers: 1-2\n    threshold: 2\n", "line 3 (rule 1, pass spa): option 'threshold'"),
    ("  - pass: spa\n    layers: 1-2\n    min_keep: 0.9\n    max_keep: 0.2\n", "min_keep (0.9) is above max_keep (0.2)"),
    ("  - pass: tome\n    r: 2\n  - pass: spa\n    layers: 2\n", "line 5 (rule 2, pass spa): blocks.2 (2) gets 61"),
])
def test_cli_refuses_bad_spa_recipes_with_exit_2_and_writes_nothing(tmp_path, rules, says):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nrules:\n" + rules)
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(app, ["apply", str(path), MODEL, "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_prune_on_an_exported_hf_vit_equals_a_per_image_loop(layout):
    # torch.export reads the batch size once off the image; each block must read its own, since a
    # packed block runs on a batch of 1 (analysis.batch_size.localise_batch)
    model = hf_vit()
    gm = trained(optimize(model, recipe(mode="prune", layout=layout), example_input=images(2), capture="export"))
    assert record_of(gm).capture == "export"
    x = images()
    out, _, seen = run_capturing(gm, x)
    assert (seen[2].valid.sum(1) < seen[1].valid.sum(1)).all()
    head = lambda h: model.classifier(model.vit.layernorm(h)[:, 0])  # noqa: E731
    want = prune_reference(model, gm, x, seen, head, capture="export")
    assert type(out).__name__ == "ImageClassifierOutput"       # the return type is the original's
    torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["bypass", "prune"])
def test_both_front_ends_give_the_same_spa_model(mode):
    """timm's ViT and nn.MultiheadAttention (whose exported graph folds heads into the batch and
    splits them back with the batch size) rewritten from an fx and from an export capture, with
    the same gates and the same forced keep: the same outputs."""
    for model in (tiny_timm(), own_vit("mha")):
        x = images()
        gms = [trained(optimize(model, recipe(mode=mode), example_input=images(2), capture=c)) for c in ("fx", "export")]
        gms[1].load_state_dict(gms[0].state_dict())
        outs = []
        for gm in gms:
            with torch.no_grad(), force_keep(gm, 0.5, seed=3):
                outs.append(gm(x))
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)


def test_gate_noise_reaches_the_gates_and_is_checked():
    gm = optimize(tiny_timm(depth=2), recipe(layers="1", gate={"hidden": 0, "noise": 0.0}))
    assert [g.noise for g in gates_of(gm).values()] == [0.0]
    with pytest.raises(RecipeError, match="noise"):
        optimize(tiny_timm(depth=2), recipe(layers="1", gate={"noise": -1}))
