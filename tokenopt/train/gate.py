"""Training SPA's gates: binary cross-entropy against selection labels, plus the task loss when fine-tuning.

    gm = tokenopt.optimize(model, "recipes/spa.yaml")
    data = get_dataset("digits-clutter", "train", masks=True)          # (image, label, mask) items
    train_gates(gm, model, data, labels="masks", epochs=3)              # the gates alone
    train_gates(gm, model, data, labels="masks", epochs=2, finetune=True, gate_weight=0.5)   # and the backbone

Loss per batch::

    gate_weight * mean over gated layers of BCE(gate probability, label)     # valid patch tokens only
    + cross_entropy(logits, labels)                                         # only with finetune=True

The BCE of a layer averages over the patch tokens present at that layer (in prune mode a token an
earlier gate dropped has no gate output to supervise); prefix tokens are always kept and never
supervised. Labels come from masks or from the original model's attention
(tokenopt.train.gate_labels). In training mode the pass selects tokens with a straight-through
Gumbel sample, so the task loss reaches the gates through the packed path as well.

Without ``finetune`` only the gates train. With it the whole model trains (the gates too, by both
losses); the model shares its parameters with ``original``, so attention labels then come from a
frozen copy taken before the first step. The fraction of patch tokens each gated layer keeps is
shown as training goes (progress bar, epoch log lines) and returned per epoch in the result.

A recipe with ``target_keep`` (a mean share of patch tokens per layer) has its thresholds set after
each call by :func:`calibrate_gates`: on the first ``calibration_images`` training images, layer by
layer in order (a layer's inputs depend on the thresholds before it), each gate's threshold
becomes the one at which it keeps that share on average. The threshold is a buffer of the gate,
so the saved model carries it; :func:`budget_report` gives target against achieved.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tokenopt import distributed as D
from tokenopt.errors import TokenoptError
from tokenopt.model_outputs import class_logits
from tokenopt.ops.gates import TokenGate, capture_outputs, threshold_for_share
import tokenopt.passes  # noqa: F401  (registers the passes, and so the kinds of learned part)
from tokenopt.rewrite.learned import parts_of_type
from tokenopt.train.trainers import Trainer, register_trainer
from tokenopt.train.gate_labels import DEFAULT_COVER, DEFAULT_MASS, attention_labels, check_source, mask_labels
from tokenopt.train.loop import TrainResult, train
from tokenopt.train.selector import _keep_requires_grad, _teacher_for
from tokenopt.record import record_of


@dataclass
class GateTrainResult(TrainResult):
    # per epoch of this call: {layer: mean fraction of patch tokens the gate kept}, over all processes
    kept: list[dict[int, float]] = field(default_factory=list)
    # target_keep: {layer: (threshold, share kept on the calibration images)}; empty without a target
    calibrated: dict[int, tuple[float, float]] = field(default_factory=dict)


def gate_bce(prob: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor, prefix: int) -> torch.Tensor:
    """Mean binary cross-entropy of a gate over the patch tokens present at its layer.

    prob, valid: (B, N) on the original token positions (``prefix`` prefix tokens first);
    labels: (B, N - prefix) bool → a scalar (0 when no patch token is present).
    """
    p = prob[:, prefix:].to(torch.float32)
    present = valid[:, prefix:]
    per_token = F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), labels.to(p.dtype), reduction="none")
    return (per_token * present).sum() / present.sum().clamp_min(1)


def kept_fraction(keep: torch.Tensor, prefix: int) -> float:
    """Fraction of all patch tokens of the batch that a gate kept: keep (B, N) bool."""
    return keep[:, prefix:].float().mean().item()


class KeptMeter:
    """Running per-layer kept fractions: the last step's (for the bar) and the epoch's mean."""

    def __init__(self, layers):
        self.layers = sorted(layers)
        self.last: dict[int, float] = {}
        self._sum = dict.fromkeys(self.layers, 0.0)
        self._steps = 0

    def add(self, fractions: dict[int, float]) -> None:
        self.last = fractions
        for i, f in fractions.items():
            self._sum[i] += f
        self._steps += 1

    def note(self) -> str:
        if not self.last:
            return ""
        return "kept " + " ".join(f"L{i} {100 * self.last[i]:.0f}%" for i in self.layers if i in self.last)

    def epoch_mean(self, device) -> dict[int, float]:
        """The epoch's mean per layer over every process (collective under torchrun); resets the sums."""
        sums = D.sum_across_ranks([self._sum[i] for i in self.layers] + [self._steps], device)
        steps = max(sums[-1], 1)
        self._sum, self._steps = dict.fromkeys(self.layers, 0.0), 0
        return {i: s / steps for i, s in zip(self.layers, sums)}


@contextlib.contextmanager
def _training(model: nn.Module):
    """No untrained-gate warning while the gates train."""
    was = getattr(model, "tokenopt_training", False)
    model.tokenopt_training = True
    try:
        yield
    finally:
        model.tokenopt_training = was


def gates_of(model: nn.Module) -> dict[int, TokenGate]:
    """The token gates of a rewritten model, by the index of their layer."""
    return parts_of_type(model, TokenGate)


