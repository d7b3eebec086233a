"""SPA gate training: label sources (masks, the original's attention), the gate loss, the training
loop and its kept-fraction report, and the command line's bad-input errors.

References are written from the definitions, image by image, in float64 where it matters.
"""
from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tokenopt.data import get_dataset
from tokenopt.data.clutter import INK, ClutteredDigitsDataset
from tokenopt.data.masks import pool_to_grid, token_labels
from tokenopt.errors import DataError
from tokenopt.train.gate_labels import attention_labels, check_source, mask_labels

TINY_KW = dict(img_size=32, patch_size=8, depth=4, num_classes=10, embed_dim=32, num_heads=2)


# ------------------------------------------------------------------------------------------------
# masks → token grid

def _coverage_reference(mask: np.ndarray, rows: int, cols: int) -> list[float]:
    """Fraction of each patch (row-major) the mask covers, pixel by pixel."""
    h, w = mask.shape
    ph, pw = h // rows, w // cols
    out = []
    for r in range(rows):
        for c in range(cols):
            inside = sum(float(mask[y, x]) for y in range(r * ph, (r + 1) * ph) for x in range(c * pw, (c + 1) * pw))
            out.append(inside / (ph * pw))
    return out


def test_masks_pool_to_the_token_grid_like_a_per_image_count():
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 24, 32, generator=g) > 0.6).float()
    masks[1] = 0.0
    masks[1, 0:4, 0:4] = 1.0          # patch (0, 0) is 8x4 pixels: 16 of its 32 covered, exactly half
    masks[2, :, 28:] = 0.5            # a soft mask: fractional pixels count by their value
    rows, cols = 3, 8                 # patches of 8 x 4 pixels
    got = pool_to_grid(masks, (rows, cols))
    assert got.shape == (3, rows * cols)
    for i in range(3):
        ref = torch.tensor(_coverage_reference(masks[i].double().numpy(), rows, cols), dtype=torch.float64)
        torch.testing.assert_close(got[i].double(), ref, atol=1e-6, rtol=0)
        assert torch.equal(token_labels(masks[i:i + 1], (rows, cols))[0], ref >= 0.5)
    assert got[1, 0].item() == 0.5 and bool(token_labels(masks, (rows, cols))[1, 0])   # half counts as covered
    assert torch.equal(token_labels(masks, (rows, cols), cover=0.75), got >= 0.75)
    assert mask_labels(masks[:, :, :24], 9).shape == (3, 9)                             # square grid from the count
    with pytest.raises(DataError, match="patch grid"):
        pool_to_grid(masks, (5, 8))


# ------------------------------------------------------------------------------------------------
# the built-in digits-clutter masks

def test_clutter_masks_cover_the_digit_and_plain_items_stay_pairs():
    clean = ClutteredDigitsDataset("test", 64, clutter_contrast=(0.0, 0.0), masks=True)   # no clutter: only the digit
    boxed = ClutteredDigitsDataset("test", 64, masks="box")
    plain = get_dataset("digits-clutter", "test", 64)
    assert len(plain[0]) == 2
    for i in (0, 7, 123):
        image, label, mask = clean[i]
        assert mask.shape == (64, 64) and label == plain[i][1]
        canvas = clean.render(i)
        top, left, bottom, right = clean.box(i)
        m = mask.numpy() > 0
        assert m[top:bottom, left:right].sum() == m.sum() > 0              # only inside the digit's box
        # the digit's strong ink is in the mask, and everything in the mask is ink, not background
        # (background noise < 0.08; a masked pixel holds >= INK ink at >= 0.85 intensity)
        assert np.all(m[canvas > INK + 1 / 255])
        assert canvas[m].min() >= INK * 0.85 - 1 / 255
        # the image is the same with or without masks
        assert torch.equal(image, ClutteredDigitsDataset("test", 64, clutter_contrast=(0.0, 0.0))[i][0])
        b = boxed[i][2].numpy()
        assert b.sum() == (bottom - top) * (right - left) and b[top:bottom, left:right].all()
    with pytest.raises(DataError, match="no object masks"):
        get_dataset("digits", "test", 32, masks=True)


