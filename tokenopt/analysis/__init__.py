"""Analysis: find the transformer blocks, the token stream, the prefix tokens and the pooling.

Data in, data out: :func:`analyse` captures the model (torch.fx symbolic tracing, or torch.export
where that fails), records shapes on an example batch and returns a :class:`ModelAnalysis` of
plain records that name graph nodes. It never mutates the model. Every attention core that does
not become a reducible block carries a written reason.

    capture (fx | export + aten_vocabulary, token_axis, constant_masks) ─ example.record_shapes
          ─ index.GraphIndex ─ cores.find_cores ─ blocks.block_for ─ branches.join_cross_attention
          ─ batch_size.localise_batch ─ prefix.find_prefix_tokens ─ windows.find_window ─ refusals (named checks, first one
          refuses) ─ streams.find_streams ─ pooling.find_pooling

One module per question, imports pointing one way (each imports only from those before it):

    records          the dataclasses (AttentionCore, Branch, BlockRecord, Stream, Downsample, Pooling,
                     ModelAnalysis) and NoMatch
    nodes            predicates on one node (is_add, is_softmax, shape_of, module_path ...), every spelling
    aten_vocabulary  an ATen graph (torch.export) rewritten into fx's op vocabulary
    token_axis       sizes an exported graph fixed on the token axis, read at run time again
    constant_masks   all-True attention masks an export built from the token count, removed
    batch_size       each block of an exported graph reads the batch size off its own input
    index            GraphIndex: lookup by name, graph order, ancestors/descendants, built once
    example          the example inputs (Example) and the shape recorder
    capture          the front ends: fx symbolic trace, torch.export; "auto" picks
    cores            attention cores: fused SDPA, explicit softmax(q @ k^T) @ v, nn.MultiheadAttention
    branches         a block's residual branches; where an attention's keys come from; cross-attention joined
    blocks           residual adds, merge point and MLP around each core
    refusals         the named checks that keep a block on its original token grid
    prefix           cls / distillation / register tokens
    windows          a windowed block's partition: window size, shift, grid, the terms on its logits
    streams          which blocks share a token stream (grid, layout), and the steps between streams
    pooling          what consumes the tokens after the last block, and the features node
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
from torch import nn

from tokenopt.analysis.batch_size import localise_batch
from tokenopt.analysis.blocks import block_for
from tokenopt.analysis.branches import join_cross_attention
from tokenopt.analysis.capture import CAPTURE_MODES, Captured, capture as capture_graph, export_graph, family_of
from tokenopt.analysis.cores import explicit_core, find_cores, mha_core, sdpa_core
from tokenopt.analysis.dense import keeps_every_token
from tokenopt.analysis.example import Example, ShapeRecorder, example_input_for, record_shapes
from tokenopt.analysis.index import GraphIndex
from tokenopt.analysis.nodes import (common_module_prefix, is_add, is_core_node, is_matmul, is_sdpa, is_softmax,
                                     module_path, shape_of, tensor_args)
from tokenopt.analysis.pooling import find_pooling
from tokenopt.analysis.prefix import find_prefix_tokens
from tokenopt.analysis.records import (CLASS_ATTENTION, AttentionCore, Site, BlockRecord, Branch, Downsample, ModelAnalysis,
                                       NoMatch, Pooling, Stream)
from tokenopt.analysis.refusals import CHECKS, Check, CheckContext, check, first_refusal
from tokenopt.analysis.streams import find_streams
from tokenopt.analysis.windows import WindowRecord, find_window
from tokenopt.errors import AnalysisError

__all__ = [
    "AnalysisError", "analyse_graph", "AttentionCore", "BlockRecord", "Branch", "CAPTURE_MODES", "CHECKS",
    "CLASS_ATTENTION", "Site", "Captured", "Check", "CheckContext", "Downsample", "Example", "Stream", "capture_graph",
    "export_graph", "family_of",
    "GraphIndex", "ModelAnalysis", "NoMatch", "Pooling", "ShapeRecorder", "analyse", "block_for", "check",
    "common_module_prefix", "example_input_for", "explicit_core", "find_cores", "first_refusal", "is_add",
    "find_pooling", "find_prefix_tokens", "is_core_node", "is_matmul", "is_sdpa", "is_softmax", "mha_core",
    "module_path",
    "record_shapes", "sdpa_core", "shape_of", "tensor_args", "WindowRecord", "find_window",
]

_NO_ATTENTION = "no attention (SDPA, softmax(q@k^T)@v or nn.MultiheadAttention) in the graph"


def analyse(model: nn.Module, example_input=None, leaf_modules=(),
            prefix_tokens: int | None = None, capture: str = "auto") -> ModelAnalysis:
    """Capture ``model`` (``capture``: "auto" | "fx" | "export", see :mod:`tokenopt.analysis.capture`)
    on ``example_input`` (an :class:`Example`, a tensor, or None: from the model's config) and
    describe its blocks. Raises AnalysisError when there are none."""
    example = Example.of(example_input if example_input is not None else example_input_for(model))
    captured = capture_graph(model, example, capture, leaf_modules)
    analysis = analyse_graph(captured.graph, model, tuple(example.image.shape), prefix_tokens)
    return replace(analysis, example=example)


def _mark_kept_streams(blocks: list[BlockRecord], streams, gm: fx.GraphModule) -> list[BlockRecord]:
    """Every block of a stream whose tokens become a feature map again carries why (see analysis.dense)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for s in streams:
        last = blocks[s.blocks[-1]]
        why = keeps_every_token(s, nodes[last.output])
        if why is not None:
            blocks = [replace(b, keeps_tokens=why) if b.stream == s.index else b for b in blocks]
    return blocks


def analyse_graph(gm: fx.GraphModule, model: nn.Module, input_shape: tuple[int, ...] = (),
                  prefix_tokens: int | None = None) -> ModelAnalysis:
    """Describe the blocks of a graph already captured, whose nodes carry their shapes
    (``node.meta["tensor_meta"]``, e.g. from :class:`ShapeRecorder`), such as a graph with
    more inputs than the image. ``model`` is what was captured (read for ``num_prefix_tokens``)."""
    index = GraphIndex(gm.graph)
    cores, no_matches = find_cores(gm, index)
    blocks: list[BlockRecord] = []
    for core in cores:
        rec = block_for(core, len(blocks), gm, index)
        if rec:
            blocks.append(rec)
        else:
            no_matches.append(rec)
    blocks = join_cross_attention(blocks)
    if localise_batch(gm, [(b.input, b.output) for b in blocks]):
        index = GraphIndex(gm.graph)      # a size read per block was inserted: index afresh
    unmatched = [(m.where, m.reason) for m in no_matches if m.near_miss]
    if not blocks:
        why = "; ".join(f"{w}: {r}" for w, r in unmatched) or _NO_ATTENTION
        raise AnalysisError(
            f"{family_of(model)} has no transformer blocks tokenopt can find ({why}).\n"
            "  tokenopt rewrites Vision Transformers: blocks of the form x + attn(norm(x)), then + mlp(norm(x)). "
            "If your attention lives in a module fx cannot see into, do not mark it as a leaf.")
    prefix, source = find_prefix_tokens(model, blocks, index, prefix_tokens)
    blocks = [replace(b, window=w) if (w := find_window(b, index)) is not None else b for b in blocks]
    ctx = CheckContext(gm, index, prefix)
    for i, b in enumerate(blocks):
        refused = first_refusal(b, ctx)
        if refused is not None:
            by, why = refused
            blocks[i] = replace(b, refused_by=by, refusal=str(why))
    streams, downsamples, stream_of = find_streams(blocks, gm, index, prefix)
    blocks = [b if b.stream == s else replace(b, stream=s) for b, s in zip(blocks, stream_of)]
    blocks = _mark_kept_streams(blocks, streams, gm)
    pools, features = find_pooling(blocks[-1], gm, index)
    return ModelAnalysis(gm, blocks, unmatched, prefix, source, pools, tuple(input_shape), features,
                         no_matches=no_matches, index=index, capture=gm.meta.get("tokenopt_capture", "fx"),
                         streams=streams, downsamples=downsamples)

