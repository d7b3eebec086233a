"""Prefix tokens: the learned tokens (class, distillation, registers) in front of the patch tokens.

    x = patch_embed(img)                                 # (B, N, C), computed from the image
    x = torch.cat([cls.expand(B, -1, -1), reg, x], 1)    # (B, 1 + R + N, C): prefix = 1 + R
    x = x + pos_embed  ->  blocks

    x = torch.cat([x[:, :1], reg, x[:, 1:]], 1)          # registers after the class token
                                                         # (Hugging Face DINOv2): also 1 + R

Asked in this order: the recipe (``prefix_tokens:``), ``model.num_prefix_tokens`` (timm), and the
graph: a ``cat`` along the token axis before the first block, counting the tokens of the parts
in front of the first part computed from the image. Passes protect prefix tokens (never merged,
always selected) and pooling skips them.
"""
from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from tokenopt.analysis.index import GraphIndex
from tokenopt.analysis.nodes import cat_parts, is_token_cat, shape_of
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
    count, patches = _prefix_of(first_in, img, {})
    if count and patches:
        return count, "learned tokens concatenated before the patch tokens"
    return 0, "none found"


def _prefix_of(n: fx.Node, img: fx.Node, memo: dict) -> tuple[int, bool]:
    """(learned tokens in front, whether patch tokens follow) of the token stream ``n`` (B, N, C).

    cat on the token axis adds up its parts up to the first that holds patches; a slice of the
    token axis keeps the prefix tokens inside it (DINOv2 with registers cuts the class token off,
    puts the registers after it, then the patches); a node not computed from the image is all
    learned tokens; an op that keeps the token count passes its image input's answer on; anything
    else that made the stream from the image (the patch embedding) holds patches only.
    """
    if n in memo:
        return memo[n]
    shape = shape_of(n)
    tokens = shape[1] if shape is not None and len(shape) == 3 else None
    if not _tensor_from_image(n, img):
        result = (tokens or 0, False)
    elif is_token_cat(n):
        result, total = None, 0
        for p in cat_parts(n):
            count, patches = _prefix_of(p, img, memo)
            total += count
            if patches:
                result = (total, True)
                break
        result = result or (total, False)
    elif (cut := _token_slice(n)) is not None:
        src, start, stop = cut
        count, patches = _prefix_of(src, img, memo)
        n_src = shape_of(src)[1]
        start, stop, _ = slice(start, stop).indices(n_src)
        result = (max(0, min(stop, count) - start), patches and stop > count)
    else:
        same = [a for a in n.all_input_nodes if a is not img and _tensor_from_image(a, img)
                and (sa := shape_of(a)) is not None and len(sa) == 3 and sa[1] == tokens]
        result = _prefix_of(same[0], img, memo) if same and tokens is not None else (0, True)
    memo[n] = result
    return result


def _token_slice(n: fx.Node):
    """(source, start, stop) of ``x[:, start:stop]``, or None."""
    if not (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node)):
        return None
    idx = n.args[1]
    if not (isinstance(idx, tuple) and len(idx) >= 2 and idx[0] == slice(None) and isinstance(idx[1], slice)
            and all(i == slice(None) or i is Ellipsis for i in idx[2:]) and idx[1].step in (None, 1)):
        return None
    sa = shape_of(n.args[0])
    if sa is None or len(sa) != 3 or not all(isinstance(v, (int, type(None))) for v in (idx[1].start, idx[1].stop)):
        return None
    return n.args[0], idx[1].start, idx[1].stop


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