def capture_gate_outputs(model: nn.Module):
    """Every forward pass inside the block fills the dict it gives: layer -> GateOutput."""
    return capture_outputs(gates_of(model).values())


def _prefix_of(model: nn.Module) -> int:
    analysis = getattr(record_of(model), "analysis", None)
    if analysis is None:
        raise TokenoptError("the model does not record its analysis: pass what tokenopt.optimize returned")
    return analysis.prefix_tokens


def train_gates(model: nn.Module, original: nn.Module, data, labels: str = "masks", *, epochs: int,
                finetune: bool = False, gate_weight: float = 1.0, cover: float = DEFAULT_COVER,
                mass: float = DEFAULT_MASS, batch_size: int = 64, lr: float | None = None,
                weight_decay: float = 0.01, warmup_epochs: float = 0.5, checkpoint=None, resume=None,
                fingerprint: str = "", seed: int = 0, quiet: bool = False, calibration_images: int = 1024,
                **train_kwargs) -> GateTrainResult:
    """Train the SPA gates of ``model`` (from [`tokenopt.optimize`][tokenopt.optimize]) on ``data``.

    Each gate learns by binary cross-entropy which tokens to keep, against labels from object masks
    or from the original model's attention. Afterwards every gate's ``trained`` flag is set, and
    gates with a ``target_keep`` are calibrated on the first ``calibration_images`` of ``data``.

    Args:
        model: what [`tokenopt.optimize`][tokenopt.optimize] returned for a recipe with a ``pass: spa`` rule.
        original: the model it was optimized from.
        data (Dataset | DataLoader): the images; with ``labels="masks"`` it yields ``(image, label, mask)``.
        labels: ``"masks"`` (a token is positive where the object covers ``cover`` of its patch) or
            ``"attention"`` (``original``'s attention; the positive tokens hold ``mass`` of it).
        epochs: passes over ``data``.
        finetune: the backbone trains too, and the task loss (cross-entropy on the labels) joins
            ``gate_weight`` × BCE.
        gate_weight: the weight of the gates' BCE in the loss.
        cover: see ``labels``.
        mass: see ``labels``.
        lr: peak learning rate; default 1e-3 for the gates alone, 1e-4 when fine-tuning.
        batch_size: images per step.
        weight_decay: AdamW's weight decay.
        warmup_epochs: length of the warm-up, in epochs.
        checkpoint (str | os.PathLike | None): a file written after every epoch (resumable).
        resume (str | os.PathLike | bool | None): a checkpoint to continue from (True: ``checkpoint``, if it exists).
        fingerprint: a text identifying the run; resuming a checkpoint of another run is refused.
        seed: the seed of the data order and sampling.
        quiet: no progress bars.
        calibration_images: how many images of ``data`` calibrate the thresholds of gates with a
            ``target_keep``.
        **train_kwargs (Any): passed on to the training loop (``tokenopt.train.loop.train``).

    Returns:
        The loss per epoch and the fraction of tokens each gate kept (``GateTrainResult``).
    """
    gates = gates_of(model)
    if not gates:
        raise TokenoptError("the model has no SPA gates to train: optimize it with a recipe that has a `pass: spa` rule")
    check_source(labels, data)
    if gate_weight < 0:
        raise TokenoptError(f"gate_weight must be >= 0, got {gate_weight}")
    layers = sorted(gates)
    prefix = _prefix_of(model)
    teacher = None
    if labels == "attention":
        source = original
        if finetune:   # the backbone moves; labels must come from the model as it was
            source = copy.deepcopy(original).eval()
            for p in source.parameters():
                p.requires_grad_(False)
        teacher = _teacher_for(model, source)
    meter = KeptMeter(layers)
    kept: list[dict[int, float]] = []

    with capture_gate_outputs(model) as outputs, _keep_requires_grad(model, original), _training(model):
        def loss(out, batch):
            if teacher is not None:
                with torch.no_grad():
                    _, att = teacher(batch[0], layers)
                target = {i: attention_labels(att[i], prefix, mass) for i in layers}
            else:   # rasterised at each layer's own grid (a Swin stage's grid halves at each merging)
                grids = {i: outputs[i].prob.shape[1] - prefix for i in layers}
                rasters = {n: mask_labels(batch[2], n, cover) for n in set(grids.values())}
                target = {i: rasters[grids[i]] for i in layers}
            bce = torch.stack([gate_bce(outputs[i].prob, outputs[i].valid, target[i], prefix) for i in layers]).mean()
            meter.add({i: kept_fraction(outputs[i].keep, prefix) for i in layers})
            value = gate_weight * bce
            if finetune:
                value = value + F.cross_entropy(class_logits(out), batch[1])
            return value

        def epoch_end(epoch, m):
            kept.append(meter.epoch_mean(next(m.parameters()).device))
            if user_end is not None:
                user_end(epoch, m)

        user_end = train_kwargs.pop("on_epoch_end", None)
        params = None if finetune else [p for g in gates.values() for p in g.parameters()]
        result = train(model, data, epochs=epochs, batch_size=batch_size,
                       lr=lr if lr is not None else (1e-4 if finetune else 1e-3), weight_decay=weight_decay,
                       warmup_epochs=warmup_epochs, params=params, train_all=finetune, loss=loss,
                       checkpoint=checkpoint, resume=resume, fingerprint=fingerprint, seed=seed, quiet=quiet,
                       on_epoch_end=epoch_end, note=meter.note, **train_kwargs)
    for g in gates.values():
        trained = getattr(g, "trained", None)
        if isinstance(trained, torch.Tensor):
            trained.fill_(True)
    calibrated = {}
    if any(g.target_keep is not None for g in gates.values()):
        calibrated = calibrate_gates(model, first_images(data, calibration_images))
    return GateTrainResult(**vars(result), kept=kept, calibrated=calibrated)


