"""GraphRewriter: the small API passes rewrite graphs with. Passes never walk fx nodes themselves.

A pass asks the rewriter for the nodes a block record names (:meth:`node`), inserts calls to
``tokenopt.ops`` after them (:meth:`insert_after`, :meth:`wrap`), redirects consumers
(:meth:`replace_uses`, :meth:`reroute`) and changes attention through the primitives below, which
know the three attention kinds the analysis finds::

    sdpa     F.scaled_dot_product_attention(q, k, v, attn_mask=...)
    softmax  softmax(q @ k^T * scale [+ ...]) @ v           (explicit, as research code writes it)
    mha      nn.MultiheadAttention(x, x, x)                  (a module: q, k, v are not in the graph)

    add_attention_bias(block, fn, *args)   every key j gets fn(*args)[:, j] added to its logits
    attention_qkv(block)                   q, k, v as nodes (an MHA is decomposed first, once)
    replace_attention(block, fn)           the core becomes fn(q, k, v, attn_mask=, scale=, ...)
    isolate_attention(block, lengths, ..)  attention over a packed batch, per image (SPA)
    decompose_mha(block)                   in-projection -> SDPA (or softmax when its weights
                                           are used) -> out-projection, outputs equal to 1e-6

Everything a pass carries from one of its layers to the next is a dataclass of its own,
:meth:`pass_state`; what every pass may read is the :class:`TokenState`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import operator
from typing import Callable, TypeVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from tokenopt.analysis import AttentionCore, BlockRecord, ModelAnalysis, Site, is_matmul, is_softmax
from tokenopt.analysis import nodes as analysis_nodes
from tokenopt.errors import PlanError
from tokenopt.ops import attention as attn_ops
from tokenopt.ops import packing as packing_ops
from tokenopt.ops import tome as tome_ops
from tokenopt.ops import windows as window_ops
from tokenopt.rewrite.learned import LearnedKind, check_trained
from tokenopt.rewrite.state import TokenState
from tokenopt.tokens import Packed

S = TypeVar("S")
_SDPA_KWARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class GraphRewriter:
    def __init__(self, analysis: ModelAnalysis, track_index: bool = False):
        self.analysis = analysis
        # a copy of the analysed graph (the same node names, shapes and parameters): the analysis
        # keeps describing the original, whatever this rewrite does
        self.gm = _copy_of(analysis.graph)
        self.graph = self.gm.graph
        self.state = TokenState()
        self.track_index = track_index
        self.inserted: dict[str, str] = {}   # node name -> short description, for reports and graphs
        # inserted nodes that are a pass's own cost rather than the block's work (ToSA's selector
        # path): node name -> the block they serve, so reports can show what a selection costs
        self.overhead: dict[str, Site] = {}
        # block index -> the node holding its (B,) tokens per image, where the count varies by image
        self.token_counts: dict[Site, str] = {}
        self._pass_state: dict[type, object] = {}
        self._by_name = {n.name: n for n in self.graph.nodes}
        # the attention core of each block as rewritten so far (block index -> record): the analysis's
        # records stay as the analysis made them, this map holds what the rewrite changed
        self._cores: dict[int, AttentionCore] = {}
        # the token state as each block began (block input node name -> state): a bracket that
        # closes after its region was rewritten restores the state its region started from
        self._state_at: dict[str, TokenState] = {}

    # ---------------------------------------------------------------- state
    def pass_state(self, kind: type[S]) -> S:
        """The one instance of a pass's own bookkeeping dataclass ``kind`` for this rewrite
        (created on first use): what a pass carries from one of its layers to the next."""
        if kind not in self._pass_state:
            self._pass_state[kind] = kind()
        return self._pass_state[kind]

    def core(self, block: BlockRecord) -> AttentionCore:
        """``block``'s attention core as the rewrite has left it so far (the analysis's own record
        until a primitive changes it: a bias on explicit logits, a replaced or decomposed core)."""
        return self._cores.get(block.index, block.attention)

    def _set_core(self, block: BlockRecord, core: AttentionCore) -> None:
        self._cores[block.index] = core

    def record_token_count(self, block: BlockRecord, counts: fx.Node) -> None:
        """``counts`` holds the (B,) tokens per image after ``block``; the report measures it."""
        self.token_counts[block.site()] = counts.name

    # ---------------------------------------------------------------- lookup and insertion
    def node(self, name: str) -> fx.Node:
        return self._by_name[name]

    def _track(self, new: fx.Node, anchor: fx.Node, label: str | None) -> fx.Node:
        new.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack", {}))
        self._by_name[new.name] = new
        if label is not None:
            self.inserted[new.name] = label
        return new

    def insert_after(self, anchor: fx.Node, fn, *args, label: str = "", **kwargs) -> fx.Node:
        """A new node computing ``fn(*args, **kwargs)``, placed right after ``anchor``."""
        with self.graph.inserting_after(anchor):
            new = self.graph.call_function(fn, args=args, kwargs=kwargs)
        return self._track(new, anchor, label or fn.__name__)

    def insert_before(self, anchor: fx.Node, fn, *args, label: str = "", **kwargs) -> fx.Node:
        """A new node computing ``fn(*args, **kwargs)``, placed right before ``anchor``."""
        with self.graph.inserting_before(anchor):
            new = self.graph.call_function(fn, args=args, kwargs=kwargs)
        return self._track(new, anchor, label or fn.__name__)

    def getitem(self, node: fx.Node, i: int, label: str = "") -> fx.Node:
        return self.insert_after(node, operator.getitem, node, i, label=label or f"{node.name}[{i}]")

    def get_attr(self, target: str) -> fx.Node:
        """A node reading the parameter, buffer or submodule ``target`` (placed at the top)."""
        first = next(n for n in self.graph.nodes if n.op != "placeholder")
        with self.graph.inserting_before(first):
            n = self.graph.get_attr(target)
        self._by_name[n.name] = n
        return n

    def add_module(self, name: str, module: nn.Module) -> str:
        """Register a new (e.g. trained) submodule; it becomes part of state_dict."""
        self.gm.add_submodule(name, module)
        return name

    def add_learned(self, block: BlockRecord, kind: LearnedKind, module: nn.Module, *args, label: str = "") -> fx.Node:
        """Insert ``module``, a learned part of ``kind`` serving ``block``, called on ``args`` right
        after ``args[0]``: registered as ``{kind.prefix}.{block.index}`` (so it is in the state_dict
        and artifacts), its call counted as the block's overhead, and the model checking once per
        forward that its learned parts were trained (:func:`tokenopt.rewrite.learned.check_trained`)."""
        name = self.add_module(kind.name(block.index), module)
        call = self.call_module_after(args[0], name, *args, label=label or name)
        self.mark_overhead(block, call)
        if check_trained not in self.gm._forward_pre_hooks.values():
            self.gm.register_forward_pre_hook(check_trained)
        return call

    def mark_overhead(self, block: BlockRecord, *nodes: fx.Node) -> None:
        """``nodes`` are a pass's own cost of serving ``block`` (choosing tokens), not the block's work:
        reports show them apart."""
        self.overhead.update(dict.fromkeys((n.name for n in nodes), block.site()))

    def call_module_after(self, anchor: fx.Node, target: str, *args, label: str = "") -> fx.Node:
        """Insert a call of the submodule ``target`` (see :meth:`add_module`) after ``anchor``."""
        with self.graph.inserting_after(anchor):
            new = self.graph.call_module(target, args=args)
        return self._track(new, anchor, label or target)

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

    def region(self, start: fx.Node, end: fx.Node) -> set[fx.Node]:
        """The nodes ``end`` is computed from, back to (not including) ``start``, plus ``end``:
        e.g. a block's body from its input to its output."""
        return analysis_nodes.region(start, end)

    def reroute(self, old: fx.Node, new: fx.Node, region: set[fx.Node]) -> int:
        """Make the consumers of ``old`` inside ``region`` read ``new`` instead; those outside keep
        ``old``. Returns how many consumers moved (0 means the region never read ``old``)."""
        moved = 0
        for u in list(old.users):
            if u in region and u is not new:
                u.replace_input_with(old, new)
                moved += 1
        return moved

    # ---------------------------------------------------------------- attention
    def begin_block(self, block: BlockRecord) -> None:
        """Before ``block`` is rewritten: carry out every obligation the token state holds (a key
        bias after merges, attention isolated per image on a packed stream ...), whichever pass
        recorded it (:mod:`tokenopt.rewrite.state`)."""
        self._state_at.setdefault(block.input, self.state.copy())
        for obligation in list(self.state.obligations.values()):
            obligation.apply(self, block)

    # ---------------------------------------------------------------- regions
    def bracket(self, start: fx.Node, end: fx.Node, enter: Callable | None = None,
                exit: Callable | None = None, blocks: tuple[BlockRecord, ...] = ()) -> fx.Node | None:
        """Reduce on entry to a region, run the region on the reduced tokens, restore on exit::

            before                          after
            y = region(start)               s = enter(start)          # e.g. gather / pack / merge
                                            y' = region(s)            # the region reads s, not start
                                            y = exit(start, y')       # e.g. restore / unpack / unmerge

        The region is every node ``end`` is computed from, back to ``start``. ``enter(start)``
        inserts nodes through this rewriter and returns the one the region reads instead of
        ``start`` (None: the region already reads what it should). It runs on a copy of the token
        state, scoped to the region: what it records there (a packed layout, an obligation such as
        attention isolated per image) is carried out on the attention of every block in ``blocks``
        (those inside the region) and leaks nowhere else. ``exit(start, end_inner)`` returns
        ``(fn, args, label)``: ``end`` then computes ``fn(*args, end_inner)``, keeping its name and
        users. After the bracket the token state is the one the region started from (recorded
        when a block began at ``start``), or the one before ``enter`` ran. Returns ``enter``'s node.
        """
        body = self.region(start, end)                     # the region's own nodes, before insertion
        outer = self._state_at.get(start.name, self.state).copy()
        self.state = self.state.copy()
        inner = enter(start) if enter is not None else None
        if inner is not None:
            self.reroute(start, inner, body)
        added = [ob for key, ob in self.state.obligations.items() if outer.obligations.get(key) is not ob]
        for block in blocks:
            for obligation in added:
                obligation.apply(self, block)
        if exit is not None:
            fn, args, label = exit(start, end)
            self.wrap(end, fn, *args, label=label)
        self.state = outer
        return inner

    def window_bracket(self, block: BlockRecord, enter: Callable, exit: Callable) -> fx.Node | None:
        """:meth:`bracket` around ``block``'s windowed attention (analysis.windows.WindowRecord): reduce
        the window tokens (B*nW, N, C) right after the partition, restore them before the reverse::

            w = partition(shift(norm(x)))            w = partition(shift(norm(x)))
            y = proj(attn(w))                        s = enter(w)            # (B*nW, n, C), n <= N
            x = x + unshift(reverse(y))              y = exit(w, proj(attn'(s)))   # (B*nW, N, C) again

        The window count per image never changes, so the reverse, the shift back and the stream
        between blocks keep every token. The attention inside must be given the kept tokens'
        positions (:meth:`attend_in_windows`)."""
        w = block.window
        if w is None:
            raise PlanError(f"{block.path}: its attention does not run in windows")
        return self.bracket(self.node(w.entry), self.node(w.exit), enter=enter, exit=exit, blocks=(block,))

    def attend_in_windows(self, block: BlockRecord, pos: fx.Node | None, size: fx.Node | None = None,
                          valid: fx.Node | None = None, bias: fx.Node | None = None) -> fx.Node:
        """``block``'s windowed attention runs on the kept tokens of each window: ``pos`` (B*nW, n) holds
        each kept token's true position in its window; the core becomes
        :func:`ops.windows.window_attention`, whose logits get the relative position bias (and shift
        mask) gathered at those positions, plus log(``size``) per key when ``size`` (B*nW, n, 1) is given;
        keys where ``valid`` (B*nW, n) is False (padding of a window that keeps fewer) are masked out.
        With ``bias`` (rows, heads, n, n) given (and ``pos`` None) the rows carry their own bias instead
        (SPA's containers: tokens grouped across windows).
        The model's own logit terms become one dense (rows, heads, N, N) node. Returns the core node."""
        core, w = self.core(block), block.window
        c = self.node(core.node)
        anchor = c if core.kind == "sdpa" else self.node(core.output)
        if bias is None and w.terms:
            bias = self.insert_before(anchor, window_ops.dense_window_bias, w.area, *(self.node(t) for t in w.terms),
                                      label=f"{block.path}: window bias (rows, heads, N, N)")
        scale = _sdpa_arg(c, "scale", 6) if core.kind == "sdpa" else self._window_logit_scale(block)
        q, k, v = self.attention_qkv(block)
        extra = dict(scale=scale, bias=bias, pos=pos, size=size, valid=valid)
        label = "attention on the kept tokens of each window"
        if core.kind == "sdpa":
            c.target, c.args, c.kwargs = window_ops.window_attention, (q, k, v), extra
            new = c
        else:
            new = self.insert_before(anchor, window_ops.window_attention, q, k, v, **extra, label=label)
            self.replace_uses(anchor, new)
        self.inserted[new.name] = label
        self._set_core(block, dataclasses.replace(core, kind="sdpa", node=new.name, output=new.name, logits=None))
        return new

    def _window_logit_scale(self, block: BlockRecord) -> float:
        """The constant factor between q @ k^T and the softmax of an explicit windowed attention, read
        along the chain from q (its terms' adds and the views that fold windows are passed over)."""
        core = self.core(block)
        q = self.node(core.q)
        factor, n = 1.0, self.node(core.logits)
        while not is_matmul(n):
            tensors = [a for a in n.all_input_nodes if _is_tensor(a)]
            from_q = [a for a in tensors if _computed_from(a, q)]
            numbers = [a for a in n.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
            if n.target in (operator.mul, torch.mul, "mul") and len(numbers) == 1:
                factor *= float(numbers[0])
            elif n.target in (operator.truediv, torch.div, "div") and len(numbers) == 1 and n.args[1] == numbers[0]:
                factor /= float(numbers[0])
            if len(from_q) != 1:
                raise PlanError(f"{block.path}: cannot follow its attention logits back to q @ k^T")
            n = from_q[0]
        return factor

    def add_attention_bias(self, block: BlockRecord, fn: Callable, *args, label: str = "") -> fx.Node:
        """Add ``fn(*args)``, a (B, N) bias per key, to the logits of ``block``'s attention.

        sdpa: merged into ``attn_mask`` (float, broadcast over heads and queries; a boolean mask
        of the model's is kept); softmax: added to the logits before the softmax; mha: merged
        into ``key_padding_mask``. Returns the node computing the bias.
        """
        core = self.core(block)
        c = self.node(core.node)
        label = label or f"attention bias {fn.__name__}"
        if core.kind == "sdpa":
            bias = self.insert_before(c, fn, *args, label=label)
            existing = _sdpa_arg(c, "attn_mask", 3)
            mask = self.insert_before(c, attn_ops.sdpa_mask_with_key_bias, bias, self.node(core.q), existing,
                                      label=f"{label}: attn_mask")
            _set_sdpa_arg(c, "attn_mask", 3, mask)
        elif core.kind == "softmax":
            logits = self.node(core.logits)
            bias = self.insert_after(logits, fn, *args, label=label)
            biased = self.insert_after(bias, attn_ops.logits_with_key_bias, logits, bias, label=f"{label}: logits")
            self.replace_uses(logits, biased, keep=(bias,))
            self._set_core(block, dataclasses.replace(core, logits=biased.name))
        elif core.kind == "mha":
            bias = self.insert_before(c, fn, *args, label=label)
            existing = c.kwargs.get("key_padding_mask", c.args[3] if len(c.args) > 3 else None)
            mask = self.insert_before(c, attn_ops.mha_padding_with_key_bias, bias, existing,
                                      label=f"{label}: key_padding_mask")
            if len(c.args) > 3:
                c.args = (*c.args[:3], mask, *c.args[4:])
            else:
                c.kwargs = {**c.kwargs, "key_padding_mask": mask}
        else:
            raise PlanError(f"{block.path}: no attention bias for attention of kind {core.kind!r}")
        return bias

    def attention_qkv(self, block: BlockRecord) -> tuple[fx.Node, fx.Node, fx.Node | None]:
        """The query, key and value nodes of ``block``'s attention (an MHA is decomposed first).

        Layouts are the model's own: (B, H, N, d) or (B*H, N, d); v may be None for an explicit
        chain whose value operand the analysis did not name.
        """
        if self.core(block).kind == "mha":
            self.decompose_mha(block)
        core = self.core(block)
        v = getattr(core, "v", None)
        return self.node(core.q), self.node(core.k), self.node(v) if v else None

    def attention_scale(self, block: BlockRecord) -> float | fx.Node | None:
        """The factor on q @ k^T: SDPA's ``scale`` (None: 1/sqrt(d)); for an explicit chain, the
        factors multiplied (or divided) between the product and the softmax, 1.0 if none. A factor
        the model computes from shapes (``c ** -0.5`` with c from ``x.shape``) is a graph node; then
        the result is a node too (its value, a number, exists when the model runs)."""
        core = self.core(block)
        if core.kind == "mha":
            self.decompose_mha(block)
            core = self.core(block)
        c = self.node(core.node)
        if core.kind == "sdpa":
            return _sdpa_arg(c, "scale", 6)
        factors: list = []            # (value, exponent): value a number or a scalar node
        n = self.node(core.logits)
        while not is_matmul(n):
            tensors = [a for a in n.all_input_nodes if _is_tensor(a)]
            scalars = [a for a in n.args if a not in tensors and _is_scalar(a)]
            if len(tensors) != 1:
                raise PlanError(f"{block.path}: its attention logits pass through {n.target} between q @ k^T and "
                                "the softmax; tokenopt can only read a constant scale there.")
            if n.target in (operator.mul, torch.mul, "mul") and len(scalars) == 1:
                factors.append((scalars[0], 1))
            elif n.target in (operator.truediv, torch.div, "div") and len(scalars) == 1 and n.args[1] is scalars[0]:
                factors.append((scalars[0], -1))
            elif n.target not in ("transpose", "permute", "contiguous", "float", "to", "type_as"):
                raise PlanError(f"{block.path}: its attention logits pass through {n.target} between q @ k^T and "
                                "the softmax; tokenopt can only read a constant scale there.")
            n = tensors[0]
        if all(not isinstance(f, fx.Node) for f, _ in factors):
            return math.prod(float(f) ** e for f, e in factors)
        return self.insert_before(self.node(core.logits), _scale_product, [f for f, _ in factors],
                                  [e for _, e in factors], label=f"{block.path} attention scale")

    def replace_attention(self, block: BlockRecord, fn: Callable, label: str = "", **extra) -> fx.Node:
        """The attention core of ``block`` becomes ``fn(q, k, v, attn_mask=, scale=, ..., **extra)``.

        ``fn`` takes SDPA's arguments and returns what the core returned: (B, H, N, d) or
        (B*H, N, d) like q. sdpa: the call itself is retargeted (its keyword arguments kept);
        softmax: the product with v is, and the logits/softmax chain goes if nothing else reads
        it; mha: decomposed first. Returns the new core node.
        """
        q, k, v = self.attention_qkv(block)
        core = self.core(block)
        if v is None:
            raise PlanError(f"{block.path}: cannot find the values of its attention (softmax(...) @ v)")
        if core.kind == "sdpa":
            c = self.node(core.node)
            kwargs = {name: _sdpa_arg(c, name, i) for i, name in enumerate(_SDPA_KWARGS, start=3)}
            kwargs = {n: a for n, a in kwargs.items() if a is not None}
            c.target, c.args, c.kwargs = fn, (q, k, v), {**kwargs, **extra}
            new = c
        else:
            out = self.node(core.output)
            new = self.insert_before(out, fn, q, k, v, attn_mask=None, scale=self.attention_scale(block), **extra,
                                     label=label or fn.__name__)
            self.replace_uses(out, new)
        self.inserted[new.name] = label or fn.__name__
        self._set_core(block, dataclasses.replace(core, kind="sdpa", node=new.name, output=new.name, logits=None))
        return new

    def isolate_attention(self, block: BlockRecord, lengths: fx.Node, layout: Packed) -> fx.Node:
        """``block``'s attention runs over a packed batch, each token attending only to tokens of
        its own image: the core becomes :func:`ops.packing.isolated_attention` with ``lengths``
        (the (B,) node of tokens per image) and the layout's capacity, layout and strategy. A core
        isolated already (an earlier layout) gets the new lengths. Returns the core node."""
        options = dict(lengths=lengths, capacity=layout.capacity, layout=layout.layout, strategy=layout.strategy)
        if self.core(block).kind == "sdpa":
            c = self.node(self.core(block).node)
            if c.target is packing_ops.isolated_attention:
                c.kwargs = {**c.kwargs, **options}
                return c
            existing = _sdpa_arg(c, "attn_mask", 3)
            if existing is not None or _sdpa_arg(c, "is_causal", 5):
                raise PlanError(f"{block.path}: its attention has a mask of its own; packed attention over "
                                "per-image token sets cannot keep it. Leave this block out of the rule's layers.")
        return self.replace_attention(block, packing_ops.isolated_attention, label="attention isolated per image",
                                      **options)

    def decompose_mha(self, block: BlockRecord) -> None:
        """Write ``block``'s ``nn.MultiheadAttention`` out as graph nodes, so its q, k, v cost nothing extra::

            q, k, v = mha_in_projection(x, in_proj_weight, in_proj_bias, heads)
            a = scaled_dot_product_attention(q, k, v, attn_mask=mha_float_mask(...), dropout_p=...)
            out = linear(merge_heads(a), out_proj.weight, out_proj.bias)        # (B, N, C)

        When the call's attention weights are read (``need_weights`` and ``[1]`` used), the core is
        an explicit softmax instead, and the weights come from it, averaged over heads as asked.
        The analysis refuses batch_first=False and cross-attention before this is reached.
        """
        core = self.core(block)
        if core.kind != "mha":
            return
        c = self.node(core.node)
        mod = self.gm.get_submodule(core.module)
        if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
            raise PlanError(f"{block.path}: nn.MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn "
                            "cannot be written out; leave this block out of the rule's layers.")
        call = _mha_call(c)
        x = call["query"]
        weights_used = any(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 1
                           for u in c.users) and call["need_weights"]
        w = self.get_attr(f"{core.module}.in_proj_weight")
        b = self.get_attr(f"{core.module}.in_proj_bias") if mod.in_proj_bias is not None else None
        module = self.get_attr(core.module)
        label = f"{core.module} written out"
        qkv = self.insert_before(c, attn_ops.mha_in_projection, x, w, b, mod.num_heads, label=f"{label}: in-projection")
        q, k, v = (self.insert_before(c, operator.getitem, qkv, i, label=f"{label}: {n}") for i, n in enumerate("qkv"))
        mask = self.insert_before(c, attn_ops.mha_float_mask, q, call["key_padding_mask"], call["attn_mask"],
                                  label=f"{label}: masks")
        drop = self.insert_before(c, attn_ops.attention_dropout, module, label=f"{label}: dropout p")
        weights = None
        if weights_used:
            kt = self.insert_before(c, torch.transpose, k, -2, -1, label=f"{label}: k^T")
            prod = self.insert_before(c, operator.matmul, q, kt, label=f"{label}: q @ k^T")
            logits = self.insert_before(c, operator.mul, prod, (mod.head_dim ** -0.5), label=f"{label}: scale")
            masked = self.insert_before(c, _add_optional, logits, mask, label=f"{label}: + mask")
            p = self.insert_before(c, torch.softmax, masked, -1, label=f"{label}: softmax")
            pd = self.insert_before(c, F.dropout, p, drop, label=f"{label}: dropout")
            a = self.insert_before(c, operator.matmul, pd, v, label=f"{label}: @ v")
            weights = self.insert_before(c, attn_ops.head_weights, p, call["average_attn_weights"],
                                         label=f"{label}: weights")
            new_core = AttentionCore("softmax", p.name, q=q.name, k=k.name, logits=masked.name,
                                     heads=mod.num_heads, module=core.module)
            new_core = _with_value(new_core, v.name, a.name)
        else:
            a = self.insert_before(c, F.scaled_dot_product_attention, q, k, v, attn_mask=mask, dropout_p=drop,
                                   label=f"{label}: attention")
            new_core = _with_value(AttentionCore("sdpa", a.name, q=q.name, k=k.name, heads=mod.num_heads,
                                                 module=core.module), v.name, a.name)
        merged = self.insert_before(c, attn_ops.merge_heads, a, label=f"{label}: merge heads")
        ow, ob = self.get_attr(f"{core.module}.out_proj.weight"), (
            self.get_attr(f"{core.module}.out_proj.bias") if mod.out_proj.bias is not None else None)
        out = self.insert_before(c, F.linear, merged, ow, ob, label=f"{label}: out-projection")
        result = self.insert_before(c, attn_ops.with_weights, out, weights, label=f"{label}: (output, weights)")
        self.replace_uses(c, result)
        self.graph.erase_node(c)
        del self._by_name[c.name]
        self._set_core(block, new_core)

    def set_output(self, node: fx.Node) -> None:
        """Make the graph return ``node``.

        A graph captured by torch.export rebuilds the model's output structure (a Hugging Face
        ``ModelOutput``) from the values it returns; that structure does not describe ``node``, so
        the graph then returns ``node`` itself (its inputs are taken as before).
        """
        out = next(n for n in self.graph.nodes if n.op == "output")
        out.args = (node,)
        if isinstance(self.graph._codegen, fx.graph._PyTreeCodeGen):
            self.graph._codegen = fx.graph.CodeGen()

    # ---------------------------------------------------------------- end
    def finish(self) -> fx.GraphModule:
        self.graph.eliminate_dead_code()
        self.graph.lint()
        self.gm.recompile()
        return self.gm


def _copy_of(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph: node names and meta (shapes) kept, the code
    generator kept (an exported graph's pytree inputs and outputs), parameters and submodules shared."""
    graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    new.meta = dict(getattr(gm, "meta", {}))
    new.train(gm.training)
    return new


def _with_value(core: AttentionCore, v: str, output: str) -> AttentionCore:
    """``core`` with its value and output nodes named (fields the analysis records, when it has them)."""
    names = {f.name for f in dataclasses.fields(core)}
    return dataclasses.replace(core, **{k: val for k, val in (("v", v), ("output", output)) if k in names})


def _computed_from(a: fx.Node, q: fx.Node) -> bool:
    """True when ``a`` is ``q`` or computed from it."""
    seen, todo = {a}, [a]
    while todo:
        n = todo.pop()
        if n is q:
            return True
        for m in n.all_input_nodes:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return False


def _is_tensor(a) -> bool:
    """A node holding a tensor (the analysis recorded its shape) or a parameter."""
    return isinstance(a, fx.Node) and (a.op == "get_attr" or "tensor_meta" in a.meta)


def _is_scalar(a) -> bool:
    """A Python number, or a node computing one from shapes (no tensor behind it)."""
    if isinstance(a, bool):
        return False
    return isinstance(a, (int, float)) or (isinstance(a, fx.Node) and not _is_tensor(a))


def _scale_product(values: list, exponents: list) -> float:
    """The product of scale factors computed at run time: prod(v ** e)."""
    return math.prod(float(v) ** e for v, e in zip(values, exponents))


def _add_optional(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return x if y is None else x + y


def _sdpa_arg(c: fx.Node, name: str, position: int):
    return c.kwargs.get(name, c.args[position] if len(c.args) > position else None)


def _set_sdpa_arg(c: fx.Node, name: str, position: int, value) -> None:
    if len(c.args) > position:
        c.args = (*c.args[:position], value, *c.args[position + 1:])
    else:
        c.kwargs = {**c.kwargs, name: value}


_MHA_PARAMS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
               "is_causal")
_MHA_DEFAULTS = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True,
                 "is_causal": False}


def _mha_call(c: fx.Node) -> dict:
    """The arguments of an ``nn.MultiheadAttention`` call node by name, defaults filled in."""
    call = dict(_MHA_DEFAULTS)
    call.update(zip(_MHA_PARAMS, c.args))
    call.update(c.kwargs)
    if call.get("is_causal"):
        raise PlanError("nn.MultiheadAttention called with is_causal=True is not a vision block tokenopt rewrites")
    return call
