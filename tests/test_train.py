"""The shared training loop: learning, exact resume, atomic checkpoints, torchrun, evaluation."""
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from tokenopt.data import get_dataset, get_loader
from tokenopt.errors import TokenoptError
from tokenopt.train import ResumeError, evaluate, train
from tokenopt.train import checkpoint as ckpt_module
from tokenopt.train.schedule import WarmupCosine

HALF = (0.5, 0.5, 0.5)


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **{**args, **kw})


def digits(n=256, split="train"):
    return Subset(get_dataset("digits", split, 16, HALF, HALF), range(n))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_few_steps_on_digits_make_the_loss_fall():
    # 8 px patches (4 tokens, each a quarter of the digit) learn within a few dozen steps;
    # 1-pixel tokens need a few hundred before the loss leaves ln(10)
    model = tiny_vit(patch_size=8)
    data = digits(512)
    before = evaluate(model, get_loader(data, 256, train=False))
    result = train(model, data, epochs=3, batch_size=32, lr=3e-3, warmup_epochs=0.2, quiet=True)
    after = evaluate(model, get_loader(data, 256, train=False))
    assert result.steps == 3 * 16 and result.epochs == 3
    assert result.epoch_losses[-1] < 0.8 * result.epoch_losses[0]
    assert after["top1"] > before["top1"] + 0.2


def test_a_hugging_face_vit_loaded_through_hf_trains_on_its_logits(tmp_path):
    """hf: models return an ImageClassifierOutput; the default loss reads its logits."""
    transformers = pytest.importorskip("transformers")
    from tokenopt.sources import load_model

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=10)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    model, _ = load_model(f"hf:{tmp_path / 'vit'}")
    data = digits(512)
    result = train(model, data, epochs=3, batch_size=32, lr=3e-3, warmup_epochs=0.2, quiet=True)
    assert result.steps == 3 * 16
    assert result.epoch_losses[-1] < 0.8 * result.epoch_losses[0]


def test_only_the_marked_parameters_change():
    model = tiny_vit()
    head_before = model.head.weight.detach().clone()
    block_before = model.blocks[0].mlp.fc1.weight.detach().clone()
    train(model, digits(64), epochs=1, batch_size=32, params=[model.head.weight, "head.bias"], quiet=True)
    assert not torch.equal(model.head.weight, head_before)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, block_before)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    # default: whatever requires grad (here still just the head); train_all unfreezes everything
    train(model, digits(32), epochs=1, batch_size=32, quiet=True)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, block_before)
    train(model, digits(32), epochs=1, batch_size=32, train_all=True, quiet=True)
    assert not torch.equal(model.blocks[0].mlp.fc1.weight, block_before)
    model.requires_grad_(False)
    with pytest.raises(TokenoptError, match="nothing to train"):
        train(model, digits(32), epochs=1, quiet=True)


def test_custom_loss_gets_the_output_and_the_batch():
    model = tiny_vit()
    teacher = tiny_vit(seed=1).eval()
    seen = []

    def kl_to_teacher(out, batch):
        seen.append(len(batch))
        with torch.no_grad():
            target = teacher(batch[0]).log_softmax(-1)
        return nn.functional.kl_div(out.log_softmax(-1), target, log_target=True, reduction="batchmean")

    result = train(model, digits(64), epochs=2, batch_size=32, lr=3e-3, loss=kl_to_teacher, quiet=True)
    assert seen == [2] * 4
    assert result.epoch_losses[1] < result.epoch_losses[0]


def test_images_without_labels_train_with_a_custom_loss():
    images = torch.stack([digits(64)[i][0] for i in range(64)])
    model = tiny_vit()
    teacher = tiny_vit(seed=1).eval()

    def match_teacher(out, batch):
        assert len(batch) == 1 and batch[0].shape == (32, 3, 16, 16)
        with torch.no_grad():
            target = teacher(batch[0])
        return nn.functional.mse_loss(out, target)

    result = train(model, images, epochs=2, batch_size=32, lr=3e-3, loss=match_teacher, quiet=True)
    assert result.steps == 4 and result.epoch_losses[1] < result.epoch_losses[0]


class Interrupt(Exception):
    pass


def crash_at(step):
    calls = [0]

    def loss(out, batch):
        calls[0] += 1
        if calls[0] == step:
            raise Interrupt
        return nn.functional.cross_entropy(out, batch[1])

    return loss


