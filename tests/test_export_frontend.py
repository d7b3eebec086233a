"""The torch.export capture front end (issue 11): the ViTs people have, captured where fx cannot trace.

Tiny random-init models of each family are built in code (nothing is downloaded): Hugging Face
transformers (ViT, DeiT distilled, DINOv2 with and without registers, CLIP and SigLIP vision
towers, BEiT), timm, torchvision and open_clip. Checks:

* r=0 gives the original's outputs bit for bit, of the original's type, through both front ends;
* ToMe equals a per-image reference written from the paper (this file, on the Hugging Face
  modules' own weights) on the HF ViT and on DINOv2 with registers (5 prefix tokens);
* a timm ViT captured by fx and by export gives the same rewritten outputs and report rows;
* ToSA selectors train on an HF ViT, ToFu runs, artifacts replay the capture;
* BEiT is refused with its reason, a model without blocks is named by family (CLI: exit 2).

torch.export of a tiny model costs 1-3 s: models and captures are shared at module scope.
"""
from __future__ import annotations

import copy
import operator
import sys
import textwrap

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import tokenopt
from reference_tome import merge_one_image, unmerge_one_image
from tokenopt.analysis import analyse, analyse_graph, capture_graph, family_of
from tokenopt.analysis.example import record_shapes
from tokenopt.analysis.aten_vocabulary import canonical_ops
from tokenopt.analysis.batch_size import localise_batch
from tokenopt.analysis.constant_masks import drop_constant_masks
from tokenopt.analysis.token_axis import free_token_axis
from tokenopt.errors import AnalysisError, RecipeError
from tokenopt.record import record_of

transformers = pytest.importorskip("transformers")

IMG = 32
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=IMG, patch_size=8)


