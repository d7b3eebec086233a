"""FLOP counting for whole models and for single fx nodes.

Convention: **FLOPs are counted as multiply-accumulates (MACs)**, the convention of the ViT
literature (DeiT, ToMe, ...: "ViT-S/16 is 4.6 GFLOPs"). ``torch.utils.flop_counter`` counts
2 per MAC (``mm`` of (m, k) @ (k, n) is ``2*m*n*k``); every formula it has is a multiple of 2,
so we halve its totals exactly. Only matmul-like ops (mm, bmm, addmm, conv, attention) count;
softmax, norms, GELU and elementwise ops are free, as in the papers.

Fused attention: on CPU ``F.scaled_dot_product_attention`` dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's counter does not know and
would report as 0. We pass a formula for it (and for the other fused/entry-point variants that
torch leaves out) through ``FlopCounterMode(custom_mapping=...)``, so the global registry of
torch is never modified. Attention is counted as its two matmuls, QKᵀ and AV, densely (no
discount for causal masks, which ViTs do not use), so a fused and an explicit-softmax version of
the same model count exactly the same.

    >>> count_flops(timm.create_model("vit_small_patch16_224").eval(), torch.randn(1, 3, 224, 224))
    4598882304
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.fx
from torch.utils.flop_counter import FlopCounterMode

from tokenopt.trace import NodeTaggingInterpreter

aten = torch.ops.aten


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ plus AV, at 2 per MAC like torch's mm formula (halved later with everything else).

    Shapes are (..., N, d): leading dims (batch, heads) multiply. With grouped-query attention
    the key/value heads are broadcast to the query heads, so the query's leading dims count.
    """
    *lead, n_q, d = query_shape
    n_k = key_shape[-2]
    d_v = value_shape[-1]
    batch_heads = math.prod(lead)
    return 2 * batch_heads * n_q * n_k * d + 2 * batch_heads * n_q * n_k * d_v


def _attention_ops() -> list[Any]:
    # Looked up by name: not every variant exists in every torch build, and a missing one
    # simply never runs. Ops torch already counts (flash/efficient/cudnn) are left to torch.
    # The entry point and the math variants are CompositeImplicit and normally decompose into
    # bmm before the counter sees them; listing them only matters if a backend keeps them whole,
    # and then they are not decomposed further, so nothing counts twice.
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
        "scaled_dot_product_attention",
        "_scaled_dot_product_attention_math",
        "_scaled_dot_product_attention_math_for_mps",
    )
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    """nn.MultiheadAttention's inference fast path (one fused op): q/k/v and output projections
    plus the two attention matmuls, at 2 per MAC. Shapes are (B, N, C) with batch_first."""
    b, n_q, c = query_shape
    n_k = key_shape[-2]
    proj = 2 * b * (n_q * c * c + 2 * n_k * c * c + n_q * c * c)
    return proj + 2 * b * n_q * n_k * c * 2


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts fused attention (totals in torch's 2-per-MAC)."""
    mapping = {op: _attention_flops for op in _attention_ops()}
    if hasattr(aten, "_native_multi_head_attention"):
        mapping[aten._native_multi_head_attention] = _native_mha_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _to_macs(torch_flops: int) -> int:
    return torch_flops // 2


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """Parameters with requires_grad off while counting: the counter's module tracker hooks every
    input that requires grad, and a parameter view made under no_grad (e.g. timm's attention-pool
    ``latent.expand(...)``) requires grad yet has no grad_fn, which the tracker rejects."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def count_flops(module: torch.nn.Module, *inputs: Any, **kw_inputs: Any) -> int:
    """FLOPs (multiply-accumulates) of one forward pass of ``module(*inputs, **kw_inputs)``, without grad."""
    with torch.no_grad(), _frozen(module), flop_counter() as counter:
        module(*inputs, **kw_inputs)
    return _to_macs(counter.get_total_flops())


class _PerNodeFlops(NodeTaggingInterpreter):
    """Runs a graph inside one counter and charges each node the counter's increase.

    Reading the running total before and after each node (rather than a counter per node)
    works for any node kind: call_module leaves and call_function nodes to arbitrary Python
    functions are counted by whatever aten ops they end up dispatching.
    """

    def __init__(self, gm: torch.fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter = counter
        self.per_node: dict[str, int] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        before = self.counter.get_total_flops()
        result = super().run_node(n)
        self.per_node[n.name] = _to_macs(self.counter.get_total_flops() - before)
        return result


def flops_by_node(gm: torch.fx.GraphModule, *inputs: Any) -> dict[str, int]:
    """FLOPs (multiply-accumulates) of each node of ``gm``, keyed by node name, in graph order.

    Every node appears, most with 0. The values sum to ``count_flops(gm, *inputs)``, since
    torch's per-op counts are all even and halving them per node loses nothing.
    """
    with torch.no_grad(), _frozen(gm), flop_counter() as counter:
        interpreter = _PerNodeFlops(gm, counter)
        interpreter.run(*inputs)
    return interpreter.per_node