@pytest.mark.slow   # > 10 s on 2 cores: CI runs it with -m slow
def test_interrupted_and_resumed_run_ends_with_bit_identical_weights(tmp_path):
    # dropout makes the RNG state part of what must be restored
    kw = dict(drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1)
    data = digits(192)
    opts = dict(epochs=2, batch_size=32, lr=2e-3, warmup_epochs=0.5, quiet=True, fingerprint="recipe-abc")

    straight = tiny_vit(**kw)
    full = train(straight, data, checkpoint=tmp_path / "straight.ckpt", **opts)

    interrupted = tiny_vit(**kw)
    with pytest.raises(Interrupt):  # dies in the middle of epoch 2 (6 steps per epoch)
        train(interrupted, data, checkpoint=tmp_path / "run.ckpt", loss=crash_at(9), **opts)
    assert torch.load(tmp_path / "run.ckpt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt", "straight.ckpt"]  # no temp files

    resumed = tiny_vit(seed=99, **kw)  # other initial weights: all must come from the checkpoint
    torch.manual_seed(12345)  # and another global RNG state: it must be restored too
    result = train(resumed, data, checkpoint=tmp_path / "run.ckpt", resume=True, **opts)
    assert result.resumed_from == 1 and result.steps == full.steps == 12
    assert result.epoch_losses == full.epoch_losses
    assert same_weights(resumed, straight)


def test_resume_refuses_another_fingerprint_or_other_settings(tmp_path):
    path = tmp_path / "run.ckpt"
    train(tiny_vit(), digits(64), epochs=1, batch_size=32, checkpoint=path, fingerprint="tome-r8", quiet=True)
    with pytest.raises(ResumeError, match="fingerprint 'tome-r8'.*'tome-r16'"):
        train(tiny_vit(), digits(64), epochs=2, batch_size=32, resume=path, fingerprint="tome-r16", quiet=True)
    with pytest.raises(ResumeError, match="epochs=1 there, 2 now"):
        train(tiny_vit(), digits(64), epochs=2, batch_size=32, resume=path, fingerprint="tome-r8", quiet=True)
    with pytest.raises(ResumeError, match="no checkpoint at"):
        train(tiny_vit(), digits(64), epochs=1, resume=tmp_path / "missing.ckpt", quiet=True)
    (tmp_path / "junk.ckpt").write_bytes(b"garbage")
    with pytest.raises(ResumeError, match="not a readable checkpoint"):
        train(tiny_vit(), digits(64), epochs=1, resume=tmp_path / "junk.ckpt", quiet=True)
    # resume=True with no checkpoint yet simply starts fresh
    result = train(tiny_vit(), digits(64), epochs=1, batch_size=32, checkpoint=tmp_path / "new.ckpt",
                   resume=True, quiet=True)
    assert result.resumed_from is None and (tmp_path / "new.ckpt").is_file()


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    ckpt_module.save_atomic({"epoch": 1}, path)
    good = path.read_bytes()

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_module.save_atomic({"epoch": 2}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]


def test_schedule_warms_up_then_decays_to_the_floor():
    f = WarmupCosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    ramp = [f(s) for s in range(11)]
    assert ramp == sorted(ramp) and 0 < ramp[0] < 0.2 and ramp[10] == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)


def test_evaluate_counts_top1_and_top5():
    logits = torch.eye(10)[torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])] * 5 + torch.arange(10) * 0.1
    labels = torch.tensor([0, 1, 2, 3, 9, 8, 0, 0])  # 4 right; 9 and 8 are in every top-5 here
    loader = get_loader(TensorDataset(logits, labels), 3, train=False)
    out = evaluate(nn.Identity(), loader, device="cpu")
    assert out == {"top1": 0.5, "top5": 0.75, "n": 8}
    few = get_loader(TensorDataset(logits[:, :4], labels.clamp(max=3)), 4, train=False)
    assert "top5" not in evaluate(nn.Identity(), few, device="cpu")


DDP_SCRIPT = textwrap.dedent("""
    import hashlib, os, sys
    import timm, torch
    from torch.utils.data import Subset
    from tokenopt.data import get_dataset, get_loader
    from tokenopt.train import evaluate, train

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.manual_seed(rank)  # different initial weights per rank: DDP must start all from rank 0's
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=16, patch_size=4,
                              embed_dim=32, depth=2, num_heads=2, num_classes=10, drop_rate=0.1)
    half = (0.5, 0.5, 0.5)
    data = Subset(get_dataset("digits", "train", 16, half, half), range(192))
    result = train(model, data, epochs=2, batch_size=16, quiet=True, checkpoint=os.path.join(out, "run.ckpt"))
    test = evaluate(model, get_loader(get_dataset("digits", "test", 16, half, half), 64, train=False))
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(f"{digest.hexdigest()} {result.steps} {test['n']}")
""")


@pytest.mark.slow   # > 10 s on 2 cores: CI runs it with -m slow
def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0][0] == ranks[1][0]  # same weights on both ranks
    assert ranks[0][1] == "12"  # 192 images / 2 ranks / 16 per batch = 6 steps per epoch, 2 epochs
    assert ranks[0][2] == "360"  # evaluation shards add up to the whole test split, once
    saved = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert saved["settings"]["world_size"] == 2 and len(saved["rng"]) == 2
    digest = hashlib.sha256()
    for name, value in sorted(saved["model"].items()):
        digest.update(name.encode())
        digest.update(value.contiguous().numpy().tobytes())
    assert digest.hexdigest() == ranks[0][0]  # rank 0 saved the final weights