def unit_gain(model: nn.Module) -> nn.Module:
    """Weights at unit gain (HF's 0.02-std init makes blocks near-identity, under which merging
    changes little and a parity test would prove little)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, intermediate_size=64, num_labels=5))


def hf_deit():
    return transformers.DeiTForImageClassificationWithTeacher(
        transformers.DeiTConfig(**SMALL, intermediate_size=64, num_labels=5))


def hf_dinov2():
    return transformers.Dinov2Model(transformers.Dinov2Config(**SMALL, mlp_ratio=2))


def hf_dinov2_registers(layers: int = 3):
    cfg = dict(SMALL, num_hidden_layers=layers)
    return transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**cfg, mlp_ratio=2, num_register_tokens=4))


def hf_clip():
    return transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**SMALL, intermediate_size=64, projection_dim=16))


def hf_siglip():
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL, intermediate_size=64))


def hf_beit():
    return transformers.BeitForImageClassification(
        transformers.BeitConfig(**SMALL, intermediate_size=64, num_labels=5, use_relative_position_bias=True))


def timm_vit():
    import timm
    return timm.create_model("vit_small_patch16_224", img_size=IMG, patch_size=8, depth=2, num_classes=10,
                             embed_dim=64, num_heads=2)


def torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=IMG, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=5)


def open_clip_vit():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.transformer.VisionTransformer(image_size=IMG, patch_size=8, width=32, layers=2, heads=2,
                                                   mlp_ratio=2.0, output_dim=16)


# name -> (builder, expected prefix tokens); the first group is fast, the second slow-marked
FAST = {"hf_vit": (hf_vit, 1), "hf_dinov2_registers": (hf_dinov2_registers, 5), "timm_vit": (timm_vit, 1),
        "torchvision_vit": (torchvision_vit, 1)}
SLOW = {"hf_deit": (hf_deit, 2), "hf_dinov2": (hf_dinov2, 1), "hf_clip": (hf_clip, 1), "hf_siglip": (hf_siglip, 0),
        "open_clip_vit": (open_clip_vit, 1)}
FAMILIES = {**FAST, **SLOW}
FX_TRACEABLE = ("timm_vit", "torchvision_vit", "open_clip_vit")
# nn.MultiheadAttention takes a fused inference kernel under no_grad whose last bits differ from
# the ops torch.export records (and fx, which keeps the module whole, calls the same kernel):
# these compare with grad enabled, where eager runs the very ops the exported graph runs
MHA_FAMILIES = ("torchvision_vit", "open_clip_vit")


def family_params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FAMILIES]


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(name):
        if name not in built:
            built[name] = unit_gain(FAMILIES[name][0]())
        return built[name]
    return get


def leaves(out):
    return torch.utils._pytree.tree_leaves(out)


def tome(r, **options):
    return {"version": 1, "rules": [{"pass": "tome", "r": r, **options}]}


def run(model, x, grad=False):
    with torch.set_grad_enabled(grad):
        return model(x)


# ---------------------------------------------------------------- r = 0: the original, bit for bit

@pytest.mark.parametrize("name", family_params())
def test_r0_is_the_original_through_export(models, images, name):
    model = models(name)
    gm = tokenopt.optimize(model, tome(0), images[:2], capture="export", report=False)
    assert record_of(gm).capture == "export"
    assert record_of(gm).analysis.prefix_tokens == FAMILIES[name][1]
    grad = name in MHA_FAMILIES
    want, got = run(model, images, grad), run(gm, images, grad)      # batch 3: the capture's batch was 2
    assert type(got) is type(want)
    assert [type(v) for v in leaves(got)] == [type(v) for v in leaves(want)]
    assert all(torch.equal(a, b) for a, b in zip(leaves(want), leaves(got), strict=True))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FX_TRACEABLE])
def test_r0_is_the_original_through_fx(models, images, name):
    model = models(name)
    gm = tokenopt.optimize(model, tome(0), images[:2], capture="fx", report=False)
    assert record_of(gm).capture == "fx"
    assert torch.equal(run(model, images), run(gm, images))


def test_auto_capture_takes_fx_where_it_traces_and_export_where_it_does_not(models, images):
    assert analyse(models("timm_vit"), images[:2]).capture == "fx"
    assert analyse(models("hf_vit"), images[:2]).capture == "export"
    with pytest.raises(AnalysisError, match="cannot trace ViTForImageClassification with torch.fx"):
        analyse(models("hf_vit"), images[:2], capture="fx")
    with pytest.raises(AnalysisError, match="capture must be one of auto, fx, export, got 'onnx'"):
        analyse(models("hf_vit"), images[:2], capture="onnx")


# ---------------------------------------------------------------- ToMe against a per-image reference

def _hf_parts(model):
    """(embeddings, layers, final norm, head or None) of an HF ViT / DINOv2 model."""
    body = getattr(model, "vit", model)
    layers = body.layers if hasattr(body, "layers") else body.encoder.layer
    return body.embeddings, layers, body.layernorm, getattr(model, "classifier", None)


def _hf_attention(layer, x, size, heads, prop_attn):
    """softmax(q k^T * scale + log size) v, written out; and the keys averaged over heads."""
    a = layer.attention
    b, n, c = x.shape
    q, k, v = (p(x).reshape(b, n, heads, c // heads).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
    logits = (q @ k.transpose(-2, -1)) * a.scaling
    if prop_attn:
        logits = logits + size.log()[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return a.o_proj(out), k.mean(1)


@torch.no_grad()
def hf_tome_reference(model, images, rs, prefix, prop_attn=True):
    """ToMe on an HF ViT or DINOv2 model, one image at a time: (final normed tokens on the
    original grid, final normed tokens as merged, per image)."""
    embeddings, layers, norm, _ = _hf_parts(model)
    heads = model.config.num_attention_heads
    x = embeddings(images)
    n0 = x.shape[1]
    size = torch.ones(x.shape[:2])
    members = [[[p] for p in range(n0)] for _ in range(x.shape[0])]
    for layer, r in zip(layers, rs):
        norm1 = getattr(layer, "layernorm_before", None) or layer.norm1
        norm2 = getattr(layer, "layernorm_after", None) or layer.norm2
        ls1, ls2 = getattr(layer, "layer_scale1", nn.Identity()), getattr(layer, "layer_scale2", nn.Identity())
        a, metric = _hf_attention(layer, norm1(x), size, heads, prop_attn)
        x = x + ls1(a)
        if r > 0:
            merged = [merge_one_image(x[i], size[i], metric[i], r, prefix, members[i]) for i in range(x.shape[0])]
            x, size = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
            members = [m[2] for m in merged]
        x = x + ls2(layer.mlp(norm2(x)))
    x = norm(x)
    grid = torch.stack([unmerge_one_image(t, ms, n0) for t, ms in zip(x, members)])
    return grid, x


@pytest.mark.parametrize("prop_attn", [True, False])
def test_tome_on_hf_vit_equals_the_per_image_reference(models, images, prop_attn):
    model = models("hf_vit")
    gm = tokenopt.optimize(model, tome(3, prop_attn=prop_attn), images[:2], report=False)
    got = gm(images)
    assert type(got).__name__ == "ImageClassifierOutput"
    _, merged = hf_tome_reference(model, images, [3, 3], prefix=1, prop_attn=prop_attn)
    want = model.classifier(merged[:, 0])
    assert (got.logits - want).abs().max().item() < 1e-5
    assert (got.logits - model(images).logits).abs().max().item() > 1e-3     # merging changed something


def test_tome_on_dinov2_with_registers_equals_the_per_image_reference(models, images):
    """21 tokens (class + 4 registers + 16 patches): the 5 prefix tokens are never merged; the
    model's last_hidden_state comes back on the original grid, its pooler output from the class token."""
    model = models("hf_dinov2_registers")
    gm = tokenopt.optimize(model, tome(3), images[:2], report=False)
    assert record_of(gm).analysis.prefix_tokens == 5
    got = gm(images)
    assert type(got).__name__ == "BaseModelOutputWithPooling"
    grid, merged = hf_tome_reference(model, images, [3, 3, 3], prefix=5)
    assert got.last_hidden_state.shape == (3, 21, 32)
    assert (got.last_hidden_state - grid).abs().max().item() < 1e-5
    assert (got.pooler_output - merged[:, 0]).abs().max().item() < 1e-5
    # the prefix tokens stay themselves: on the grid each of the 5 appears exactly once, unmerged
    tokens = tokenopt.optimize(model, tome(3), images[:2], outputs="tokens", report=False)(images)
    assert isinstance(tokens, torch.Tensor) and tokens.shape == (3, 16, 32)
    assert (tokens - grid[:, 5:]).abs().max().item() < 1e-5


