"""How fast a CPU could decode a trellis-coded layer at one token, against ``F.linear`` and the `2bit` preset.

A prototype kernel (its C++ source below, compiled here with the machine's compiler and the library's
flags; it is not part of the library): each input column's walk is a packed little-endian bit string in
which row ``o``'s state is the ``L`` bits from bit ``2 o`` on; the kernel computes
``y[o] = scale[o] * sum_j x[j] * table[state(j, o)]`` column by column, 8 rows at a time (one 32-bit load,
a variable shift, a mask and an 8-lane gather from the ``2**L``-entry float32 table, then an FMA). Random
walks stand in for coded ones (every bit string is a walk). The result is checked against a dense torch
reference, then timed beside ``F.linear`` (float32) and a ``QuantizedLinear`` of the `2bit` preset's code
shape (2 x 256, ``d`` 8: the library's own one-token kernel) on the same shapes, one thread.

    OMP_NUM_THREADS=1 python scripts/bench_trellis_kernel.py [--state-bits 12] [--reps 200]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <immintrin.h>
extern "C" void trellis_gemv(const float* x, const uint8_t* walks, int64_t bpc, const float* table, int L,
                             const float* scale, int64_t out, int64_t n, float* y) {
  const __m256i shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i mask = _mm256_set1_epi32((1u << L) - 1);
  for (int64_t o = 0; o < out; ++o) y[o] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* w = walks + j * bpc;
    const __m256 xj = _mm256_set1_ps(x[j]);
    for (int64_t o = 0; o < out; o += 8) {
      uint32_t word;
      std::memcpy(&word, w + o / 4, 4);
      __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), shift), mask);
      __m256 v = _mm256_i32gather_ps(table, idx, 4);
      _mm256_storeu_ps(y + o, _mm256_fmadd_ps(xj, v, _mm256_loadu_ps(y + o)));
    }
  }
  for (int64_t o = 0; o < out; ++o) y[o] *= scale[o];
}
"""

SHAPES = ((576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008))


def build(folder: Path) -> ctypes.CDLL:
    from rvqllm.kernels.cpu_build import _flags, find_compiler

    cxx = find_compiler()
    if cxx is None:
        raise SystemExit("no C++ compiler found ($CXX, g++, c++, clang++): install one (apt install g++)")
    src, lib = folder / "trellis_gemv.cpp", folder / "libtrellis_gemv.so"
    src.write_text(SOURCE)
    subprocess.run([cxx, *_flags(), "-mavx2", "-mfma", str(src), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    dll.trellis_gemv.argtypes = [p, p, i64, p, ctypes.c_int, p, i64, i64, p]
    return dll


def microseconds(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def time_shape(lib: ctypes.CDLL, out: int, n: int, bits: int, reps: int) -> str:
    """One table row: check the prototype on random walks of an ``out x n`` layer, then time it."""
    from rvqllm.nn import QuantizedLinear

    g = torch.Generator().manual_seed(0)
    bpc = (2 * out + bits + 7) // 8 + 8  # bytes per column, with room for the last 32-bit load
    walks = torch.randint(0, 256, (n, bpc), dtype=torch.uint8, generator=g)
    table = torch.randn(1 << bits, generator=g)
    scale = torch.rand(out, generator=g) + 0.5
    x = torch.randn(n, generator=g)
    y = torch.empty(out)

    def trellis_call():
        lib.trellis_gemv(x.data_ptr(), walks.data_ptr(), bpc, table.data_ptr(), bits, scale.data_ptr(), out, n,
                         y.data_ptr())

    stream = ((walks[:, :, None].to(torch.int64) >> torch.arange(8)) & 1).reshape(n, -1)  # [n, 8 bpc]
    pos = (2 * torch.arange(out))[:, None] + torch.arange(bits)[None, :]  # [out, L]
    states = (stream[:, pos] << torch.arange(bits)).sum(-1)  # [n, out]
    trellis_call()
    want = (table[states].T * scale[:, None]) @ x
    if not torch.allclose(y, want, rtol=1e-4, atol=1e-3 * n**0.5):
        raise SystemExit(f"{out}x{n}: the prototype disagrees with the dense reference")
    w, xx = torch.randn(out, n, generator=g), x[None]
    q = QuantizedLinear(n, out, vector_dim=8, stages=2, bits=8, bias=False)
    q.codes.copy_(torch.randint(0, 256, q.codes.shape, generator=g).to(q.codes.dtype))
    q.codebooks.copy_(torch.randn(q.codebooks.shape, generator=g).half())
    with torch.no_grad():
        t_lin = microseconds(lambda: torch.nn.functional.linear(xx, w), reps)
        t_tr = microseconds(trellis_call, reps)
        t_rvq = microseconds(lambda: q(xx), reps)
    return f"| {out} x {n} | {t_lin:.0f} | {t_tr:.0f} (×{t_lin / t_tr:.2f}) | {t_rvq:.0f} (×{t_lin / t_rvq:.2f}) |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-bits", type=int, default=12)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| shape (out x in) | F.linear fp32 µs | trellis prototype µs (× F.linear) | `2bit` layer µs (× F.linear) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        for out, n in SHAPES:
            print(time_shape(lib, out, n, args.state_bits, args.reps), flush=True)


if __name__ == "__main__":
    main()
