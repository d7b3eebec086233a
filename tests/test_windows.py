"""Windowed blocks (Swin): the analysis reads each block's windows, shift, grid and stage in both front ends."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from tokenopt.analysis import analyse, shape_of
from tokenopt.analysis.records import WINDOWED

transformers = pytest.importorskip("transformers")


def tiny_swin(window=4, img=64, depths=(2, 2), dim=32):
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img, embed_dim=dim,
                          depths=depths, num_heads=tuple(2 ** i for i in range(len(depths))),
                          window_size=window, num_classes=10).eval()
    with torch.no_grad():       # a trained model's bias matters: at init (std 0.02) a wrong gather hides in 1e-5
        for name, p in m.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.mul_(50)
    return m


def hf_swin():
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                  window_size=4, num_labels=3)
    return transformers.SwinForImageClassification(cfg).eval()


X = torch.randn(2, 3, 64, 64)
# (stage, grid, windows per image, shift) of each block of the 2-stage models above
EXPECTED = [(1, (16, 16), 16, (0, 0)), (1, (16, 16), 16, (2, 2)), (2, (8, 8), 4, (0, 0)), (2, (8, 8), 4, (2, 2))]


@pytest.mark.parametrize("make,capture", [(tiny_swin, "fx"), (tiny_swin, "export"), (hf_swin, "export")])
def test_each_block_records_its_windows(make, capture):
    a = analyse(make(), X, capture=capture)
    assert len(a.blocks) == 4 and [s.grid for s in a.streams] == [(16, 16), (8, 8)]
    assert [d.kind for d in a.downsamples] == ["merge"]          # patch merging: grid halves, channels double
    assert [s.dim for s in a.streams] == [a.streams[0].dim, 2 * a.streams[0].dim]
    for b, (stage, grid, windows, shift) in zip(a.blocks, EXPECTED):
        w = b.window
        assert (b.stream + 1, w.grid, w.windows, w.shift, w.size, w.tiles) == (stage, grid, windows, shift, (4, 4), True)
        assert b.refused_by == WINDOWED and [br.kind for br in b.branches] == ["self_attention", "mlp"]
        # the region a reduction inside windows brackets: (B * windows, 16, C) in and out
        rows = 2 * windows
        assert shape_of(a.index.node(w.entry))[:2] == (rows, 16) and shape_of(a.index.node(w.exit))[:2] == (rows, 16)
        # the relative bias gathers the table; a shifted block adds its mask as a second term
        assert len(w.relative_bias) == 1 and w.table is not None
        assert len(w.terms) == (2 if any(shift) else 1)


def test_summary_shows_stages_windows_and_shifts():
    text = analyse(tiny_swin(), X, capture="fx").summary()
    assert "[ 1] layers.0.blocks.1        softmax tokens=256   stage 1, windows 4x4 (16 per image) on 16x16, " \
           "shift 2x2" in text
    assert "[ 2] layers.1.blocks.0        softmax tokens=64    stage 2, windows 4x4 (4 per image) on 8x8\n" in text


def test_a_grid_the_windows_do_not_tile_is_recorded_padded():
    # 56 px, patch 4: a 14 x 14 grid in windows of 4 -> padded to 16 x 16
    a = analyse(tiny_swin(window=4, img=56, depths=(2,)), torch.randn(1, 3, 56, 56), capture="fx")
    w = a.blocks[0].window
    assert (w.grid, w.padded, w.tiles, w.windows) == ((14, 14), (16, 16), False, 16)
    assert "padded to 16x16" in w.describe()


def test_hf_swin_folder_is_inspected_not_refused(tmp_path):
    from typer.testing import CliRunner

    from tokenopt.cli import app
    hf_swin().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "swin"
    res = CliRunner().invoke(app, ["inspect", f"hf:{tmp_path}", ])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())       # the table wraps its cells at 80 columns: look at the lines after it
    assert text.count("windowed: stage") == 4 and "refused" not in text
    assert "stage 1: blocks 0-1, grid 16x16, dim 16 stage 2: blocks 2-3, grid 8x8, dim 32" in text


# ---------------------------------------------------------------- ToMe and ToFu inside windows

import tokenopt  # noqa: E402
from tokenopt.ops import matching  # noqa: E402
from tokenopt.ops import windows as wops  # noqa: E402


def tome(r, layers="all", pass_name="tome", **kw):
    return {"version": 1, "rules": [{"pass": pass_name, "layers": layers, "r": r, **kw}]}


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("make,capture", [(tiny_swin, "fx"), (tiny_swin, "export"), (hf_swin, "export")])
def test_r0_is_the_original_and_r4_changes_it(make, capture):
    m = make()
    with torch.no_grad():
        ref = logits_of(m(X))
        same = logits_of(tokenopt.optimize(m, tome(0), X, report=False, capture=capture)(X))
        merged = logits_of(tokenopt.optimize(m, tome(4), X, report=False, capture=capture)(X))
    assert (same - ref).abs().max() <= 1e-5
    assert (merged - ref).abs().max() > 1e-7          # tokens were merged, in every stage


def test_shift_regions_are_the_models_shift_mask():
    m = tiny_swin()
    blk = m.layers[0].blocks[1]
    labels = wops.shift_regions((16, 16), (4, 4), (2, 2))
    apart = labels[:, :, None] != labels[:, None, :]
    assert torch.equal(apart, blk.attn_mask != 0) and apart.any()
    assert (wops.shift_regions((16, 16), (4, 4), (0, 0)) == 0).all()


def _labels_from_mask(mask):
    """(nW, N): each token labelled by the first token it may attend to (the mask's equivalence classes)."""
    return (mask == 0).float().argmax(-1)


def per_window_attention(r, op="merge"):
    """timm WindowAttention.forward as a loop over images and windows: each window's tokens merged on their
    own (bipartite_match on that window alone), attention with the table's bias at the kept positions."""
    def forward(self, x, mask=None):
        rows, n, c = x.shape
        heads = self.num_heads
        n_win = mask.shape[0] if mask is not None else 1
        labels = _labels_from_mask(mask) if mask is not None else torch.zeros(1, n, dtype=torch.long)
        table_bias = self._get_rel_pos_bias()[0]                           # (heads, N, N)
        out = torch.empty_like(x)
        for i in range(rows):
            w = i % n_win
            t = x[i:i + 1]
            mt = matching.bipartite_match(t, r, 0, labels=labels[w][None])
            if op == "merge":
                kept, size = matching.merge_weighted(t, None, mt)
            else:
                kept, size = matching.prune(t, mt), torch.ones(1, n - r, 1, dtype=x.dtype)
            pos = mt.keep[0]
            k_n = kept.shape[1]
            q, k, v = self.qkv(kept).reshape(1, k_n, 3, heads, -1).permute(2, 0, 3, 1, 4)
            logits = (q * self.scale) @ k.transpose(-2, -1) + table_bias[:, pos][:, :, pos]
            if mask is not None:
                logits = logits + mask[w][pos][:, pos]
            logits = logits + size[0, :, 0].log()
            y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, k_n, c)
            y = self.proj(y)[0]
            out[i] = y[matching.merged_positions(n, mt)[0]]
        return out
    return forward


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("pass_name,op", [("tome", "merge"), ("tofu", "prune")])
def test_each_rewritten_block_is_a_loop_over_images_and_windows(monkeypatch, capture, pass_name, op):
    m = tiny_swin().double()
    x = X.double()
    extra = {"op": op} if pass_name == "tofu" else {}
    gm = tokenopt.optimize(m, tome(4, pass_name=pass_name, **extra), report=False, capture=capture,
                           example_input=x)
    with torch.no_grad():
        got = gm(x)
        monkeypatch.setattr(type(m.layers[0].blocks[0].attn), "forward", per_window_attention(4, op))
        want = m(x)
    assert (got - want).abs().max() < 1e-10


