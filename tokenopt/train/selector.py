"""Training ToSA: selectors by KL to the original model's attention, then the backbone with ToSA in the loop.

    gm = tokenopt.optimize(model, "recipes/tosa-keep50.yaml")
    train_selectors(gm, model, get_dataset("digits-clutter", "train"), epochs=3)   # no labels used
    finetune(gm, model, get_dataset("digits-clutter", "train"), epochs=2)          # labels, or distill=True

Selectors learn what layer i of the *original* model attends to, from what layer i-1 of the
rewritten model shows them (the selections before them are in the loop, as at inference). The
target comes from running the original's traced graph with an fx Interpreter that keeps every
block's q and k (or its softmax, or its MultiheadAttention input), so any image will do.

Fine-tuning then trains the backbone, selectors frozen: tokens that skip blocks change what later
layers see. The rewritten model shares its parameters with the model it came from, so the teacher
is a deep copy taken before the first step.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from tokenopt.analysis import ModelAnalysis, analyse
from tokenopt.errors import TokenoptError
from tokenopt.model_outputs import class_logits
from tokenopt.ops import selection as ops
import tokenopt.passes  # noqa: F401  (registers the passes, and so the kinds of learned part)
from tokenopt.rewrite.learned import parts_of_type
from tokenopt.train.trainers import Trainer, register_trainer
from tokenopt.trace import values_at
from tokenopt.train.loop import TrainResult, train
from tokenopt.record import record_of


class AttentionTeacher:
    """The original model's attention probabilities of chosen blocks, (B, H, N, N) each."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, leaf_modules=(), prefix_tokens=None,
                 capture: str = "auto"):
        self.analysis: ModelAnalysis = analyse(model, example_input, leaf_modules, prefix_tokens=prefix_tokens,
                                               capture=capture)
        self.gm = self.analysis.graph

    def __call__(self, x: torch.Tensor, layers) -> tuple[object, dict[int, torch.Tensor]]:
        """(the model's output, {layer: attention probabilities})."""
        blocks = [self.analysis.blocks[i] for i in layers]
        wanted = set()
        for b in blocks:
            core = b.attention
            if core.kind == "sdpa":
                wanted |= {core.q, core.k}
            elif core.kind == "softmax":
                wanted.add(core.node)
            else:
                wanted.add(self._mha_input(b).name)
        output = next(n.name for n in reversed(self.gm.graph.nodes) if n.op == "output")
        v = values_at(self.gm, wanted | {output}, x)
        out = v.pop(output)
        att = {}
        for b in blocks:
            core = b.attention
            if core.kind == "sdpa":
                sdpa = next(n for n in self.gm.graph.nodes if n.name == core.node)
                scale = sdpa.kwargs.get("scale", sdpa.args[6] if len(sdpa.args) > 6 else None)
                att[b.index] = ops.attention_logits(v[core.q], v[core.k], scale, x).softmax(-1)
            elif core.kind == "softmax":
                att[b.index] = ops.heads_first(v[core.node], x)
            else:
                mod = self.gm.get_submodule(core.module)
                logits = ops.mha_attention_logits(v[self._mha_input(b).name], mod.in_proj_weight,
                                                  mod.in_proj_bias, mod.num_heads)
                att[b.index] = logits.softmax(-1)
        return out, att

    def _mha_input(self, block) -> fx.Node:
        return next(n for n in self.gm.graph.nodes if n.name == block.attention.node).args[0]


