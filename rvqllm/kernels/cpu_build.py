"""Compile the CPU kernels on first use, cache the shared library, and warn once, loudly, if it cannot be.

Nothing is compiled at install time. The first call that needs the CPU fast path runs the machine's C++
compiler (``$CXX``, else ``g++``/``c++``/``clang++``) on :data:`.cpu_source.SOURCE` — plain C++ with
OpenMP, no torch headers, about a second — and writes the library to
``$RVQLLM_CACHE_DIR`` (default ``~/.cache/rvqllm``) ``/kernels/<hash>/librvqcpu.so``; the hash covers the
source, the flags, the compiler's version and the CPU capability torch reports, so an artefact is reused
only where it was built for. Later processes load the cached file without compiling.

If no compiler is found, the build fails, or ``RVQLLM_DISABLE_CPU_KERNELS=1`` is set, :func:`load_library`
returns ``None`` after one :class:`KernelFallbackWarning` (also printed to stderr) that names the
cause, the cost (the pure-torch reference path, which decodes each weight whole on every call) and the fix.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .cpu_source import SOURCE


class KernelFallbackWarning(UserWarning):
    """A fast kernel path could not run; rvqllm is using a slower one."""


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` once per process per ``key``, as a warning and on stderr."""
    if key in _warned:
        return
    _warned.add(key)
    banner = "\n" + "!" * 78 + f"\nrvqllm: {message}\n" + "!" * 78
    print(banner, file=sys.stderr, flush=True)
    warnings.warn(message, KernelFallbackWarning, stacklevel=3)


def cache_dir() -> Path:
    """Where compiled kernels are cached (``$RVQLLM_CACHE_DIR`` or ``~/.cache/rvqllm``) + ``/kernels``."""
    root = os.environ.get("RVQLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rvqllm")
    return Path(root) / "kernels"


def find_compiler() -> str | None:
    """Path of the C++ compiler to use, or None."""
    cand = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for c in cand:
        path = shutil.which(c)
        if path:
            return path
    return None


def _arch_flags() -> list[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    cap = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}.get(cap, [])


def _flags() -> list[str]:
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", *_arch_flags()]


def _compile(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = "\n".join([SOURCE, " ".join(_flags()), version, platform.machine(),
                     torch.backends.cpu.get_cpu_capability()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = cache_dir() / digest / "librvqcpu.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "rvqcpu.cpp"
        src.write_text(SOURCE)
        out = Path(tmp) / "librvqcpu.so"
        proc = subprocess.run([cxx, *_flags(), str(src), "-o", str(out)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-800:]}")
        os.replace(out, target)  # atomic: concurrent builders never see a half-written file
    return target


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    gemv = [p, i64, p, i32, p, i32, p, i32, p, i32, i64, i64, i64, i64, i64, i64, p, i32]
    for name in ("rvq_gemv_lut", "rvq_gemv_decode"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = gemv, None
    lib.rvq_dequant_rows.argtypes = [p, i32, p, i32, p, i32, i64, i64, i64, i64, i64, i64, i64, i64, p, i32]
    lib.rvq_dequant_rows.restype = None
    lib.rvq_gemv_lut16.argtypes = [p, i64, p, i64, p, p, i32, p, i32, i64, i64, i64, i64, i64, p, i32]
    lib.rvq_gemv_lut16.restype = ctypes.c_int
    lib.rvq_has_lut16.restype = ctypes.c_int
    lib.rvq_reads_half8.restype = ctypes.c_int
    lib.rvq_abi_version.restype = ctypes.c_int
    lib.rvq_h2f.argtypes, lib.rvq_h2f.restype = [ctypes.c_uint16], ctypes.c_float
    lib.rvq_trellis_viterbi.argtypes = [p, p, i64, i64, i32, i32, p, p, i32]
    lib.rvq_trellis_viterbi.restype = ctypes.c_int
    lib.rvq_trellis_gemv.argtypes = [p, i64, p, i64, i64, i64, i32, i32, i32, p, p, p, i32]
    lib.rvq_trellis_gemv.restype = ctypes.c_int
    lib.rvq_trellis_decode_rows.argtypes = [p, i64, i64, i64, i32, i32, i32, p, p, i64, i64, p, i32]
    lib.rvq_trellis_decode_rows.restype = ctypes.c_int
    lib.rvq_trellis_has_avx512.restype = ctypes.c_int
    lib.rvq_trellis_fast_path.argtypes = [i32, i32, i32]
    lib.rvq_trellis_fast_path.restype = ctypes.c_int


def load_library() -> ctypes.CDLL | None:
    """The compiled CPU kernel library (built and cached on first call), or None after a loud warning."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        fix = ("install a C++ compiler with OpenMP (e.g. `apt install g++`) or point $CXX at one, "
               "then restart Python")
        try:
            if os.environ.get("RVQLLM_DISABLE_CPU_KERNELS") == "1":
                raise RuntimeError("RVQLLM_DISABLE_CPU_KERNELS=1 is set")
            cxx = find_compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found ($CXX, g++, c++, clang++)")
            lib = ctypes.CDLL(str(_compile(cxx)))
            _bind(lib)
            if lib.rvq_abi_version() != 2:
                raise RuntimeError("cached kernel library has an unexpected ABI version")
            _lib = lib
        except Exception as e:  # noqa: BLE001 - any failure means: fall back, loudly
            _lib = None
            warn_once("cpu-build", f"the CPU fast kernels are unavailable ({e}). Quantized layers fall back to "
                      f"the pure-torch reference, which decodes every weight whole on each call and is many "
                      f"times slower. Fix: {fix}.")
        _tried = True
        return _lib


def reset_for_tests() -> None:
    """Forget the loaded library and the warnings already given (tests force the fallback path)."""
    global _lib, _tried
    with _lock:
        _lib, _tried = None, False
        _warned.clear()