# ---------------------------------------------------------------- one model, two front ends

def test_timm_vit_through_both_front_ends_gives_the_same_model_and_report(models, images):
    model = models("timm_vit")
    by = {c: tokenopt.optimize(model, tome(3), images[:2], capture=c) for c in ("fx", "export")}
    a, b = (run(by[c], images) for c in ("fx", "export"))
    assert (a - b).abs().max().item() < 1e-6
    assert (a - run(model, images)).abs().max().item() > 1e-3
    rows = {c: [(r.index, r.path, str(r.tokens_in), str(r.tokens_out), r.flops_before, r.flops_after, r.acted)
                for r in record_of(by[c]).report.rows] for c in by}
    assert rows["fx"] == rows["export"]
    fx_report, ex_report = record_of(by["fx"]).report, record_of(by["export"]).report
    assert (fx_report.flops_before, fx_report.flops_after) == (ex_report.flops_before, ex_report.flops_after)
    assert (fx_report.prefix_tokens, fx_report.pooling) == (ex_report.prefix_tokens, ex_report.pooling)


@pytest.mark.slow        # ~10 s on a loaded 2-core machine (two linearity probes)
def test_tofu_runs_on_an_exported_graph_as_on_a_traced_one(models, images):
    """ToFu (prune and MLERP, and op: auto whose linearity probe cuts blocks out of the graph)."""
    model = models("timm_vit")
    recipe = {"version": 1, "rules": [{"pass": "tofu", "r": 3, "op": "auto"}]}
    by = {c: tokenopt.optimize(model, recipe, images[:2], capture=c, calibration=images, report=False)
          for c in ("fx", "export")}
    assert record_of(by["fx"]).context["linearity"] == pytest.approx(record_of(by["export"]).context["linearity"],
                                                                   rel=1e-5)
    assert (run(by["fx"], images) - run(by["export"], images)).abs().max().item() < 1e-6
    hf = tokenopt.optimize(models("hf_vit"), {"version": 1, "rules": [{"pass": "tofu", "r": 3, "op": "mlerp"}]},
                           images[:2], report=False)
    out = hf(images)
    assert type(out).__name__ == "ImageClassifierOutput" and out.logits.shape == (3, 5)
    assert torch.isfinite(out.logits).all()


