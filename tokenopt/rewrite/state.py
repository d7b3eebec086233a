"""TokenState: the token bookkeeping threaded through a rewritten graph, and the obligations a pass
leaves for the blocks after it.

A pass that changes the tokens says what every later block must do about it by recording an
*obligation* on the state; :meth:`GraphRewriter.begin_block` (and :meth:`GraphRewriter.bracket`
for the blocks inside a region) applies each one without knowing which pass asked::

    state.oblige(KeyBias("proportional attention", key_log_size, (size,)))   # ToMe after a merge
    state.oblige(AttendWithinImages(layout, why=..., fix=...))               # SPA prune: packed stream

An obligation is frozen data keyed by its ``key``: a newer one of the same key replaces the older
(the next merge's sizes replace the last merge's), :meth:`TokenState.release` drops one.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch.fx as fx

from tokenopt.errors import PlanError
from tokenopt.tokens import Dense, Layout, Packed

# Annotations name GraphRewriter and BlockRecord without importing them: the rewriter imports this
# module, and an obligation only calls the primitives of the rewriter it is handed.


@dataclass(frozen=True)
class KeyBias:
    """Every later attention adds ``fn(*args)[:, j]`` to the logits of key j (args: graph nodes).

    Blocks that were refused (they keep the original grid, e.g. CaiT's class attention reading an
    unmerged stream) are left alone.
    """

    key: str
    fn: Callable
    args: tuple

    def apply(self, g: GraphRewriter, block: BlockRecord) -> None:
        if block.refusal is None:
            g.add_attention_bias(block, self.fn, *self.args, label=self.key)


@dataclass(frozen=True)
class AttendWithinImages:
    """Every later attention runs over a packed batch, each token attending only to its own image.

    ``why`` and ``fix`` complete the message for a block that cannot (it was refused for a reason of
    its own): the pass that packed the stream words them, the rewriter names the block.
    """

    layout: Packed
    why: str = "the token stream is packed per image"
    fix: str = ""
    key: str = "attend within images"

    def apply(self, g: GraphRewriter, block: BlockRecord) -> None:
        refusal = block.refusal
        if refusal is not None:
            raise PlanError(f"{block.path} runs after {self.why} but cannot attend over a packed batch "
                            f"({refusal}).{f'{chr(10)}  {self.fix}' if self.fix else ''}")
        g.isolate_attention(block, g.node(self.layout.lengths), self.layout)


@dataclass
class TokenState:
    """What later blocks need to know about the tokens at the current point of the rewrite.

    ``size`` and ``index`` are graph nodes (values exist only when the model runs); the rest is
    data fixed at rewrite time. No field belongs to a pass: what a pass needs later blocks to do is
    an obligation (:meth:`oblige`).
    """

    size: fx.Node | None = None          # (B, N, 1) patches per token; None = all ones
    index: fx.Node | None = None         # (B, N0) position of every original token; None = untracked
    reduced: bool = False                # the token count changed since the input
    layout: Layout = field(default_factory=Dense)   # Dense (B, N, C) or Packed (per-image lengths, offsets)
    obligations: dict[str, object] = field(default_factory=dict)   # key -> obligation, in the order made

    def oblige(self, obligation) -> None:
        """Every later block must honour ``obligation`` (replacing an older one with its key)."""
        self.obligations.pop(obligation.key, None)
        self.obligations[obligation.key] = obligation

    def release(self, key: str) -> None:
        """Later blocks no longer need the obligation ``key`` (no-op when there is none)."""
        self.obligations.pop(key, None)

    def copy(self) -> TokenState:
        """A state to change inside a region without touching this one (obligations copied)."""
        return replace(self, obligations=dict(self.obligations))
