"""The plain data the analysis returns: records that name graph nodes, and typed non-matches.

Everything here is a dataclass that names fx nodes by their ``name`` (a string), so records can
be printed, compared and kept after the graph they describe has been rewritten::

    ModelAnalysis
      .blocks    [BlockRecord(index=0, path="blocks.0", input="x", attn_residual="add",
                              merge_point="add", output="add_1",
                              attention=AttentionCore("sdpa", node="scaled_dot_product_attention",
                                                      q=..., k=..., v=..., output=...),
                              branches=(Branch("self_attention", ...), Branch("mlp", ...)), stream=0), ...]
      .streams   [Stream(index=0, blocks=(0, 1, ...), grid=(14, 14), layout="bnc", prefix_tokens=1, ...)]
      .downsamples [Downsample(source=0, target=1, node=..., kind="merge")]   # between streams, if several
      .unmatched [("blocks.5.attn", "no residual add around the attention (x + attn(x))")]
      .prefix_tokens, .pooling, .features, .index (a GraphIndex of the analysed graph)

A pattern that does not match returns :class:`NoMatch` with the reason, never ``None`` or a bare
string: it is falsy, so ``if not (core := find(...)): return core`` passes the reason up.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch.fx as fx

if TYPE_CHECKING:   # the index is built from the graph; records only carry it
    from tokenopt.analysis.index import GraphIndex

CLASS_ATTENTION = "class attention"
WINDOWED = "windowed"     # refused_by of a windowed block that window-aware passes rewrite


@dataclass(frozen=True)
class NoMatch:
    """Why a pattern did not match (like inductor's ``FailedMatch``). Falsy; ``str()`` is the reason.

    where: the node or module the pattern was tried on.
    near_miss: False when the node was not a candidate at all (a softmax whose result multiplies
        no values is a gate, not attention); reports list near misses only.
    """

    reason: str
    where: str | None = None
    near_miss: bool = True

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.reason

    def at(self, where: str) -> NoMatch:
        return replace(self, where=where)


@dataclass(frozen=True)
class AttentionCore:
    kind: str                      # "sdpa" | "softmax" | "mha"
    node: str                      # the SDPA call, the softmax, or the MHA call_module
    q: str | None = None
    k: str | None = None           # keys with the token axis at -2, heads split (B, H, N, d) or (B*H, N, d)
    logits: str | None = None      # explicit path: the node feeding softmax (pre-softmax logits)
    heads: int | None = None
    module: str | None = None      # MHA: qualified module name
    v: str | None = None           # values: SDPA's third argument, the right operand of attn @ v; MHA: None
    output: str | None = None      # the attention result: the SDPA call, the attn @ v matmul, the MHA call
    # where keys and values come from: "tokens" (computed from the block's own token stream, as in
    # self-attention, CaiT's class attention and PVT's spatial reduction), else the node they come
    # from (a cross-attention's text states: usually a model input)
    kv_source: str = "tokens"


SELF_ATTENTION, CROSS_ATTENTION, MLP = "self_attention", "cross_attention", "mlp"
BRANCH_KINDS = (SELF_ATTENTION, CROSS_ATTENTION, MLP)


@dataclass(frozen=True)
class Branch:
    """One residual branch of a block: ``residual = entry + f(entry)``, with ``f(entry)`` = ``exit``.

    entry: the node the branch reads from the token stream (the block input, or the residual of
        the branch before; in a post-norm block the norm after it);
    exit: the branch's output, before the add; residual: the add.
    core: the attention core of an attention branch; None for the MLP.
    """

    kind: str                      # "self_attention" | "cross_attention" | "mlp"
    entry: str
    exit: str
    residual: str
    core: AttentionCore | None = None


@dataclass(frozen=True)
class Site:
    """Where in a model a pass acts: a stream, a block on it, a branch of the block ("block": the
    whole block). Per-site data of a rewrite (token counts, a pass's overhead) is keyed by it.
    Block indices run across the whole model, so ``block`` alone is unique; the stream and the
    branch say where it sits."""

    stream: int
    block: int
    branch: str = "block"


@dataclass(frozen=True)
class BlockRecord:
    index: int
    path: str                      # module path, e.g. "blocks.3"
    input: str                     # block input (token stream in)
    attention: AttentionCore
    attn_residual: str             # x + attn(...)
    merge_point: str               # where token reduction goes (between attention and MLP)
    output: str                    # block output (MLP residual, or attn residual if no MLP)
    tokens: int                    # tokens entering the block in the example batch
    dim: int
    refusal: str | None = None     # None: every pass may rewrite it; else why not
    refused_by: str | None = None  # name of the check in tokenopt.analysis.refusals that refused it
    # the residual branches in the order the block runs them: (self_attention, mlp) for a ViT block;
    # (self_attention, cross_attention, mlp) for a diffusers BasicTransformerBlock
    branches: tuple[Branch, ...] = ()
    stream: int = 0                # index into ModelAnalysis.streams
    # why no token may be lost in this block's stream (it becomes a feature map again: a UNet's
    # spatial transformer), or None; passes that drop tokens refuse it, op-level merging does not
    keeps_tokens: str | None = None
    # windowed attention (Swin): how the block partitions its tokens (analysis.windows.WindowRecord)
    window: object = None

    def site(self, branch: str = "block") -> Site:
        return Site(self.stream, self.index, branch)

    @property
    def grid_bound(self) -> bool:
        """True when the block needs the original token grid, so no earlier block may change it.
        A class-attention block cannot be reduced itself but reads any number of tokens."""
        return self.refusal is not None and not self.refusal.startswith(CLASS_ATTENTION)


@dataclass(frozen=True)
class Stream:
    """Blocks on one token stream, in order: between them the tokens keep their count and width.

    grid: (H, W) of the patch tokens when the shapes show it: a conv map (B, C, H, W) or a
        (B, H, W, C) tensor the stream came from or goes to, with H * W patch tokens. Otherwise
        (a ViT with a cls token whose embedding the graph does not show as a map) it is
        *inferred*: (s, s) when tokens - prefix_tokens is a perfect square s * s; else None.
    layout: "bnc" (tokens on one axis) or "bhwc" (a 2-D token grid, as in Swin).
    """

    index: int
    blocks: tuple[int, ...]
    grid: tuple[int, int] | None
    layout: str                    # "bnc" | "bhwc"
    prefix_tokens: int
    tokens: int                    # tokens entering the stream's first block (prefix included)
    dim: int


@dataclass(frozen=True)
class Downsample:
    """The step from one stream to the next: tokens or channels change between two blocks.

    node: the node that makes the new stream (the conv, the merging projection ...).
    kind: "merge" (fewer tokens, wider: patch merging), "conv" (a conv over the token grid),
        "upsample" (more tokens) or "other" (pooling, a projection ...).
    """

    source: int                    # stream index before
    target: int                    # stream index after
    node: str
    kind: str                      # "merge" | "conv" | "upsample" | "other"


@dataclass(frozen=True)
class Pooling:
    kind: str                      # "cls" | "avg" | "max" | "tokens"
    node: str | None               # the node that reduces the token axis (None for "tokens")
    start: int = 0                 # avg/max: first token pooled (prefix tokens excluded)
    detail: str = ""


@dataclass(frozen=True)
class ModelAnalysis:
    graph: fx.GraphModule
    blocks: list[BlockRecord]
    unmatched: list[tuple[str, str]] = field(default_factory=list)   # (where, reason) of near misses
    prefix_tokens: int = 0
    prefix_source: str = ""
    pooling: list[Pooling] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    features: str = ""             # last node holding all tokens after the blocks (e.g. final norm)
    # every pattern that did not match, near misses or not (a softmax gate is listed here only)
    no_matches: list[NoMatch] = field(default_factory=list, repr=False, compare=False)
    # the graph as analysed, indexed; a snapshot: a rewrite that adds nodes needs a fresh one
    index: GraphIndex | None = field(default=None, repr=False, compare=False)
    capture: str = "fx"            # the front end that made ``graph``: "fx" | "export" (analysis.capture)
    # the token streams (one for a plain ViT) and the steps between consecutive ones
    streams: list[Stream] = field(default_factory=list)
    downsamples: list[Downsample] = field(default_factory=list)
    # the inputs the graph was captured and its shapes recorded with (analysis.example.Example)
    example: object = field(default=None, repr=False, compare=False)

    @property
    def block_paths(self) -> list[str]:
        return [b.path for b in self.blocks]

    def summary(self) -> str:
        lines = [f"{len(self.blocks)} transformer blocks, {self.prefix_tokens} prefix token(s) "
                 f"({self.prefix_source}), pooling: {', '.join(p.kind for p in self.pooling) or 'none'}"]
        for b in self.blocks:
            status = "ok" if b.refusal is None else f"refused: {b.refusal}"
            if b.window is not None:
                status = f"stage {b.stream + 1}, {b.window.describe()}" + (
                    "" if b.refused_by == WINDOWED else f"; {status}")
            lines.append(f"  [{b.index:2d}] {b.path:<24} {b.attention.kind:<7} tokens={b.tokens:<5} {status}")
        if len(self.streams) > 1:
            for st in self.streams:
                grid = "x".join(map(str, st.grid)) if st.grid else "?"
                lines.append(f"  stream {st.index}: blocks {st.blocks[0]}-{st.blocks[-1]}, {st.tokens} tokens "
                             f"(grid {grid}, {st.layout}), dim {st.dim}")
            for d in self.downsamples:
                lines.append(f"  stream {d.source} -> {d.target}: {d.kind} at {d.node}")
        for where, why in self.unmatched:
            lines.append(f"  not a block: {where}: {why}")
        return "\n".join(lines)