class MHAWithWeights(nn.Module):
    """nn.MultiheadAttention called with its default need_weights=True (weights unused): torch.export
    writes it out as bmm / softmax / bmm over (B*H, N, d), heads folded into the batch."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.n1(x)
        x = x + self.mha(h, h, h)[0]
        return x + self.mlp(self.n2(x))


@pytest.mark.parametrize("kind", ["mha-weights", pytest.param("explicit", marks=pytest.mark.slow)])
def test_attention_written_out_by_export_is_rewritten_as_fx_rewrites_it(images, kind):
    """The same user model through both front ends: fx keeps nn.MultiheadAttention whole (the
    rewriter writes it out), export hands over its ATen ops; explicit softmax attention is
    matched in both. ToMe gives the same outputs either way."""
    from vit_models import ExplicitViT, MHAViT

    torch.manual_seed(0)
    if kind == "explicit":
        model = ExplicitViT(dim=32, depth=2, heads=4)
    else:
        model = MHAViT(dim=32, depth=2, heads=4)
        model.blocks = nn.ModuleList(MHAWithWeights() for _ in range(2))
    model = unit_gain(model)
    a = analyse(model, images[:2], capture="export")
    assert [b.refusal for b in a.blocks] == [None, None]
    assert [b.attention.heads for b in a.blocks] == [4, 4]
    by = {c: tokenopt.optimize(model, tome(3), images[:2], capture=c, report=False) for c in ("fx", "export")}
    assert (by["fx"](images) - by["export"](images)).abs().max().item() < 1e-5
    assert (by["fx"](images) - model(images)).abs().max().item() > 1e-3


# ---------------------------------------------------------------- ToSA on a Hugging Face ViT

@pytest.mark.slow        # ~15 s on a loaded 2-core machine (two exports, training)
def test_tosa_selectors_train_on_an_hf_vit(models, images):
    from tokenopt.passes.tosa import selectors
    from tokenopt.train.selector import held_out_kl, train_selectors

    model = models("hf_vit")
    gm = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tosa", "layers": [1], "keep": 0.5,
                                                            "selector": {"input": "map", "hidden": 8}}]},
                           images[:2], report=False)
    assert record_of(gm).capture == "export"
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, IMG, IMG, generator=torch.Generator().manual_seed(2)),
                                          torch.zeros(32, dtype=torch.long))
    before = held_out_kl(gm, model, images)[1]
    train_selectors(gm, model, data, epochs=2, batch_size=16, lr=1e-2, quiet=True)
    after = held_out_kl(gm, model, images)[1]
    assert all(bool(s.trained) for s in selectors(gm).values())
    assert after < before
    assert type(gm(images)).__name__ == "ImageClassifierOutput"


# ---------------------------------------------------------------- artifacts replay the capture

def test_an_artifact_of_an_exported_model_replays_the_export(models, images, tmp_path):
    model = models("hf_vit")
    gm = tokenopt.optimize(model, tome(2), images[:2])
    path = tokenopt.save(gm, tmp_path / "vit.tokenopt.pt")
    from tokenopt.artifact import read
    assert read(path)["manifest"]["capture"] == "export"
    fresh = hf_vit().eval()              # same config, other weights: the artifact's weights are loaded
    loaded = tokenopt.load(path, arch=fresh)
    assert record_of(loaded).capture == "export"
    assert torch.equal(loaded(images).logits, gm(images).logits)


# ---------------------------------------------------------------- refusals and messages

@pytest.mark.slow
def test_beit_is_refused_with_its_reason(images):
    model = unit_gain(hf_beit())
    a = analyse(model, images[:2])
    assert a.capture == "export" and len(a.blocks) == 2
    assert all(b.refused_by == "relative_position_bias" for b in a.blocks)
    with pytest.raises(RecipeError, match="relative-position bias"):
        tokenopt.optimize(model, tome(2), images[:2])


def test_weights_as_wide_as_the_token_grid_are_not_a_rotation_table():
    # 32 px / patch 4 = 64 patch tokens and 64 channels: exported, every projection weight has a
    # 64-wide axis; the RoPE check once took them for position tables and refused every block
    import timm
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2,
                              num_heads=4, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    for mode in ("fx", "export"):
        a = analyse(model, x, capture=mode)
        assert a.capture == mode and [b.refused_by for b in a.blocks] == [None, None]


def hf_resnet():
    return transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))


def test_a_model_without_blocks_is_named_by_its_family(images):
    with pytest.raises(AnalysisError) as e:
        analyse(hf_resnet().eval(), images[:2])
    assert str(e.value).startswith("Hugging Face transformers ResNetModel (resnet) has no transformer blocks")
    assert family_of(timm_vit()) == "timm vit_small_patch16_224"
    assert family_of(torchvision_vit()) == "torchvision VisionTransformer"


@pytest.fixture()
def hf_factories(tmp_path):
    (tmp_path / "tokenopt_hf_factories.py").write_text(textwrap.dedent('''\
        import transformers

        def resnet():
            return transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                      depths=[1, 1]))

        def vit():
            return transformers.ViTForImageClassification(transformers.ViTConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                intermediate_size=64, num_labels=5))
        '''))
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    sys.modules.pop("tokenopt_hf_factories", None)


def test_cli_names_the_family_without_blocks_and_refuses_a_bad_capture(hf_factories):
    from tokenopt.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["inspect", "tokenopt_hf_factories:resnet", "--input-size", "3,32,32"])
    assert res.exit_code == 2
    assert "Hugging Face transformers ResNetModel (resnet) has no transformer blocks" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["inspect", "tokenopt_hf_factories:vit", "--capture", "onnx"])
    assert res.exit_code == 2 and "capture must be one of auto, fx, export" in res.output
    res = runner.invoke(app, ["inspect", "tokenopt_hf_factories:vit", "--capture", "export"])
    assert res.exit_code == 0, res.output
    assert "2 transformer block(s)" in res.output and "prefix tokens: 1" in res.output


# ---------------------------------------------------------------- the normalisation, piece by piece

def _graph(build, *shapes):
    """A GraphModule from ``build(graph, *placeholders)``, shapes recorded on inputs of ``shapes``."""
    g = fx.Graph()
    xs = [g.placeholder(f"x{i}") for i in range(len(shapes))]
    g.output(build(g, *xs))
    gm = fx.GraphModule(nn.Module(), g)
    record_shapes(gm, *[torch.randn(s) for s in shapes]) if len(shapes) == 1 else None
    return gm


def test_free_token_axis_reads_kept_merged_and_split_sizes_at_run_time():
    """A view spelled with the captured token count (17) follows a tensor with fewer tokens once
    freed; the numbers it computes on the captured shapes do not change."""
    def build(g, x):                                      # x (2, 17, 32)
        b = g.call_method("size", (x, 0))
        heads = g.call_method("view", (x, [b, 17, 2, 16]))                 # 17 kept
        t = g.call_method("transpose", (heads, 1, 2))                      # (2, 2, 17, 16)
        flat = g.call_method("reshape", (t, [b, 2, 17 * 16]))              # 17 x 16 merged
        seq = g.call_method("transpose", (x, 0, 1))                        # (17, 2, 32)
        rows = g.call_method("reshape", (seq, [g.call_function(operator.mul, (b, 17)), 32]))   # (34, 32)
        back = g.call_method("view", (rows, [17, b, 32]))                  # 34 -> 17 x b: split
        return heads, flat, back

    gm = _graph(build, (2, 17, 32))
    x = torch.randn(2, 17, 32)
    want = gm(x)
    assert free_token_axis(gm) == 7       # tokens kept, merged (twice), split; 3 sizes that never change
    sizes = [a for n in gm.graph.nodes if n.target in ("view", "reshape") for a in n.args[1]]
    assert 17 not in sizes and 17 * 16 not in sizes
    assert all(torch.equal(a, b) for a, b in zip(want, gm(x)))
    fewer = gm(torch.randn(3, 11, 32))
    assert [tuple(t.shape) for t in fewer] == [(3, 11, 2, 16), (3, 2, 11 * 16), (11, 3, 32)]


def test_free_token_axis_leaves_channel_splits_alone():
    def build(g, x):                                      # x (2, 17, 96): qkv split into 3 x 2 heads x 16
        return g.call_method("reshape", (x, [2, 17, 3, 2, 16]))

    gm = _graph(build, (2, 17, 96))
    assert free_token_axis(gm) == 2                        # batch and tokens; 96 -> 3 x 2 x 16 stays
    view = next(n for n in gm.graph.nodes if n.target == "reshape")
    assert view.args[1][2:] == [3, 2, 16]


def test_localise_batch_makes_each_block_read_its_own_batch_size():
    """Export reads the batch off the image once; after localise_batch a block reads it off its
    own input, so swapping in an input of another batch (what SPA's packing does) still reshapes."""
    def build(g, x):                                      # x (2, 17, 32): image; block = (x*2).view(B, 17, 2, 16)
        b = g.call_function(torch.ops.aten.sym_size.int, (x, 0))
        start = g.call_function(operator.mul, (x, 2.0))
        view = g.call_method("view", (start, [b, g.call_method("size", (start, 1)), 2, 16]))
        end = g.call_method("reshape", (view, [b, -1, 32]))
        seq_first = g.call_method("transpose", (end, 0, 1))                  # (17, 2, 32): batch second
        other = g.call_method("view", (seq_first, [17, b, 2, 16]))
        return end, other

    gm = _graph(build, (2, 17, 32))
    x = torch.randn(2, 17, 32)
    want = gm(x)
    spans = [("mul", "reshape"), ("transpose", "view_1")]
    assert localise_batch(gm, spans) == 2                 # both uses in the first block; the second is left
    assert all(torch.equal(a, b) for a, b in zip(want, gm(x)))
    reads = {n.name: {a.name for a in n.args[1] if isinstance(a, fx.Node)}
             for n in gm.graph.nodes if n.target in ("view", "reshape")}
    assert "sym_size_int" not in reads["view"] | reads["reshape"]
    assert "sym_size_int" in reads["view_1"]             # its input leads with tokens, not the batch
    # the block's input now comes from a batch of 1 (two images' tokens packed): it follows
    start = next(n for n in gm.graph.nodes if n.name == "mul")
    with gm.graph.inserting_before(start):
        packed = gm.graph.call_method("reshape", (start.args[0], [1, -1, 32]))
    start.args = (packed, 2.0)
    gm.recompile()
    end = next(n for n in gm.graph.nodes if n.name == "reshape")
    gm.graph.output_node().args = (end,)
    gm.recompile()
    assert torch.equal(gm(x), (2 * x).reshape(1, 34, 32))


def test_drop_constant_masks_keeps_a_mask_that_masks_or_reads_parameters():
    """The all-True mask Hugging Face builds from sizes goes; a mask that masks, or reads a
    parameter (a position bias), stays. Attention is the same either way."""
    def sdpa_with(mask_kind):
        g = fx.Graph()
        x = g.placeholder("x")                                       # (B, 2, 5, 4)
        b, n = g.call_method("size", (x, 0)), g.call_method("size", (x, 2))
        if mask_kind == "parameter":
            mask = g.call_method("expand", (g.get_attr("bias"), b, 1, n, n))
        else:
            ones = g.call_function(torch.ones, (b, 1, n, n), {"dtype": torch.bool})
            mask = ones if mask_kind == "all-true" else g.call_function(torch.tril, (ones,))
        g.output(g.call_function(F.scaled_dot_product_attention, (x, x, x), {"attn_mask": mask}))
        root = nn.Module()
        root.bias = nn.Parameter(torch.zeros(1, 1, 5, 5))
        return fx.GraphModule(root, g)

    x = torch.randn(2, 2, 5, 4)
    for kind, dropped in (("all-true", 1), ("causal", 0), ("parameter", 0)):
        gm = sdpa_with(kind)
        record_shapes(gm, x)
        want = gm(x)
        assert len(drop_constant_masks(gm, [x])) == dropped, kind
        assert torch.allclose(gm(x), want, atol=1e-6)
        if kind != "parameter":       # the dropped mask's computation goes too
            assert any(n.target is torch.ones for n in gm.graph.nodes) == (not dropped)


def test_an_exported_graph_speaks_the_traced_vocabulary(models, images):
    """After capture no ATen overload of an op the patterns read is left in the graph."""
    gm = capture_graph(models("hf_vit"), images[:2], "export").graph
    aten_left = {str(n.target) for n in gm.graph.nodes
                 if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
    assert aten_left <= {"aten.sym_size.int"}, aten_left
    assert canonical_ops(gm) == 0                               # already canonical


# ---------------------------------------------------------------- GraphRewriter primitives on an exported graph

@pytest.mark.parametrize("kind", [pytest.param("softmax", marks=pytest.mark.slow), "sdpa",
                                  pytest.param("mha", marks=pytest.mark.slow)])
def test_rewriter_attention_primitives_work_on_an_exported_graph(kind):
    """test_rewriter's references, on graphs torch.export captured: a per-key bias added to one
    block's logits equals the by-hand forward; attention replaced by a written-out one is the
    original; the scale is read from the graph (an explicit chain's factor, SDPA's default)."""
    from test_rewriter import DEPTH, by_hand, images as vit_images, key_ramp, three_vits
    from tokenopt.rewrite import GraphRewriter

    models, x = three_vits(), vit_images()
    captured = capture_graph(models[kind], x, "export").graph
    second = copy.deepcopy(captured)
    a = analyse_graph(captured, models[kind], tuple(x.shape))
    g = GraphRewriter(a)
    blk = a.blocks[2]
    g.add_attention_bias(blk, key_ramp, g.node(blk.input))
    with torch.no_grad():
        torch.testing.assert_close(g.finish()(x), by_hand(models["softmax"], x, bias_block=2), rtol=0, atol=2e-5)

    calls = []

    def written_out(q, k, v, attn_mask=None, scale=None, **kw):
        calls.append(scale)
        logits = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        return (logits if attn_mask is None else logits + attn_mask).softmax(-1) @ v

    a = analyse_graph(second, models[kind], tuple(x.shape))
    g = GraphRewriter(a)
    for b in a.blocks:
        g.replace_attention(b, written_out)
    with torch.no_grad():
        torch.testing.assert_close(g.finish()(x), models[kind](x), rtol=0, atol=2e-5)
    assert len(calls) == DEPTH
    if kind == "softmax":      # (q @ k^T) * (C // H) ** -0.5, C = 32, H = 4
        assert calls == [pytest.approx(8 ** -0.5)] * DEPTH
