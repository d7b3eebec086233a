"""Windows: a windowed attention block (Swin) read from its partition, shift, reverse and logit terms.

    x (B, H, W, C) or (B, HW, C)
      norm ─ [roll -s] ─ [pad] ─ view (B, H/wh, wh, W/ww, ww, C) ─ permute ─ view (B*nW, wh, ww, C)
           ─ view (B*nW, N, C)   = entry       the window's tokens, N = wh * ww
           ─ qkv ─ q @ k^T + bias[index] (+ shift mask) ─ softmax ─ @ v ─ proj   = exit (B*nW, N, C)
           ─ view (B*nW, wh, ww, C) ─ window reverse ─ [roll +s] ─ + x

Everything is read off shapes (both capture front ends record them) and off the nodes between the
block input and the attention, never off module names: the partition is the 4-D (B*nW, wh, ww, C)
tensor the entry is a view of; the 6-D view before it gives the (padded) grid; a ``roll`` before
it gives the shift; the additive terms on the logits (SDPA's ``attn_mask`` or the adds between
``q @ k^T`` and the softmax) are the relative position bias, told apart by the table it gathers
from, and the shift mask. A block whose attention is windowed but whose pattern is not all found
gets no record and stays refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from tokenopt.analysis.index import GraphIndex
from tokenopt.analysis.nodes import is_add, is_matmul, shape_of
from tokenopt.analysis.records import BlockRecord

_TABLE_NAMES = ("relative_position_bias_table",)


@dataclass(frozen=True)
class WindowRecord:
    """How one block partitions its tokens into windows.

    size: (wh, ww) of a window; shift: the cyclic shift (rows, columns) before the partition,
    (0, 0) for none; grid: (H, W) the block's tokens form; padded: (H', W') after padding to a
    multiple of the window (== grid when the grid tiles); windows: windows per image.
    entry / exit: the window tokens (B*nW, N, C) the attention reads, and its output before the
    reverse: the region a reduction inside windows brackets.
    terms: the additive terms on the logits, each broadcasting to (B*nW, heads, N, N) once its
    leading axes are folded into one (1, nW or B*nW rows); relative_bias: those that gather the
    relative position bias table (the others are the shift mask); table: that table's node.
    """

    size: tuple[int, int]
    shift: tuple[int, int]
    grid: tuple[int, int]
    padded: tuple[int, int]
    windows: int
    entry: str
    exit: str
    terms: tuple[str, ...] = ()
    relative_bias: tuple[str, ...] = ()
    table: str | None = None

    @property
    def area(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def tiles(self) -> bool:
        """True when the grid is a whole number of windows (no padding)."""
        return self.grid == self.padded

    def describe(self) -> str:
        grid = "x".join(map(str, self.grid))
        shift = f", shift {self.shift[0]}x{self.shift[1]}" if any(self.shift) else ""
        pad = "" if self.tiles else f", padded to {'x'.join(map(str, self.padded))}"
        return f"windows {self.size[0]}x{self.size[1]} ({self.windows} per image) on {grid}{shift}{pad}"


def find_window(b: BlockRecord, index: GraphIndex) -> WindowRecord | None:
    """The window record of ``b``, or None when its attention is not windowed (or not as above)."""
    core = b.attention
    if core.kind == "mha" or core.q is None or core.output is None:
        return None
    x_in = index.node(b.input)
    batch = (shape_of(x_in) or (0,))[0]
    q = index.node(core.q)
    sq = shape_of(q)
    # one window per image (a grid no larger than the window, Swin-T's last stage) is a partition too
    if not batch or sq is None or len(sq) < 3 or sq[0] % batch:
        return None
    rows, n = sq[0], sq[-2]
    inside = index.descendants(x_in)
    entry = _entry(q, rows, n, inside, index)
    if entry is None:
        return None
    part = entry.all_input_nodes[0]
    grid6 = _six_d_view(part, batch, inside)
    if grid6 is None:
        return None
    _, nh, wh, nw, ww, _ = grid6
    exit_ = _exit(index.node(core.output), rows, n, wh, ww)
    if exit_ is None:
        return None
    padded = (nh * wh, nw * ww)
    grid = _grid(x_in, b.tokens, padded)
    shift = _shift(x_in, part, index, inside)
    terms = _logit_terms(b, index, inside)
    if terms is None:
        return None
    table = _table(terms, index)
    rel = tuple(t for t in terms if table is not None and index.node(table) in index.ancestors(t))
    return WindowRecord((wh, ww), shift, grid, padded, nh * nw, entry.name, exit_.name, terms, rel, table)


def _entry(q: fx.Node, rows: int, n: int, inside, index: GraphIndex) -> fx.Node | None:
    """The (B*nW, N, C) view of a (B*nW, wh, ww, C) partition that q is computed from."""
    for a in sorted(index.ancestors(q) & inside, key=index.position, reverse=True):
        s = shape_of(a)
        if s is None or len(s) != 3 or s[:2] != (rows, n) or len(a.all_input_nodes) < 1:
            continue
        p = shape_of(a.all_input_nodes[0])
        if p is not None and len(p) == 4 and p[0] == rows and p[1] * p[2] == n and p[3] == s[2]:
            return a
    return None


def _six_d_view(part: fx.Node, batch: int, inside) -> tuple | None:
    """(B, H/wh, wh, W/ww, ww, C) of the partition: the first of the 6-D tensors behind it (the view
    that splits the grid, before the permute that gathers each window's rows)."""
    n, steps, found = part, 0, None
    while n is not None and steps < 8:
        s = shape_of(n)
        if s is not None and len(s) == 6 and s[0] == batch:
            found = s
        elif found is not None:
            break
        n = next((a for a in n.all_input_nodes if a in inside and shape_of(a) is not None), None)
        steps += 1
    return found


def _exit(out: fx.Node, rows: int, n: int, wh: int, ww: int) -> fx.Node | None:
    """The last (B*nW, N, C) node after the attention, before it is viewed as windows again."""
    last, cur, steps = None, out, 0
    while cur is not None and steps < 12:
        s = shape_of(cur)
        if s is not None and len(s) == 4 and s[:3] == (rows, wh, ww):
            return last
        if s is not None and len(s) == 3 and s[:2] == (rows, n):
            last = cur
        users = [u for u in cur.users if shape_of(u) is not None]
        cur = users[0] if len(users) == 1 else None
        steps += 1
    return None


def _grid(x_in: fx.Node, tokens: int, padded: tuple[int, int]) -> tuple[int, int]:
    s = shape_of(x_in)
    if s is not None and len(s) == 4:
        return s[1], s[2]
    # a (B, HW, C) stream (Hugging Face) is viewed as (B, H, W, C): H from the padded rows when it tiles
    h, w = padded
    if h * w == tokens:
        return padded
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else padded


def _shift(x_in: fx.Node, part: fx.Node, index: GraphIndex, inside) -> tuple[int, int]:
    """The cyclic shift before the partition: minus a ``roll``'s shifts over dims (1, 2)."""
    for n in index.ancestors(part) & (inside | {x_in}):
        if n.op in ("call_function", "call_method") and getattr(n.target, "__name__", n.target) in ("roll", "roll.default"):
            shifts = n.kwargs.get("shifts", n.args[1] if len(n.args) > 1 else None)
            if isinstance(shifts, int):
                shifts = (shifts, shifts)
            if isinstance(shifts, (tuple, list)) and len(shifts) == 2 and all(isinstance(v, int) for v in shifts):
                return (-shifts[0], -shifts[1])
    return (0, 0)


def _logit_terms(b: BlockRecord, index: GraphIndex, inside) -> tuple[str, ...] | None:
    """The tensors added to the attention logits that are not computed from the tokens: SDPA's
    ``attn_mask`` split at its adds, or the constant operands of the adds between q @ k^T and the
    softmax. None when a term is computed from the tokens: no window record then (the block stays
    refused), since a reduction inside the windows would change what that term reads."""
    core = b.attention
    if core.kind == "sdpa":
        c = index.node(core.node)
        mask = c.kwargs.get("attn_mask", c.args[3] if len(c.args) > 3 else None)
        if not isinstance(mask, fx.Node):
            return ()
        parts = _split_adds(mask, inside)
        # a term computed from the tokens (SAM's decomposed relative position, from q) is not a fixed table
        x_in = index.node(b.input)     # (a size read off the tokens, Hugging Face's batch for the mask, is fine)
        return None if any(x_in in index.data_ancestors(t) for t in parts) else tuple(t.name for t in parts)
    terms, cur, steps = [], index.node(core.logits), 0
    while cur is not None and not is_matmul(cur) and steps < 12:
        tensors = [a for a in cur.all_input_nodes if shape_of(a) is not None or a.op == "get_attr"]
        from_tokens = [a for a in tensors if a in inside]
        if is_add(cur):
            if sum(index.node(b.input) in index.data_ancestors(a) for a in from_tokens) > 1:
                return None     # a term computed from the tokens (SAM's decomposed relative position)
            terms += [a for a in tensors if a not in inside]
        cur = from_tokens[0] if from_tokens else None
        steps += 1
    return tuple(t.name for t in reversed(terms))


def _split_adds(n: fx.Node, inside) -> list[fx.Node]:
    if is_add(n) and all(isinstance(a, fx.Node) for a in n.args[:2]):
        return [t for a in n.args[:2] for t in _split_adds(a, inside)]
    return [n]


def _table(terms: tuple[str, ...], index: GraphIndex) -> str | None:
    for t in terms:
        for a in index.ancestors(t) | {index.node(t)}:
            if a.op == "get_attr" and any(name in str(a.target) for name in _TABLE_NAMES):
                return a.name
    return None
