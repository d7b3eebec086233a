"""The training loop every tokenopt pass shares (selectors, gates, fine-tuning).

    result = train(model, get_dataset("digits", "train", 32), epochs=10,
                   checkpoint="run.ckpt", resume=True, fingerprint=recipe_hash)

* Trains only the parameters that require grad (or ``params=`` / ``train_all=True``).
* AdamW (no decay on biases, norms, embeddings) with linear warmup and a cosine decay per step.
* Checkpoints after every epoch, atomically; ``resume`` continues bit-identically: the model,
  optimizer, scheduler, step counters and every RNG are restored, and the sampler's shuffle
  depends only on (seed, epoch).
* Under ``torchrun`` it joins the process group, wraps the model in DistributedDataParallel and
  shards the data; rank 0 writes the checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tokenopt import distributed as D
from tokenopt.data.loader import get_loader
from tokenopt.errors import TokenoptError
from tokenopt.model_outputs import class_logits
from tokenopt.train.checkpoint import FORMAT, VERSION, ResumeError, capture_rng, load_checkpoint, restore_rng, save_atomic
from tokenopt.train.params import select_trainable, weight_decay_groups
from tokenopt.train.progress import Progress
from tokenopt.train.schedule import warmup_cosine

LossFn = Callable[[Any, tuple], torch.Tensor]


@dataclass
class TrainResult:
    epochs: int                      # epochs completed, counting those before a resume
    steps: int                       # optimizer steps completed, likewise
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss of every epoch
    seconds: float = 0.0             # wall time of this call
    images_per_second: float = 0.0   # over all processes, this call only
    resumed_from: int | None = None  # the epoch the checkpoint had reached, if resumed


def cross_entropy(out, batch) -> torch.Tensor:
    """Cross-entropy of the class scores (a tensor, a tuple's first, a Hugging Face output's ``logits``)."""
    return F.cross_entropy(class_logits(out), batch[1])


def train(model: nn.Module, data: Dataset | DataLoader, *, epochs: int, batch_size: int = 64,
          lr: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: float = 1.0, min_lr_ratio: float = 0.01,
          params: Iterable[nn.Parameter | str] | None = None, train_all: bool = False,
          loss: LossFn | None = None, grad_clip: float | None = 1.0,
          checkpoint: str | os.PathLike | None = None, resume: str | os.PathLike | bool | None = None,
          fingerprint: str = "", seed: int = 0, device: str | torch.device | None = None,
          num_workers: int = 0, quiet: bool = False, find_unused_parameters: bool = False,
          on_epoch_end: Callable[[int, nn.Module], None] | None = None,
          note: Callable[[], str] | None = None) -> TrainResult:
    """Train ``model`` in place on ``data`` (a Dataset, or a DataLoader yielding (images, labels, ...)
    or images alone; the model gets ``batch[0]``).

    ``loss(model_out, batch)`` replaces cross-entropy (e.g. KL to a teacher). ``checkpoint`` is
    written after every epoch; ``resume`` is a checkpoint path, or True for "``checkpoint`` if it
    exists". A checkpoint from a run with another ``fingerprint`` or other settings is refused.
    A fresh run seeds torch/numpy/random with ``seed``; a resumed one restores their states.
    ``on_epoch_end(epochs_done, model)`` runs on every rank after each epoch's checkpoint (e.g. to
    evaluate); it must not draw random numbers if the run is to stay resumable bit for bit.
    """
    t0 = time.perf_counter()
    D.init_if_launched()
    rank, world = D.rank_and_world()
    device = torch.device(device) if device is not None else D.default_device()
    model.to(device)
    loss_fn = loss or cross_entropy

    trainable = select_trainable(model, params, train_all)
    optimizer = torch.optim.AdamW(weight_decay_groups(model, trainable, weight_decay), lr=lr)
    loader = data if isinstance(data, DataLoader) else _loader(data, batch_size, seed, num_workers)
    if world > 1 and not hasattr(loader.sampler, "set_epoch"):
        warnings.warn("running under torchrun with a DataLoader that does not shard: every process "
                      "trains on all the data; build it with tokenopt.data.get_loader")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise TokenoptError("nothing to train on: the data set is empty (or smaller than one batch with drop_last)")
    scheduler = warmup_cosine(optimizer, epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch), min_lr_ratio)
    settings = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs,
                "min_lr_ratio": min_lr_ratio, "steps_per_epoch": steps_per_epoch, "world_size": world,
                "grad_clip": grad_clip, "seed": seed, "trainable": _names_digest(trainable)}

    start_epoch, step, history, resumed_from = 0, 0, [], None
    resume_path = _resume_path(resume, checkpoint)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        _check_resumable(ckpt, resume_path, fingerprint, settings)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = resumed_from = ckpt["epoch"]
        step, history = ckpt["step"], list(ckpt["history"])
        rngs = ckpt["rng"]
        restore_rng(rngs[rank % len(rngs)])  # same world size (checked), so each rank gets its own
    else:
        _seed_everything(seed)

    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)

    was_training = model.training
    total_steps = epochs * steps_per_epoch
    with Progress(total_steps, step, enabled=not quiet and rank == 0) as bar:
        for epoch in range(start_epoch, epochs):
            bar.set_description(f"epoch {epoch + 1}/{epochs}")
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            net.train()
            loss_sum, seen = 0.0, 0
            for batch in loader:
                batch = _to_device(batch, device)
                if isinstance(batch, torch.Tensor):  # images without labels (distillation data)
                    batch = (batch,)
                value = loss_fn(net(batch[0]), batch)
                if not torch.isfinite(value):
                    raise TokenoptError(f"training diverged: loss is {value.item()} at epoch {epoch + 1}, "
                                        f"step {step + 1}; lower lr (now {lr:g}) or set grad_clip")
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                if grad_clip:
                    nn.utils.clip_grad_norm_([p for _, p in trainable], grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                n = len(batch[0])
                loss_sum, seen = loss_sum + value.item() * n, seen + n
                bar.step(value.item(), n * world, note() if note is not None else "")
            loss_sum, seen = D.sum_across_ranks([loss_sum, seen], device)
            history.append(loss_sum / max(1.0, seen))
            bar.log(f"epoch {epoch + 1}/{epochs}  loss {history[-1]:.4f}  {bar.images_per_second:.0f} img/s"
                    + (f"  {note()}" if note is not None else ""))
            if checkpoint is not None:
                _save(checkpoint, model, optimizer, scheduler, epoch + 1, step, history, fingerprint, settings)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, model)
        speed = bar.images_per_second
    model.train(was_training)
    return TrainResult(epochs=len(history), steps=step, epoch_losses=history,
                       seconds=time.perf_counter() - t0, images_per_second=speed, resumed_from=resumed_from)


def _loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int) -> DataLoader:
    return get_loader(dataset, batch_size, train=True, seed=seed, num_workers=num_workers)


def _resume_path(resume, checkpoint) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True:
        if checkpoint is None:
            raise TokenoptError("resume=True needs checkpoint= (the file to resume from and keep writing)")
        return Path(checkpoint) if Path(checkpoint).is_file() else None
    return Path(resume)


def _check_resumable(ckpt: dict, path: Path, fingerprint: str, settings: dict) -> None:
    if ckpt["fingerprint"] != fingerprint:
        raise ResumeError(f"cannot resume from '{path}': it was written for fingerprint '{ckpt['fingerprint']}' "
                          f"(another recipe or model), this run is '{fingerprint}'. "
                          f"Start fresh (no resume) or point resume at the matching checkpoint.")
    changed = [f"{k}={ckpt['settings'].get(k)!r} there, {v!r} now" for k, v in settings.items()
               if ckpt["settings"].get(k) != v]
    if changed:
        raise ResumeError(f"cannot resume from '{path}' with different settings ({'; '.join(changed)}): "
                          f"an exact continuation needs the same ones. Use them, or start fresh.")


def _save(path, model, optimizer, scheduler, epoch, step, history, fingerprint, settings) -> None:
    rngs = D.all_gather_objects(capture_rng())  # collective: every rank must call it
    if D.is_main():
        save_atomic({"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "epoch": epoch,
                     "step": step, "history": history, "settings": settings, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs}, path)
    D.barrier()  # no rank races into the next epoch (or exits) before the checkpoint exists


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _names_digest(trainable: list[tuple[str, nn.Parameter]]) -> str:
    names = "\n".join(name for name, _ in trainable)
    return f"{len(trainable)} tensors, sha1 {hashlib.sha1(names.encode()).hexdigest()[:12]}"
