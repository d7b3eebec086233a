"""Compile tome_merge.c with the system C compiler and load it through ctypes (once per process).

``cc -O3 -march=native -shared -fPIC`` into ``<cache>/native/<digest>/``: the digest covers the
source, the compiler and flags and the CPU, so a home directory shared across machines stays
safe. The library is written to a temporary name and renamed, so concurrent processes (torchrun)
never load half a file. When torch runs on GNU OpenMP and the compiler is GCC, ``-fopenmp`` links
the step against the ``libgomp.so.1`` torch already loaded, so both share one thread pool (two
OpenMP runtimes in one process would fight over the cores); otherwise it is built single-threaded.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from tokenopt.paths import native_build_dir

SOURCE = Path(__file__).with_name("tome_merge.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


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
    target = native_build_dir() / digest / "tome_merge.so"
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


def load():
    """(function, status): the ctypes function or None, and 'on: <path>' or 'off: <why>'."""
    if os.environ.get("TOKENOPT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "off: TOKENOPT_NATIVE=0"
    try:
        path = _build()
        fn = ctypes.CDLL(str(path)).tome_merge_f32
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"off: could not build the native ToMe step ({e})"
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 12 + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    return fn, f"on: {path}"
