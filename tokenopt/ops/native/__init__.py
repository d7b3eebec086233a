"""A native (C) ToMe step for eager CPU inference, built on first use with the system compiler.

Why: in eager mode a ToMe step written with PyTorch operators is ~35 small operators per layer;
at batch 1 their fixed costs (dispatcher, thread pool) eat most of what the merge saves. One C
call does the matching and the size-weighted merge on contiguous float32 buffers.

When it is used (:func:`usable`): CPU float32 tensors, no autograd needed, not under
``torch.compile``/``torch.jit`` tracing and no dispatch mode active (FLOP counters and fake
tensors see the PyTorch operators). Everything else takes the PyTorch path in
:mod:`tokenopt.ops.matching`, which defines the results; tests hold the two equal.

Build: ``cc -O3 -march=native -shared -fPIC`` into ``<cache>/native/<digest>/`` (the digest covers
the source, the flags and the CPU, so a shared home directory across machines stays safe). When
torch runs on GNU OpenMP and the compiler is GCC, ``-fopenmp`` links the step against the
``libgomp.so.1`` torch already loaded, so both share one thread pool (two OpenMP runtimes in one
process would fight over the cores); otherwise the step is built single-threaded.
The library is
written to a temporary name and renamed, so concurrent processes (torchrun) never load half a
file. No compiler, or a failed build, means the PyTorch path; ``TOKENOPT_NATIVE=0`` forces it.
:func:`status` says which path is active and why.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("tome_merge.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]

_lib = None
_status: str | None = None
_enabled = True


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    from tokenopt.demo import default_cache_dir   # one cache root for everything tokenopt keeps
    return default_cache_dir() / "native"


def _torch_uses_gnu_openmp() -> bool:
    """torch's intra-op pool is GNU OpenMP and libgomp is loaded in this process."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _is_gcc(compiler: str) -> bool:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in out and "clang" not in out


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    flags = FLAGS + (["-fopenmp"] if _torch_uses_gnu_openmp() and _is_gcc(compiler) else [])
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags]).encode()
                            + _cpu_fingerprint().encode()).hexdigest()[:16]
    target = _cache_dir() / digest / "tome_merge.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load():
    global _lib, _status
    if _status is not None:
        return _lib
    if os.environ.get("TOKENOPT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _status = "off: TOKENOPT_NATIVE=0"
        return None
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
        fn = lib.tome_merge_f32
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 7 + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
        _lib, _status = fn, f"on: {path}"
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _status = f"off: could not build the native ToMe step ({e})"
    return _lib


def status() -> str:
    """'on: <library>' or 'off: <why>' (builds on first call)."""
    _load()
    return _status


def set_enabled(flag: bool) -> bool:
    """Allow (True) or forbid (False) the native step in this process; returns the previous value."""
    global _enabled
    before, _enabled = _enabled, bool(flag)
    return before


@contextlib.contextmanager
def disabled():
    """Within this block every ToMe step takes the PyTorch path (tests, A/B timing)."""
    before = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)


def _dispatch_modes_active() -> bool:
    try:
        return torch._C._len_torch_dispatch_stack() > 0
    except AttributeError:   # an older/newer torch without the helper: be safe, use PyTorch
        return True


def usable(x: Tensor, metric: Tensor, size: Tensor | None, index: Tensor | None) -> bool:
    """Whether this call can take the native path (see the module docstring)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False   # first: under dynamo this folds to a constant and the rest is never traced
    if not _enabled:
        return False
    floats = [x, metric] + ([size] if size is not None else [])
    tensors = floats + ([index] if index is not None else [])
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" for t in tensors):
        return False
    if any(t.dtype != torch.float32 for t in floats) or (index is not None and index.dtype != torch.int64):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in floats):
        return False
    if _dispatch_modes_active():
        return False
    return _load() is not None


def tome_merge(x: Tensor, metric: Tensor, size: Tensor | None, index: Tensor | None, r: int, prefix: int):
    """ToMe step as :func:`tokenopt.ops.tome.tome_merge` (r already capped); call after :func:`usable`."""
    fn = _lib if _lib is not None else _load()
    if fn is None:
        raise RuntimeError(f"the native ToMe step is {status()}")
    bsz, n, c = x.shape
    x = x.contiguous()
    metric = metric.contiguous()
    x_out = x.new_empty(bsz, n - r, c)
    size_out = x.new_empty(bsz, n - r, 1)
    if size is not None:
        size = size.contiguous()
    index_out = None
    if index is not None:
        index = index.contiguous()
        index_out = torch.empty_like(index)
    failed = fn(x.data_ptr(), metric.data_ptr(), size.data_ptr() if size is not None else None,
                  index.data_ptr() if index is not None else None,
                  bsz, n, c, metric.shape[-1], index.shape[1] if index is not None else 0, r, prefix,
                  x_out.data_ptr(), size_out.data_ptr(), index_out.data_ptr() if index is not None else None,
                torch.get_num_threads())   # the size of torch's (shared) OpenMP pool
    if failed:
        raise MemoryError("native ToMe step: out of memory for its scratch buffers")
    return x_out, size_out, index_out