def selector_kl(prediction: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """KL(real || predicted) per attention row, averaged over images, heads and rows.

    A map selector predicts every row (B, H, N, N); a pooled one the mean row (B, H, N), which is
    compared with the real attention averaged over queries.
    """
    target = attention if prediction.dim() == 4 else attention.mean(-2)
    return F.kl_div(prediction, target.to(prediction.dtype), reduction="sum") / prediction[..., 0].numel()


def _teacher_for(model: nn.Module, original: nn.Module) -> AttentionTeacher:
    shape = getattr(getattr(record_of(model), "analysis", None), "input_shape", None)
    if not shape:
        raise TokenoptError("the model does not record its input shape: pass what tokenopt.optimize returned")
    p = next(original.parameters())
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    recipe = getattr(record_of(model), "recipe", None)
    return AttentionTeacher(original, example, getattr(record_of(model), "leaf_modules", ()) or (),
                            recipe.prefix_tokens if recipe is not None else None,
                            capture=getattr(record_of(model), "capture", "auto"))


def selectors(model: nn.Module) -> dict[int, ops.TokenSelector]:
    """The token selectors of a rewritten model, by the index of the layer they select for."""
    return parts_of_type(model, ops.TokenSelector)


def _selectors_of(model: nn.Module) -> dict[int, ops.TokenSelector]:
    sel = selectors(model)
    if not sel:
        raise TokenoptError("the model has no ToSA selectors to train: optimize it with a recipe that has a "
                            "`pass: tosa` rule")
    return sel


@contextlib.contextmanager
def _capturing(model: nn.Module):
    """Keep every selector's prediction of the current forward pass; no untrained-selector warning."""
    predictions: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: predictions.__setitem__(i, out))
             for i, m in selectors(model).items()]
    was = getattr(model, "tokenopt_training", False)
    model.tokenopt_training = True
    try:
        yield predictions
    finally:
        model.tokenopt_training = was
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _keep_requires_grad(*models: nn.Module):
    """The shared loop freezes what it does not train; the model this one came from is the user's."""
    flags = [(p, p.requires_grad) for m in models for p in m.parameters()]
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def train_selectors(model: nn.Module, original: nn.Module, data, *, epochs: int, batch_size: int = 64,
                    lr: float = 1e-3, weight_decay: float = 0.01, warmup_epochs: float = 0.5,
                    checkpoint=None, resume=None, fingerprint: str = "", seed: int = 0, quiet: bool = False,
                    **train_kwargs) -> TrainResult:
    """Fit the ToSA selectors of ``model`` (from [`tokenopt.optimize`][tokenopt.optimize]) to ``original``'s attention.

    Only the selectors train, by KL divergence between each one's predicted attention and the
    original's real attention at its layer; ``data`` labels are not used. Afterwards every
    selector's ``trained`` flag is set (it is saved with the weights).

    Args:
        model: what [`tokenopt.optimize`][tokenopt.optimize] returned for a recipe with a ``pass: tosa`` rule.
        original: the model it was optimized from (the teacher whose attention the selectors learn).
        data (Dataset | DataLoader): a data set of images (labels, if any, are ignored).
        epochs: passes over ``data``.
        batch_size: images per step.
        lr: peak learning rate (AdamW, cosine schedule after a linear warm-up).
        weight_decay: AdamW's weight decay.
        warmup_epochs: length of the warm-up, in epochs.
        checkpoint (str | os.PathLike | None): a file written after every epoch (resumable).
        resume (str | os.PathLike | bool | None): a checkpoint to continue from (True: ``checkpoint``, if it exists).
        fingerprint: a text identifying the run; resuming a checkpoint of another run is refused.
        seed: the seed of the data order and sampling.
        quiet: no progress bars.
        **train_kwargs (Any): passed on to the training loop (``tokenopt.train.loop.train``).

    Returns:
        The loss per epoch and the time it took (``tokenopt.train.loop.TrainResult``).
    """
    sel = _selectors_of(model)
    teacher = _teacher_for(model, original)

    with _capturing(model) as predictions, _keep_requires_grad(model, original):
        def loss(out, batch):
            with torch.no_grad():
                _, att = teacher(batch[0], sorted(sel))
            return torch.stack([selector_kl(predictions[i], att[i]) for i in sorted(sel)]).mean()

        result = train(model, data, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       warmup_epochs=warmup_epochs, params=[p for m in sel.values() for p in m.parameters()],
                       loss=loss, checkpoint=checkpoint, resume=resume, fingerprint=fingerprint, seed=seed,
                       quiet=quiet, **train_kwargs)
    for m in sel.values():
        m.trained.fill_(True)
    return result


@torch.no_grad()
def held_out_kl(model: nn.Module, original: nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict[int, float]:
    """Each selector's mean KL(real || predicted) on ``images``: how well it predicts its layer."""
    sel = _selectors_of(model)
    teacher = _teacher_for(model, original)
    sums = dict.fromkeys(sel, 0.0)
    was = model.training
    model.eval()
    try:
        with _capturing(model) as predictions:
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size]
                model(x)
                _, att = teacher(x, sorted(sel))
                for i in sel:
                    sums[i] += selector_kl(predictions[i], att[i]).item() * len(x)
    finally:
        model.train(was)
    return {i: s / len(images) for i, s in sums.items()}


