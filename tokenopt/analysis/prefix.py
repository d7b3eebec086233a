"""Prefix tokens: the learned tokens (class, distillation, registers) in front of the patch tokens.

    x = patch_embed(img)                                 # (B, N, C), computed from the image
    x = torch.cat([cls.expand(B, -1, -1), reg, x], 1)    # (B, 1 + R + N, C): prefix = 1 + R
    x = x + pos_embed  ->  blocks

Asked in this order: the recipe (``prefix_tokens:``), ``model.num_prefix_tokens`` (timm), and the
graph: a ``cat`` along the token axis before the first block, counting the tokens of the parts
in front of the first part computed from the image. Passes protect prefix tokens (never merged,
always selected) and pooling skips them.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from tokenopt.analysis.index import GraphIndex
from tokenopt.analysis.nodes import shape_of
from tokenopt.analysis.records import BlockRecord


def find_prefix_tokens(model: nn.Module, blocks: list[BlockRecord], index: GraphIndex,
                  override: int | None = None) -> tuple[int, str]:
    """(count, where the count came from)."""
    if override is not None:
        return override, "set by the recipe"
    n = getattr(model, "num_prefix_tokens", None)
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if isinstance(n, int) and n and patches == blocks[0].tokens:
        # e.g. CaiT: the class token joins only in the class-attention blocks at the end
        return 0, "the blocks see only patch tokens"
    if isinstance(n, int):
        return n, "model.num_prefix_tokens"
    first_in = index.node(blocks[0].input)
    img = index.placeholders()[0]
    for m in sorted(index.ancestors(first_in) | {first_in}, key=index.position):
        if m.op == "call_function" and m.target is torch.cat:
            parts = m.args[0] if m.args else m.kwargs.get("tensors")
            dim = m.kwargs.get("dim", m.args[1] if len(m.args) > 1 else 0)
            if not isinstance(parts, (list, tuple)) or dim not in (1, -2):
                continue
            count = 0
            for p in parts:
                if _tensor_from_image(p, img):
                    return count, "learned tokens concatenated before the patch tokens"
                sp = shape_of(p)
                count += sp[1] if sp else 0
    return 0, "none found"


def _tensor_from_image(p: fx.Node, img: fx.Node) -> bool:
    # follow tensor-valued inputs only: cls.expand(x.shape[0], ...) reads the image's *shape*
    stack, seen = [p], set()
    while stack:
        n = stack.pop()
        if n is img:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if a is img or shape_of(a) is not None)
    return False
