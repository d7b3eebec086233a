"""The plain data the analysis returns: records that name graph nodes, and typed non-matches.

Everything here is a dataclass that names fx nodes by their ``name`` (a string), so records can
be printed, compared and kept after the graph they describe has been rewritten::

    ModelAnalysis
      .blocks    [BlockRecord(index=0, path="blocks.0", input="x", attn_residual="add",
                              merge_point="add", output="add_1",
                              attention=AttentionCore("sdpa", node="scaled_dot_product_attention",
                                                      q=..., k=..., v=..., output=...)), ...]
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


@dataclass
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


@dataclass
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

    @property
    def grid_bound(self) -> bool:
        """True when the block needs the original token grid, so no earlier block may change it.
        A class-attention block cannot be reduced itself but reads any number of tokens."""
        return self.refusal is not None and not self.refusal.startswith(CLASS_ATTENTION)


@dataclass
class Pooling:
    kind: str                      # "cls" | "avg" | "max" | "tokens"
    node: str | None               # the node that reduces the token axis (None for "tokens")
    start: int = 0                 # avg/max: first token pooled (prefix tokens excluded)
    detail: str = ""


@dataclass
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
            lines.append(f"  [{b.index:2d}] {b.path:<24} {b.attention.kind:<7} tokens={b.tokens:<5} {status}")
        for where, why in self.unmatched:
            lines.append(f"  not a block: {where}: {why}")
        return "\n".join(lines)