def finetune(model: nn.Module, original: nn.Module, data, *, epochs: int, distill: bool = False,
             temperature: float = 1.0, selector_weight: float = 0.0, batch_size: int = 64, lr: float = 1e-4,
             weight_decay: float = 0.05, warmup_epochs: float = 0.5, checkpoint=None, resume=None,
             fingerprint: str = "", seed: int = 0, quiet: bool = False, **train_kwargs) -> TrainResult:
    """Train ``model``'s backbone with ToSA in the loop.

    Loss: cross-entropy on the labels; with ``distill`` (or batches without labels), KL to the
    logits of a frozen copy of ``original`` at ``temperature``. The selectors stay as they are,
    unless ``selector_weight`` > 0: then they train too, by that weight times their KL to the
    frozen original's attention, following their inputs as the backbone changes. ``model`` shares
    its parameters with ``original``, so fine-tuning changes ``original`` too: the teacher is
    copied first.

    Args:
        model: what [`tokenopt.optimize`][tokenopt.optimize] returned (any recipe).
        original: the model it was optimized from.
        data (Dataset | DataLoader): a data set of ``(image, label)`` (or images alone: then the original's logits teach).
        epochs: passes over ``data``.
        distill: learn the original's logits (KL at ``temperature``) instead of the labels.
        temperature: the softening of both logits under ``distill``.
        selector_weight: > 0 trains the ToSA selectors too, with this weight on their KL loss.
        batch_size: images per step.
        lr: peak learning rate (AdamW, cosine schedule after a linear warm-up).
        weight_decay: AdamW's weight decay.
        warmup_epochs: length of the warm-up, in epochs.
        checkpoint (str | os.PathLike | None): a file written after every epoch (resumable).
        resume (str | os.PathLike | bool | None): a checkpoint to continue from (True: ``checkpoint``, if it exists).
        fingerprint: a text identifying the run; resuming a checkpoint of another run is refused.
        seed: the seed of the data order and sampling.
        quiet: no progress bars.
        **train_kwargs (Any): passed on to the training loop (``tokenopt.train.loop.train``).

    Returns:
        The loss per epoch and the time it took (``tokenopt.train.loop.TrainResult``).
    """
    soft = distill or _unlabelled(data)
    frozen = None
    if soft or selector_weight:
        frozen = copy.deepcopy(original).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
    sel = sorted(selectors(model)) if selector_weight else []
    attention = _teacher_for(model, frozen) if sel else None
    selector_params = {id(p) for m in selectors(model).values() for p in m.parameters()}
    params = [p for p in model.parameters() if sel or id(p) not in selector_params]

    # the hooks keep selector predictions; also no untrained-selector warning while training
    with _capturing(model) as predictions, _keep_requires_grad(model, original):
        def loss(out, batch):
            logits = class_logits(out)
            with torch.no_grad():
                t, att = attention(batch[0], sel) if attention is not None else \
                    (frozen(batch[0]) if soft else None, {})
            if soft:
                t = class_logits(t)
                value = F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(t / temperature, -1),
                                 reduction="batchmean") * temperature ** 2
            else:
                value = F.cross_entropy(logits, batch[1])
            if sel:
                value = value + selector_weight * torch.stack([selector_kl(predictions[i], att[i]) for i in sel]).mean()
            return value

        return train(model, data, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                     warmup_epochs=warmup_epochs, params=params, loss=loss, checkpoint=checkpoint,
                     resume=resume, fingerprint=fingerprint, seed=seed, quiet=quiet, **train_kwargs)


def _unlabelled(data) -> bool:
    """True when the data yields images only (no labels to fine-tune on)."""
    dataset = getattr(data, "dataset", data)
    try:
        item = dataset[0]
    except Exception:
        return False
    return not (isinstance(item, (tuple, list)) and len(item) > 1)


def _fit(model, original, data, *, labels=None, **loop) -> TrainResult:
    return train_selectors(model, original, data, **loop)


def _finetune(model, original, data, *, labels=None, gate_weight=0.0, **options) -> TrainResult:
    return finetune(model, original, data, **options)


def _mean_kl(model, original, images) -> float:
    kls = held_out_kl(model, original, images)
    return sum(kls.values()) / len(kls)


SELECTOR_TRAINER = register_trainer(ops.TokenSelector)(Trainer(
    noun="selectors", fit=_fit, finetune=_finetune, measure=_mean_kl, column="selector KL"))