def test_no_value_or_gradient_crosses_images_or_windows():
    torch.manual_seed(0)
    rows, n, c, heads = 8, 16, 8, 2
    x = torch.randn(rows, n, c, requires_grad=True)
    bias = torch.randn(1, heads, n, n)
    kept, size, pos, source = wops.window_merge(x, 5, ((8, 8), (4, 4), (2, 2)))
    qkv = kept.reshape(rows, kept.shape[1], heads, 4).transpose(1, 2)
    y = wops.window_attention(qkv, qkv, qkv, bias=bias, pos=pos, size=size)
    out = wops.window_unmerge(source, y.transpose(1, 2).reshape(rows, kept.shape[1], c))
    out[3].sum().backward()
    touched = x.grad.abs().sum((1, 2)) > 0
    assert touched.tolist() == [i == 3 for i in range(rows)]
    # a value changed in one window changes that window's output alone
    x2 = x.detach().clone()
    x2[5, 2] += 1.0
    k2, s2, p2, src2 = wops.window_merge(x2, 5, ((8, 8), (4, 4), (2, 2)))
    q2 = k2.reshape(rows, k2.shape[1], heads, 4).transpose(1, 2)
    out2 = wops.window_unmerge(src2, wops.window_attention(q2, q2, q2, bias=bias, pos=p2, size=s2)
                               .transpose(1, 2).reshape(rows, k2.shape[1], c))
    changed = (out2 - out.detach()).abs().sum((1, 2)) > 0
    assert changed.tolist() == [i == 5 for i in range(rows)]