# ------------------------------------------------------------------------------------------------
# ImageFolder masks

def _write_folder(tmp_path, sizes, mask_sizes=None):
    """Images whose pixels equal their masks (white object on black), so the two can be compared after transforms."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    g = np.random.default_rng(0)
    for k, (w, h) in enumerate(sizes):
        on = np.zeros((h, w), dtype=np.uint8)
        y0, x0 = int(g.integers(0, h // 2)), int(g.integers(0, w // 2))
        on[y0:y0 + h // 3, x0:x0 + w // 2] = 255
        cls = images / str(k % 2)
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([on] * 3, -1)).save(cls / f"im{k}.png")
        (masks / str(k % 2)).mkdir(parents=True, exist_ok=True)
        mw, mh = (mask_sizes or sizes)[k]
        Image.fromarray(np.asarray(Image.fromarray(on).resize((mw, mh), Image.NEAREST)) // 255).save(
            masks / str(k % 2) / f"im{k}.png")      # stored as 0/1: any non-zero pixel is the object
    return images, masks


def test_imagefolder_masks_follow_the_images_resize_and_crop(tmp_path):
    images, masks = _write_folder(tmp_path, [(40, 30), (50, 64), (32, 32)])
    ds = get_dataset(images, "train", 32, mean=(0, 0, 0), std=(1, 1, 1), masks=masks)
    for i in range(len(ds)):
        image, label, mask = ds[i]
        assert mask.shape == image.shape[1:] == (32, 32)
        # the image is its mask drawn white: after the same geometry they agree up to interpolation overshoot
        torch.testing.assert_close(mask, image[0].clamp(0, 1), atol=2 / 255, rtol=0)
        assert 0 < mask.mean() < 1
    assert len(get_dataset(images, "train", 32)[0]) == 2


def test_imagefolder_mask_of_another_size_or_missing_is_named(tmp_path):
    images, masks = _write_folder(tmp_path, [(40, 30), (50, 64)], mask_sizes=[(40, 30), (64, 50)])
    with pytest.raises(DataError, match=r"mask '.*im1\.png' is 64x50 but its image '.*im1\.png' is 50x64"):
        get_dataset(images, "train", 32, masks=masks)
    (masks / "1" / "im1.png").unlink()
    with pytest.raises(DataError, match=r"no mask for image '.*im1\.png'"):
        get_dataset(images, "train", 32, masks=masks)
    with pytest.raises(DataError, match="has none"):
        check_source("masks", get_dataset(images, "train", 32))
    (masks / "0" / "im0.png").unlink()           # two missing: both named, and counted
    with pytest.raises(DataError) as e:
        get_dataset(images, "train", 32, masks=masks)
    assert str(e.value) == (f"no mask for 2 of the 2 images under '{images}': expected '{masks}/0/im0.png', "
                            f"'{masks}/1/im1.png' (one PNG per image, at the image's path relative to '{images}', "
                            f"under '{masks}')")


def test_many_missing_masks_are_counted_and_the_first_three_named():
    from pathlib import Path

    from tokenopt.data.masks import missing_masks_message

    missing = [(Path(f"/d/c/{i}.jpg"), Path(f"/m/c/{i}.png")) for i in range(5)]
    assert missing_masks_message(missing, 9, Path("/d"), Path("/m")) == (
        "no mask for 5 of the 9 images under '/d': expected '/m/c/0.png', '/m/c/1.png', '/m/c/2.png' and 2 more "
        "(one PNG per image, at the image's path relative to '/d', under '/m')")


# ------------------------------------------------------------------------------------------------
# attention labels

@torch.no_grad()
def _attention_by_hand(model, x, layer) -> torch.Tensor:
    """(B, H, N, N) softmax(q k^T / sqrt(d)) of timm block ``layer``, from its weights and its input."""
    seen = {}
    h = model.blocks[layer].norm1.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    with torch.no_grad():
        model(x)
    h.remove()
    attn = model.blocks[layer].attn
    t = seen["x"].detach().double()
    b, n, c = t.shape
    heads = attn.num_heads
    qkv = t @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q, k, _ = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    return ((q @ k.transpose(-2, -1)) / math.sqrt(c // heads)).softmax(-1)


def _mass_labels_reference(att: torch.Tensor, prefix: int, mass: float) -> list[list[bool]]:
    out = []
    for img in att:                                   # image by image
        heads, n, _ = img.shape
        received = [sum(float(img[hd, q, j]) for hd in range(heads) for q in range(n)) / (heads * n)
                    for j in range(prefix, n)]
        total = sum(received)
        order = sorted(range(len(received)), key=lambda j: (-received[j], j))
        chosen, acc = [False] * len(received), 0.0
        for j in order:
            if acc >= mass * total:
                break
            chosen[j] = True
            acc += received[j]
        out.append(chosen)
    return out


def test_attention_labels_are_the_most_attended_tokens_of_the_original():
    from tokenopt.train.selector import AttentionTeacher

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", **TINY_KW).eval()
    with torch.no_grad():   # sharper attention than at init, so the labels differ between images
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    x = torch.randn(3, 3, 32, 32)
    teacher = AttentionTeacher(model, x[:2])
    _, att = teacher(x, [1, 3])
    for layer in (1, 3):
        hand = _attention_by_hand(model, x, layer)
        torch.testing.assert_close(att[layer].double(), hand, atol=1e-5, rtol=0)
        for mass in (0.3, 0.5, 0.9):
            got = attention_labels(att[layer], prefix=1, mass=mass)
            ref = torch.tensor(_mass_labels_reference(hand, 1, mass))
            assert got.shape == (3, 16) and torch.equal(got, ref), (layer, mass)
    # shares that are exact binary fractions: the set stops as soon as it holds the mass, ties by position
    exact = torch.tensor([0.0, 0.5, 0.25, 0.25, 0.0]).expand(1, 2, 5, 5)
    assert attention_labels(exact, 1, 0.5).tolist() == [[True, False, False, False]]
    assert attention_labels(exact, 1, 0.75).tolist() == [[True, True, False, False]]
    assert attention_labels(exact, 1, 0.76).tolist() == [[True, True, True, False]]
    counts = attention_labels(att[3], 1, 0.5).sum(-1)
    assert counts.min() >= 1 and counts.max() < 16
    assert torch.equal(attention_labels(att[3], 1, 1.0), torch.ones(3, 16, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# the gate loss

def test_gate_bce_is_the_mean_over_present_patch_tokens():
    from tokenopt.train.gate import gate_bce

    prob = torch.tensor([[0.9, 0.2, 0.7, 0.5, 0.1], [0.3, 0.6, 0.99, 0.4, 0.8]])
    valid = torch.tensor([[True, True, True, False, True], [True, True, True, True, False]])
    labels = torch.tensor([[False, True, True, False], [True, False, False, True]])   # patch tokens only
    terms = []
    for i in range(2):
        for j in range(1, 5):                        # prefix token 0 excluded
            if not valid[i, j]:
                continue
            p, y = float(prob[i, j]), float(labels[i, j - 1])
            terms.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
    expected = sum(terms) / len(terms)
    assert gate_bce(prob, valid, labels, prefix=1).item() == pytest.approx(expected, rel=1e-6)
    # gradient reaches the probabilities of present tokens only
    p = prob.clone().requires_grad_(True)
    gate_bce(p, valid, labels, prefix=1).backward()
    assert torch.all(p.grad[:, 0] == 0) and p.grad[0, 3] == 0 and p.grad[1, 4] == 0 and p.grad[0, 1] != 0


# ------------------------------------------------------------------------------------------------
# training on the shared loop

SPA_RULE = {"pass": "spa", "layers": "second-half", "threshold": 0.5, "min_keep": 0.1}


def _tiny_spa(mode: str = "bypass"):
    import tokenopt

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", **TINY_KW).eval()
    data = torch.utils.data.Subset(get_dataset("digits-clutter", "train", 32, masks="box"), range(96))
    example = torch.stack([data[i][0] for i in range(2)])
    gm = tokenopt.optimize(model, {"version": 1, "rules": [{**SPA_RULE, "mode": mode}]}, example, report=False)
    return model, gm, data


def _held_out_bce(gm, data, prefix=1) -> float:
    from tokenopt.passes.spa import capture_gate_outputs
    from tokenopt.train.gate import gate_bce

    x = torch.stack([data[i][0] for i in range(len(data))])
    labels = mask_labels(torch.stack([data[i][2] for i in range(len(data))]), 16)
    gm.eval()
    with torch.no_grad(), capture_gate_outputs(gm) as out:
        gm(x)
        return sum(gate_bce(o.prob, o.valid, labels, prefix).item() for o in out.values()) / len(out)


def test_gate_training_lowers_the_gate_loss_and_reports_the_kept_fraction():
    from tokenopt.passes.spa import gates_of
    from tokenopt.train.gate import train_gates

    model, gm, data = _tiny_spa()
    held_out = torch.utils.data.Subset(get_dataset("digits-clutter", "test", 32, masks="box"), range(64))
    gates = gates_of(gm)
    assert sorted(gates) == [2, 3] and not any(bool(g.trained) for g in gates.values())
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    before = _held_out_bce(gm, held_out)
    # what the gates kept in every training forward, seen from outside the training code
    seen = {i: [] for i in gates}
    hooks = [g.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out[1].detach().clone()))
             for i, g in gates.items()]
    result = train_gates(gm, model, data, "masks", epochs=3, batch_size=32, lr=1e-2, quiet=True)
    for h in hooks:
        h.remove()
    after = _held_out_bce(gm, held_out)
    assert after < before - 0.05, (before, after)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert all(bool(g.trained) for g in gates.values())
    for k, v in model.state_dict().items():       # gates alone: the backbone is untouched
        assert torch.equal(v, frozen[k]), k
    # the report: per epoch, per layer, the mean over steps of the kept share of patch tokens
    assert len(result.kept) == 3
    assert len(seen[2]) == 9, [k.shape for k in seen[2]]
    steps = len(seen[2]) // 3
    for epoch in range(3):
        for i in gates:
            per_step = [k[:, 1:].sum().item() / (k.shape[0] * 16) for k in seen[i][epoch * steps:(epoch + 1) * steps]]
            assert result.kept[epoch][i] == pytest.approx(sum(per_step) / len(per_step), abs=1e-9)


@pytest.mark.parametrize("share", [True, False])
def test_fine_tuning_changes_the_original_only_when_parameters_are_shared(share):
    """optimize(..., share_parameters=False): the rewritten module owns copies, so fine-tuning it leaves
    the model the user passed bit-identical; the default shares them, and fine-tuning changes it."""
    import tokenopt
    from tokenopt.train.gate import train_gates

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", **TINY_KW).eval()
    data = torch.utils.data.Subset(get_dataset("digits-clutter", "train", 32, masks="box"), range(32))
    example = torch.stack([data[i][0] for i in range(2)])
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    gm = tokenopt.optimize(model, {"version": 1, "rules": [SPA_RULE]}, example, report=False, share_parameters=share)
    train_gates(gm, copy.deepcopy(model), data, "masks", epochs=1, batch_size=16, lr=1e-2, finetune=True, quiet=True)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, frozen[k])]
    if share:
        assert "blocks.0.attn.qkv.weight" in changed and "head.weight" in changed
    else:
        assert changed == []
        assert not torch.equal(gm.get_parameter("head.weight"), frozen["head.weight"])   # the copy did train


def test_the_task_loss_reaches_the_gate_through_the_packed_path():
    import torch.nn.functional as F

    from tokenopt.passes.spa import gates_of

    for mode in ("bypass", "prune"):
        _, gm, data = _tiny_spa(mode)
        x = torch.stack([data[i][0] for i in range(8)])
        y = torch.tensor([data[i][1] for i in range(8)])
        gm.train()
        torch.manual_seed(1)
        F.cross_entropy(gm(x), y).backward()          # the task loss alone: no BCE on the probabilities
        for i, g in gates_of(gm).items():
            grad = g.score.weight.grad
            assert grad is not None and grad.abs().sum() > 0, (mode, i)


def test_the_kept_note_names_every_layer():
    from tokenopt.train.gate import KeptMeter

    meter = KeptMeter([4, 2])
    assert meter.note() == ""
    meter.add({2: 0.5, 4: 0.25})
    meter.add({2: 0.3, 4: 0.125})
    assert meter.note() == "kept L2 30% L4 12%"
    assert meter.epoch_mean("cpu") == {2: pytest.approx(0.4), 4: pytest.approx(0.1875)}


# ------------------------------------------------------------------------------------------------
# the command line

SMALL_KW = dict(img_size=32, patch_size=8, depth=2, num_classes=10, embed_dim=64, num_heads=2)
SMALL = "timm:vit_small_patch16_224?" + "&".join(f"{k}={v}" for k, v in SMALL_KW.items())


def _cli(tmp_path, *args):
    from typer.testing import CliRunner

    from tokenopt.cli import app

    recipe = tmp_path / "spa.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: spa\n    layers: [1]\n")
    out = tmp_path / "out" / "spa.pt"
    out.parent.mkdir(exist_ok=True)
    result = CliRunner().invoke(app, ["train", str(recipe), SMALL, "-o", str(out), "--gate-epochs", "1",
                                      "--eval-images", "0", *map(str, args)])
    return result, out


def _refused(result, out, *fragments):
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert err.count("error:") == 1 and "Traceback" not in err, err
    flat = " ".join(err.split())
    for f in fragments:
        assert f in flat, (f, err)
    assert not any(out.parent.iterdir())    # nothing written: no model, no checkpoint


def test_cli_refuses_mask_labels_on_data_without_masks(tmp_path):
    result, out = _cli(tmp_path, "--data", "digits", "--labels", "masks")
    _refused(result, out, "mask labels need data with object masks, and 'digits' has none", "use labels 'attention'")
    images, _ = _write_folder(tmp_path, [(32, 32), (40, 40)])
    result, out = _cli(tmp_path, "--data", images, "--labels", "masks")
    _refused(result, out, "mask labels need data with object masks", str(images), "--masks DIR")


def test_cli_refuses_a_mask_whose_size_does_not_match_its_image(tmp_path):
    images, masks = _write_folder(tmp_path, [(32, 32), (40, 40)], mask_sizes=[(32, 32), (40, 39)])
    result, out = _cli(tmp_path, "--data", images, "--masks", masks)
    bad = masks / "1" / "im1.png"
    _refused(result, out, f"mask '{bad}' is 40x39 but its image", "is 40x40", "must have its image's size")


@pytest.mark.slow
def test_cli_trains_gates_from_clutter_masks_and_saves_them(tmp_path):
    from tokenopt import artifact

    result, out = _cli(tmp_path, "--data", "digits-clutter", "--labels", "masks", "--limit", "64", "--eval-images", 64,
                       "--finetune-epochs", 1, "--batch-size", 32)
    assert result.exit_code == 0, result.output
    assert "patch tokens kept %" in result.stdout and "gates trained (1 ep, masks labels)" in result.stdout
    assert "1 gates" in result.stdout
    gm = artifact.load(out)
    from tokenopt.passes.spa import gates_of
    assert [bool(g.trained) for g in gates_of(gm).values()] == [True]


@pytest.mark.slow   # two processes on 2 cores
def test_gate_training_runs_under_torchrun_and_rank_0_saves(tmp_path):
    import os
    import subprocess
    import sys

    import tokenopt
    from tokenopt.passes.spa import gates_of

    recipe = tmp_path / "spa.yaml"
    recipe.write_text("version: 1\nrules:\n  - pass: spa\n    layers: [1]\n")
    out = tmp_path / "spa.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tokenopt", "train", str(recipe), SMALL, "--data", "digits-clutter", "-o", str(out),
                           "--labels", "masks", "--limit", "64", "--batch-size", "16", "--gate-epochs", "1",
                           "--eval-images", "32"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1 and "gates trained (1 ep, masks labels)" in proc.stdout
    assert re.search(r"epoch 1/1 .* kept L1 \d+%", proc.stdout)
    gm = tokenopt.load(out)
    assert all(bool(g.trained) for g in gates_of(gm).values())
    ckpt = torch.load(f"{out}.ckpt", weights_only=True)
    assert ckpt["settings"]["world_size"] == 2 and ckpt["step"] == 2
