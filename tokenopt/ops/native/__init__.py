"""A native (C) ToMe/ToFu step for CPU inference: one call instead of ~35 small operators.

Why: a ToMe step written with PyTorch operators pays each operator's fixed cost (dispatcher,
thread pool); at batch 1 those costs eat a good part of what the merge saves. One C call
(tome_merge.c) does the matching and the merge (ToMe's size-weighted average, or ToFu's prune or
MLERP) on float32 buffers.

Where it runs (:func:`usable`): CPU float32 tensors when no autograd is needed, the native step
is enabled and built. In eager mode it is called directly (no operator dispatch); inside
``torch.compile`` it is the custom operator ``tokenopt::bipartite_reduce``, which the compiled graph
calls like any aten kernel. Calls under a dispatch mode (FLOP counters, fake tensors), under
``torch.jit`` tracing, with autograd, on GPUs or in other dtypes take the PyTorch path in
:mod:`tokenopt.ops.matching`, which defines the results; tests hold the two equal.

Built on first use (build.py); no compiler, or a failed build, means the PyTorch path.
``TOKENOPT_NATIVE=0`` forces it; :func:`status` says which path is active and why.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from tokenopt.ops.native.build import load

_fn = None                      # the ctypes function once loaded
_status: str | None = None      # None until the first load attempt
_available = False              # a plain bool: torch.compile guards on it
_enabled = True


#: The graph ops that may call the native step (ops/tome.py adds its reductions): a graph calling
#: one of them wants the step built before it runs or compiles (:func:`needed_by`).
CALLERS: set = set()


def needed_by(gm) -> bool:
    """Whether the fx GraphModule ``gm`` calls an op that may take the native step."""
    return any(n.op == "call_function" and n.target in CALLERS for n in gm.graph.nodes)


def prepare() -> str:
    """Build/load the native step now (optimize() does, so compiled graphs can use it)."""
    global _fn, _status, _available
    if _status is None:
        _fn, _status = load()
        _available = _fn is not None
    return _status


def status() -> str:
    """'on: <library>' or 'off: <why>' (builds on first call)."""
    return prepare()


def set_enabled(flag: bool) -> bool:
    """Allow (True) or forbid (False) the native step in this process; returns the previous value."""
    global _enabled
    before, _enabled = _enabled, bool(flag)
    return before


@contextlib.contextmanager
def disabled():
    """Within this block every ToMe/ToFu step takes the PyTorch path (tests, A/B timing)."""
    before = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)


def _dispatch_modes_active() -> bool:
    try:
        return torch._C._len_torch_dispatch_stack() > 0
    except AttributeError:   # a torch without the helper: be safe, use PyTorch
        return True


def _right_kind(floats: list[Tensor], index: Tensor | None) -> bool:
    tensors = floats + ([index] if index is not None else [])
    if any(t.device.type != "cpu" for t in tensors):
        return False
    if any(t.dtype != torch.float32 for t in floats) or (index is not None and index.dtype != torch.int64):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in floats))


def usable(x: Tensor, metric: Tensor, size: Tensor | None, index: Tensor | None) -> bool:
    """Whether this call can take the native step (see the module docstring)."""
    floats = [x, metric] + ([size] if size is not None else [])
    if torch.compiler.is_compiling():
        # decided while tracing, from what dynamo guards on; never builds inside a trace
        return _enabled and _available and _right_kind(floats, index)
    if not _enabled or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if any(type(t) is not torch.Tensor for t in floats + ([index] if index is not None else [])):
        return False   # subclasses (fake tensors, proxies) take the operators
    if not _right_kind(floats, index) or _dispatch_modes_active():
        return False
    return prepare().startswith("on")


OPS = {"merge": 0, "prune": 1, "mlerp": 2}   # tome_merge.c's OP_MERGE, OP_PRUNE, OP_MLERP


def _call(x: Tensor, metric: Tensor, size: Tensor | None, index: Tensor | None, r: int, prefix: int, op: int):
    if _fn is None and not prepare().startswith("on"):
        raise RuntimeError(f"the native ToMe step is {status()}")
    bsz, n, c = x.shape
    x = x.contiguous()
    if metric.dim() == 3:                     # (B, N, D): one "head"
        metric = metric.unsqueeze(2)
    if metric.stride(-1) != 1:                # (B, N, H, d): heads are read in place, rows must be dense
        metric = metric.contiguous()
    heads, d = metric.shape[2], metric.shape[3]
    size = size.contiguous() if size is not None else None
    index = index.contiguous() if index is not None else None
    x_out = x.new_empty(bsz, n - r, c)
    size_out = x.new_empty(bsz, n - r, 1)
    index_out = torch.empty_like(index) if index is not None else None
    failed = _fn(x.data_ptr(), metric.data_ptr(), size.data_ptr() if size is not None else None,
                 index.data_ptr() if index is not None else None,
                 bsz, n, c, d, index.shape[1] if index is not None else 0, r, prefix,
                 heads, metric.stride(0), metric.stride(1), metric.stride(2), op,
                 x_out.data_ptr(), size_out.data_ptr(), index_out.data_ptr() if index is not None else None,
                 torch.get_num_threads())   # the size of torch's (shared) OpenMP pool
    if failed:
        raise MemoryError("native ToMe step: out of memory for its scratch buffers")
    return x_out, size_out, index_out


@torch.library.custom_op("tokenopt::bipartite_reduce", mutates_args=(), device_types="cpu")
def _reduce_op(x: Tensor, metric: Tensor, size: Optional[Tensor], index: Optional[Tensor], r: int,
               prefix: int, op: int) -> tuple[Tensor, Tensor, Tensor]:
    out, new_size, new_index = _call(x, metric, size, index, r, prefix, op)
    return out, new_size, new_index if new_index is not None else x.new_empty(0, dtype=torch.long)


@_reduce_op.register_fake
def _(x, metric, size, index, r, prefix, op):
    bsz, n, c = x.shape
    new_index = index.new_empty(index.shape) if index is not None else x.new_empty(0, dtype=torch.long)
    return x.new_empty(bsz, n - r, c), x.new_empty(bsz, n - r, 1), new_index


def reduce(x: Tensor, metric: Tensor, size: Tensor | None, index: Tensor | None, r: int, prefix: int,
           op: str = "merge"):
    """One reduction step as :mod:`tokenopt.ops.tome` defines it, returning (x, size, index).

    op: "merge" (ToMe's size-weighted average), "prune" or "mlerp" (ToFu). r must already be
    capped at :func:`tokenopt.ops.matching.max_reduction`; call after :func:`usable`.
    """
    code = OPS[op]
    if torch.compiler.is_compiling():
        out, new_size, new_index = _reduce_op(x, metric, size, index, r, prefix, code)
        return out, new_size, new_index if index is not None else None
    return _call(x, metric, size, index, r, prefix, code)