def test_dense_window_bias_folds_every_layout_of_the_terms():
    n, heads, nw = 4, 2, 3
    bias = torch.randn(1, heads, n, n)
    timm_mask = torch.randn(1, nw, 1, n, n)
    hf_mask = torch.randn(2 * nw, 1, n, n)
    dense = wops.dense_window_bias(n, bias, timm_mask)
    assert dense.shape == (nw, heads, n, n) and torch.equal(dense[1], bias[0] + timm_mask[0, 1])
    dense = wops.dense_window_bias(n, bias, hf_mask)
    assert dense.shape == (2 * nw, heads, n, n) and torch.equal(dense[4], bias[0] + hf_mask[4])
    pos = torch.tensor([[3, 0]] * (2 * nw))
    pair = wops.gather_pair_bias(dense, pos)
    assert pair.shape == (2 * nw, heads, 2, 2) and pair[4, 1, 0, 1] == dense[4, 1, 3, 0]


def test_r_larger_than_a_window_can_give_is_refused_naming_the_block(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from tokenopt.cli import app
    recipe = tmp_path / "r9.yaml"
    recipe.write_text(yaml.safe_dump(tome(9, layers="stage2")))
    out = tmp_path / "m.pt"
    spec = ("timm:swin_tiny_patch4_window7_224?img_size=64&embed_dim=32&depths=2,2&num_heads=1,2&window_size=4"
            "&num_classes=10")
    res = CliRunner().invoke(app, ["apply", str(recipe), spec, "-o", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    text = " ".join(res.output.split())
    assert ("layers.1.blocks.0 (2): r=9 is more than a 4x4 window can give: tome merges inside each window of 16 "
            "tokens, at most 8 of them. Lower r to 8 or less for this block") in text
    assert not out.exists()


# ---------------------------------------------------------------- SPA inside windows (bypass)

import warnings  # noqa: E402

from tokenopt.passes.spa import capture_gate_outputs, force_keep  # noqa: E402


def spa(layers="stage2", **kw):
    return {"version": 1, "rules": [{"pass": "spa", "layers": layers, **kw}]}


@pytest.mark.parametrize("make,capture", [(tiny_swin, "fx"), (tiny_swin, "export"), (hf_swin, "export")])
def test_spa_keeping_every_token_is_the_original(make, capture):
    m = make()
    gm = tokenopt.optimize(m, spa("all", threshold=0.0, min_keep=1.0), X, report=False, capture=capture)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the gates are untrained: they keep everything here anyway
        assert (logits_of(gm(X)) - logits_of(m(X))).abs().max() <= 1e-5


def per_window_block(keeps):
    """timm SwinTransformerBlock.forward as a loop over images and windows: in each window the kept tokens
    (``keeps[block]`` (B, H*W) on the block's grid) attend among themselves with the table's bias (and the shift
    mask) at their true positions; every other token skips the attention and the MLP."""
    def forward(self, x):
        b, h, w, c = x.shape
        if self not in keeps:
            return original_block_forward(self, x)
        keep = keeps[self].view(b, h, w)
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        hs = torch.roll(self.norm1(x), (-sh, -sw), (1, 2))
        ks = torch.roll(keep, (-sh, -sw), (1, 2))
        out = torch.zeros_like(hs)
        attn, heads = self.attn, self.attn.num_heads
        table_bias = attn._get_rel_pos_bias()[0]
        for i in range(b):
            for wi in range(h // wh):
                for wj in range(w // ww):
                    cell = (i, slice(wi * wh, (wi + 1) * wh), slice(wj * ww, (wj + 1) * ww))
                    pos = ks[cell].reshape(-1).nonzero()[:, 0]
                    if pos.numel() == 0:
                        continue
                    t = hs[cell].reshape(-1, c)[pos][None]
                    q, k, v = attn.qkv(t).reshape(1, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
                    logits = (q * attn.scale) @ k.transpose(-2, -1) + table_bias[:, pos][:, :, pos]
                    if self.attn_mask is not None:
                        logits = logits + self.attn_mask[wi * (w // ww) + wj][pos][:, pos]
                    y = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(1, -1, c))[0]
                    flat = out[cell].reshape(-1, c).clone()
                    flat[pos] = y
                    out[cell] = flat.view(wh, ww, c)
        x = x + torch.roll(out, (sh, sw), (1, 2))
        xt = x.reshape(b, -1, c)
        xt = xt + self.mlp(self.norm2(xt)) * keeps[self][..., None]
        return xt.reshape(b, h, w, c)
    return forward


original_block_forward = None


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_spa_block_is_a_loop_over_images_and_windows(monkeypatch, capture):
    global original_block_forward
    m = tiny_swin()          # float32: the gates are made in the default dtype
    x = X
    gm = tokenopt.optimize(m, spa("stage2"), x, report=False, capture=capture)
    with torch.no_grad(), warnings.catch_warnings(), force_keep(gm, 0.5), capture_gate_outputs(gm) as seen:
        warnings.simplefilter("ignore")
        got = gm(x)
    blocks = [blk for stage in m.layers for blk in stage.blocks]
    keeps = {blocks[i]: out.keep for i, out in seen.items()}
    assert sorted(seen) == [2, 3] and all(0.3 < k.float().mean() < 0.7 for k in keeps.values())
    block_type = type(blocks[0])
    original_block_forward = block_type.forward
    monkeypatch.setattr(block_type, "forward", per_window_block(keeps))
    with torch.no_grad():
        want = m(x)
    assert (got - want).abs().max() < 1e-5


def test_spa_on_a_grid_the_windows_do_not_tile_is_refused(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from tokenopt.cli import app
    recipe = tmp_path / "spa.yaml"
    recipe.write_text(yaml.safe_dump(spa("stage1")))
    out = tmp_path / "m.pt"
    spec = "timm:swin_tiny_patch4_window7_224?img_size=56&embed_dim=32&depths=2,2&num_heads=1,2&window_size=4"
    res = CliRunner().invoke(app, ["apply", str(recipe), spec, "-o", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    text = " ".join(res.output.split())
    assert "spa cannot rewrite any block it selects (2 selected): 2 blocks: its 14x14 token grid is not a whole " \
           "number of 4x4 windows (the model pads it to 16x16)" in text
    assert not out.exists()


@pytest.mark.slow
def test_real_swin_tiny_keeps_its_outputs_at_r0_and_keep_all():
    """swin_tiny_patch4_window7_224 as configured (random init): 56x56 .. 7x7 grids, windows of 7, the last stage
    one window per image. ToMe r=0 and SPA keeping every token (stages 3-4) give the original logits."""
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    a = analyse(m, x, capture="fx")
    assert [b.window.windows for b in a.blocks] == [64] * 2 + [16] * 2 + [4] * 6 + [1] * 2
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = m(x)
        for recipe in (tome(0), spa("stage3-4", threshold=0.0, min_keep=1.0)):
            assert (tokenopt.optimize(m, recipe, x, report=False, capture="fx")(x) - ref).abs().max() <= 1e-5


def per_container_block(keeps):
    """timm SwinTransformerBlock.forward with SPA's containers, written as a loop: each image's kept tokens,
    window by window (after the block's shift), fill containers of a window's size; the tokens of a container
    attend among themselves with the table's bias at their true grid offsets, clamped to the table's range."""
    def forward(self, x):
        b, h, w, c = x.shape
        if self not in keeps:
            return original_block_forward(self, x)
        keep = keeps[self].view(b, h, w)
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        n = wh * ww
        hs = torch.roll(self.norm1(x), (-sh, -sw), (1, 2))
        ks = torch.roll(keep, (-sh, -sw), (1, 2))
        rows = torch.roll(torch.arange(h)[:, None].expand(h, w), (-sh, -sw), (0, 1))
        cols = torch.roll(torch.arange(w)[None, :].expand(h, w), (-sh, -sw), (0, 1))
        attn, heads = self.attn, self.attn.num_heads
        table = attn.relative_position_bias_table
        out = torch.zeros_like(hs)
        for i in range(b):
            picked = []          # (shifted row, shifted col) of every kept token, in window order
            for wi in range(h // wh):
                for wj in range(w // ww):
                    cell = [(r, q) for r in range(wi * wh, (wi + 1) * wh) for q in range(wj * ww, (wj + 1) * ww)]
                    picked += [(r, q) for r, q in cell if ks[i, r, q]]
            for start in range(0, len(picked), n):
                group = picked[start:start + n]
                t = torch.stack([hs[i, r, q] for r, q in group])[None]
                yx = torch.tensor([[int(rows[r, q]), int(cols[r, q])] for r, q in group])
                d = yx[:, None] - yx[None]
                idx = (d[..., 0].clamp(-(wh - 1), wh - 1) + wh - 1) * (2 * ww - 1) + d[..., 1].clamp(-(ww - 1), ww - 1) + ww - 1
                q_, k_, v_ = attn.qkv(t).reshape(1, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
                logits = (q_ * attn.scale) @ k_.transpose(-2, -1) + table[idx].permute(2, 0, 1)
                y = attn.proj((logits.softmax(-1) @ v_).transpose(1, 2).reshape(1, -1, c))[0]
                for (r, q), val in zip(group, y):
                    out[i, r, q] = val
        x = x + torch.roll(out, (sh, sw), (1, 2))
        xt = x.reshape(b, -1, c)
        xt = xt + self.mlp(self.norm2(xt)) * keeps[self][..., None]
        return xt.reshape(b, h, w, c)
    return forward


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_spa_containers_are_a_loop_over_each_images_kept_tokens(monkeypatch, capture):
    global original_block_forward
    m = tiny_swin()
    gm = tokenopt.optimize(m, spa("stage2", grouping="container"), X, report=False, capture=capture)
    with torch.no_grad(), warnings.catch_warnings(), force_keep(gm, 0.5), capture_gate_outputs(gm) as seen:
        warnings.simplefilter("ignore")
        got = gm(X)
    blocks = [blk for stage in m.layers for blk in stage.blocks]
    keeps = {blocks[i]: out.keep for i, out in seen.items()}
    block_type = type(blocks[0])
    original_block_forward = block_type.forward
    monkeypatch.setattr(block_type, "forward", per_container_block(keeps))
    with torch.no_grad():
        want = m(X)
    assert (got - want).abs().max() < 1e-5


def test_spa_containers_keeping_every_token_are_the_windows_of_unshifted_blocks():
    m = tiny_swin()
    gm = tokenopt.optimize(m, spa([0, 2], grouping="container", threshold=0.0, min_keep=1.0), X, report=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (gm(X) - m(X)).abs().max() <= 1e-5
