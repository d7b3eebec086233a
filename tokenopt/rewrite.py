"""The small rewriting API passes use, and the driver that applies a plan block by block.

Passes never walk raw fx graphs: they ask a :class:`GraphRewriter` for the nodes a block record
names, insert calls to ``tokenopt.ops`` functions after them, and update the :class:`TokenState`
that is threaded through the graph explicitly (``size`` for merges, ``index`` to undo merges,
room for per-image token counts of packed layouts). Passes that add trained parameters register
submodules with :meth:`GraphRewriter.add_module`, so they appear in ``state_dict``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.fx as fx
from torch import nn

from tokenopt.analysis import BlockRecord, ModelAnalysis, shape_of
from tokenopt.ops import attention as attn_ops
from tokenopt.ops import tome as tome_ops
from tokenopt.tokens import Dense, Layout

S = TypeVar("S")


@dataclass
class TokenState:
    """Graph nodes carrying the token bookkeeping at the current point of the rewrite."""

    size: fx.Node | None = None          # (B, N, 1) patches per token; None = all ones
    index: fx.Node | None = None         # (B, N0) position of every original token; None = untracked
    prop_attn: bool = False              # add log(size) to later attention logits
    reduced: bool = False                # token count changed since the input
    unmerged: bool = False               # the stream was put back on the original grid already
    layout: Layout = field(default_factory=Dense)   # Dense (B, N, C) or Packed (per-image lengths, offsets)


class GraphRewriter:
    def __init__(self, analysis: ModelAnalysis, track_index: bool = False):
        self.analysis = analysis
        self.gm = analysis.graph
        self.graph = self.gm.graph
        self.state = TokenState()
        self.track_index = track_index
        self.inserted: dict[str, str] = {}   # node name -> short description, for reports and graphs
        # inserted nodes that are a pass's own cost rather than the block's work (ToSA's selector
        # path): node name -> the block they serve, so reports can show what a selection costs
        self.overhead: dict[str, int] = {}
        # block index -> the node holding its (B,) tokens per image, where the count varies by image
        self.token_counts: dict[int, str] = {}
        self._pass_state: dict[type, object] = {}
        self._by_name = {n.name: n for n in self.graph.nodes}

    def pass_state(self, kind: type[S]) -> S:
        """The one instance of a pass's own bookkeeping dataclass ``kind`` for this rewrite
        (created on first use): what a pass carries from one of its layers to the next."""
        if kind not in self._pass_state:
            self._pass_state[kind] = kind()
        return self._pass_state[kind]

    def record_token_count(self, block: BlockRecord, counts: fx.Node) -> None:
        """``counts`` holds the (B,) tokens per image after ``block``; the report measures it."""
        self.token_counts[block.index] = counts.name

    # ---------------------------------------------------------------- lookup and insertion
    def node(self, name: str) -> fx.Node:
        return self._by_name[name]

    def insert_after(self, anchor: fx.Node, fn, *args, label: str = "", **kwargs) -> fx.Node:
        with self.graph.inserting_after(anchor):
            new = self.graph.call_function(fn, args=args, kwargs=kwargs)
        new.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack", {}))
        self._by_name[new.name] = new
        self.inserted[new.name] = label or fn.__name__
        return new

    def getitem(self, node: fx.Node, i: int, label: str = "") -> fx.Node:
        import operator
        return self.insert_after(node, operator.getitem, node, i, label=label or f"{node.name}[{i}]")

    def get_attr(self, target: str) -> fx.Node:
        first = next(n for n in self.graph.nodes if n.op != "placeholder")
        with self.graph.inserting_before(first):
            n = self.graph.get_attr(target)
        self._by_name[n.name] = n
        return n

    def add_module(self, name: str, module: nn.Module) -> str:
        """Register a new (e.g. trained) submodule; it becomes part of state_dict."""
        self.gm.add_submodule(name, module)
        return name

    def call_module_after(self, anchor: fx.Node, target: str, *args, label: str = "") -> fx.Node:
        """Insert a call of the submodule ``target`` (see :meth:`add_module`) after ``anchor``."""
        with self.graph.inserting_after(anchor):
            new = self.graph.call_module(target, args=args)
        new.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack", {}))
        self._by_name[new.name] = new
        self.inserted[new.name] = label or target
        return new

    def wrap(self, node: fx.Node, fn, *args, label: str = "") -> fx.Node:
        """Make ``node`` compute ``fn(*args, value)``, where value is what it computed before.

        The old computation moves to a new node just before it, which is returned. ``node`` keeps
        its name and its users, so block records naming it (a block's output, the next block's
        input, the features) keep meaning the token stream after the rewrite.
        """
        with self.graph.inserting_before(node):
            inner = self.graph.create_node(node.op, node.target, node.args, node.kwargs)
        inner.meta = {k: v for k, v in node.meta.items() if k != "tensor_meta"}
        node.op, node.target, node.kwargs = "call_function", fn, {}
        node.args = (*args, inner)
        self._by_name[inner.name] = inner
        self.inserted[node.name] = label or fn.__name__
        return inner

    def replace_uses(self, old: fx.Node, new: fx.Node, keep: tuple[fx.Node, ...] = ()) -> None:
        """Make every consumer of ``old`` read ``new``, except ``keep`` (the nodes computing ``new``)."""
        skip = set(keep) | {new}
        old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in skip)

    # ---------------------------------------------------------------- token bookkeeping
    def stream_batch(self, block: BlockRecord) -> fx.Node:
        return self.node(block.merge_point)

    def add_key_bias(self, block: BlockRecord) -> None:
        """Proportional attention: log(size) added along the key axis of ``block``'s attention."""
        size = self.state.size
        core = block.attention
        c = self.node(core.node)
        dtype = shape_of(self.node(block.input)) and self.node(block.input).meta["tensor_meta"].dtype
        if core.kind == "sdpa":
            existing = c.kwargs.get("attn_mask", c.args[3] if len(c.args) > 3 else None)
            existing = existing if isinstance(existing, fx.Node) and existing.op != "placeholder" else None
            with self.graph.inserting_before(c):
                mask = self.graph.call_function(attn_ops.key_log_size_mask, (size, dtype, existing))
            self.inserted[mask.name] = "proportional attention mask log(size)"
            args = list(c.args)
            if len(args) > 3:
                args[3] = mask
                c.args = tuple(args)
            else:
                c.kwargs = {**c.kwargs, "attn_mask": mask}
        elif core.kind == "softmax":
            logits = self.node(core.logits)
            biased = self.insert_after(logits, attn_ops.add_key_log_size, logits, size,
                                       label="proportional attention logits + log(size)")
            self.replace_uses(logits, biased)
        elif core.kind == "mha":
            existing = c.kwargs.get("key_padding_mask")
            existing = existing if isinstance(existing, fx.Node) else None
            with self.graph.inserting_before(c):
                mask = self.graph.call_function(attn_ops.mha_key_padding_bias, (size, dtype, existing))
            self.inserted[mask.name] = "proportional attention key_padding_mask log(size)"
            c.kwargs = {**c.kwargs, "key_padding_mask": mask}

    def keys_metric(self, block: BlockRecord, after: fx.Node) -> fx.Node:
        """ToMe's matching metric for ``block``: its keys averaged over heads, as (B, N, d), or as
        the per-head keys (B, N, H, d) whose mean the matching takes."""
        core = block.attention
        if core.kind == "mha":
            c = self.node(core.node)
            mod = self.gm.get_submodule(core.module)
            w = self.get_attr(f"{core.module}.in_proj_weight")
            b = self.get_attr(f"{core.module}.in_proj_bias") if mod.in_proj_bias is not None else None
            return self.insert_after(after, tome_ops.mha_keys_mean_over_heads, c.args[0], w, b, mod.num_heads,
                                     label="metric: keys mean over heads")
        return self.insert_after(after, tome_ops.keys_per_token, self.node(core.k), self.node(block.merge_point),
                                 label="metric: keys (mean over heads taken by the matching)")

    def ensure_index(self, block: BlockRecord) -> None:
        """Start tracking original token positions at the first reduction (needed to unmerge)."""
        if self.track_index and self.state.index is None:
            x_in = self.node(self.analysis.blocks[0].input)
            idx = self.insert_after(x_in, tome_ops.initial_index, x_in, label="token index map")
            self.state.index = idx

    def finish(self) -> fx.GraphModule:
        self.graph.eliminate_dead_code()
        self.graph.lint()
        self.gm.recompile()
        return self.gm
