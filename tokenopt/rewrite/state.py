"""TokenState: the token bookkeeping threaded through a rewritten graph, as graph nodes and data."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from tokenopt.tokens import Dense, Layout


@dataclass
class TokenState:
    """What later blocks need to know about the tokens at the current point of the rewrite.

    ``size`` and ``index`` are graph nodes (values exist only when the model runs); the rest is
    data fixed at rewrite time.
    """

    size: fx.Node | None = None          # (B, N, 1) patches per token; None = all ones
    index: fx.Node | None = None         # (B, N0) position of every original token; None = untracked
    prop_attn: bool = False              # later attentions add log(size) to their logits
    reduced: bool = False                # the token count changed since the input
    unmerged: bool = False               # the stream was put back on the original grid already
    layout: Layout = field(default_factory=Dense)   # Dense (B, N, C) or Packed (per-image lengths, offsets)