def first_images(data, n: int) -> torch.Tensor:
    """The first ``n`` images of a Dataset (items (image, ...) or images) or a DataLoader, stacked."""
    if isinstance(data, torch.utils.data.DataLoader):
        out, seen = [], 0
        for batch in data:
            x = batch if isinstance(batch, torch.Tensor) else batch[0]
            out.append(x[:n - seen])
            seen += len(out[-1])
            if seen >= n:
                break
        return torch.cat(out)
    first = lambda item: item if isinstance(item, torch.Tensor) else item[0]  # noqa: E731
    return torch.stack([first(data[i]) for i in range(min(n, len(data)))])


@torch.no_grad()
def calibrate_gates(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> dict[int, tuple[float, float]]:
    """Set the threshold of every gate that has a ``target_keep`` so that, in eval mode on ``images``,
    it keeps that mean share of the patch tokens (of the original grid). Layer by layer in order,
    each measured with the thresholds before it already set. Returns {layer: (threshold, share)}."""
    prefix = _prefix_of(model)
    gates = gates_of(model)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    found = {}
    try:
        with capture_gate_outputs(model) as outputs, _training(model):   # no untrained warning midway
            for i in sorted(gates):
                gate = gates[i]
                if gate.target_keep is None:
                    continue
                probs, valids = [], []
                for start in range(0, len(images), batch_size):
                    model(images[start:start + batch_size].to(device))
                    probs.append(outputs[i].prob[:, prefix:].float().cpu())
                    valids.append(outputs[i].valid[:, prefix:].cpu())
                t, share = threshold_for_share(torch.cat(probs), torch.cat(valids), gate.lo, gate.hi,
                                               gate.target_keep)
                gate.threshold.fill_(t)
                found[i] = (t, share)
    finally:
        model.train(was)
    return found


def budget_report(model: nn.Module, splits: dict[str, torch.Tensor | None]) -> list[str]:
    """Lines giving, for the gates with a ``target_keep``, the target against the mean share of patch
    tokens kept on each set of images in ``splits`` ({"train": images, "test": images}); [] when no
    gate has a target."""
    gates = {i: g for i, g in gates_of(model).items() if g.target_keep is not None}
    if not gates:
        return []
    kept = {name: measure_kept(model, x) for name, x in splits.items() if x is not None and len(x)}
    lines = []
    for i, g in sorted(gates.items()):
        got = ", ".join(f"{name} {k[i]:.3f}" for name, k in kept.items())
        lines.append(f"L{i}: target_keep {g.target_keep:.3f}, kept {got} (threshold {float(g.threshold):.4f})")
    mean = ", ".join(f"{name} {sum(k[i] for i in gates) / len(gates):.3f}" for name, k in kept.items())
    target = sum(g.target_keep for g in gates.values()) / len(gates)
    lines.append(f"mean: target_keep {target:.3f}, kept {mean}")
    return lines


@torch.no_grad()
def measure_kept(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict[int, float]:
    """Fraction of patch tokens each gate keeps on ``images`` in eval mode (the deterministic selection)."""
    prefix = _prefix_of(model)
    layers = sorted(gates_of(model))
    sums, n = dict.fromkeys(layers, 0.0), 0
    was = model.training
    model.eval()
    try:
        with capture_gate_outputs(model) as outputs:
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size]
                model(x)
                for i in layers:
                    sums[i] += kept_fraction(outputs[i].keep, prefix) * len(x)
                n += len(x)
    finally:
        model.train(was)
    return {i: s / max(n, 1) for i, s in sums.items()}


def _fit(model, original, data, *, labels="masks", **loop) -> GateTrainResult:
    return train_gates(model, original, data, labels, **loop)


def _finetune(model, original, data, *, labels="masks", distill=False, selector_weight=0.0, **options):
    return train_gates(model, original, data, labels, finetune=True, **options)


def _kept_percent(model, original, images) -> float:
    kept = measure_kept(model, images)
    return 100 * sum(kept.values()) / len(kept)


GATE_TRAINER = register_trainer(TokenGate)(Trainer(
    noun="gates", fit=_fit, finetune=_finetune, measure=_kept_percent, column="patch tokens kept %",
    number_format=".1f", uses_labels=True, weight_option="--gate-weight", epochs_option="--gate-epochs",
    distill="fine-tuning uses the labels and the gates' BCE", budget=budget_report))
