"""How fast a CPU could decode a trellis-coded layer at one token, against ``F.linear`` and the `2bit` preset.

Two prototype kernels (their C++ source below, compiled here with the machine's compiler and the library's
flags; not part of the library): each input column's walk is a packed little-endian bit string in
which row ``o``'s state is the ``L`` bits from bit ``2 o`` on; the kernels compute
``y[o] = scale[o] * sum_j x[j] * table[state(j, o)]`` column by column: 8 rows at a time with one 32-bit load,
a variable shift, a mask and an 8-lane gather from a ``2**L``-entry float32 table, then an FMA; or (AVX-512)
16 rows at a time taking each state's codeword from a 32-entry table by its hash
(:func:`rvqllm.rvq.trellis.lut_index`), the table held in two registers (one multiply, one shift and one
two-register permute per 16 codewords), one column at a time or four columns per pass over each 16-row slice
(the slice's outputs kept in a register meanwhile). Random
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
#if defined(__AVX512F__)
static inline __m512 lut32_codewords(const uint8_t* w, int64_t o, __m512i shift, __m512i mask, __m512i mul,
                                     __m512i add, __m512 lo, __m512 hi) {
  uint32_t a, b;
  std::memcpy(&a, w + o / 4, 4);
  std::memcpy(&b, w + o / 4 + 2, 4);
  __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32((int)a)), _mm256_set1_epi32((int)b), 1);
  __m512i s = _mm512_and_si512(_mm512_srlv_epi32(words, shift), mask);
  __m512i idx = _mm512_srli_epi32(_mm512_add_epi32(_mm512_mullo_epi32(s, mul), add), 27);
  return _mm512_permutex2var_ps(lo, idx, hi);
}
#endif
// Codewords from a 32-entry table by hash (rvqllm.rvq.trellis.lut_index with lut_bits 5): the table sits
// in two registers and one vpermt2ps looks 16 codewords up; one column per pass over the outputs, or (four != 0)
// four columns per pass over each 16-row slice, the slice's outputs kept in a register meanwhile (n a multiple
// of 4). Returns -1 where AVX-512 is not compiled in.
extern "C" int trellis_gemv_lut32(const float* x, const uint8_t* walks, int64_t bpc, const float* lut, int L,
                                  const float* scale, int64_t out, int64_t n, float* y, int four) {
#if defined(__AVX512F__)
  const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i mask = _mm512_set1_epi32((1u << L) - 1);
  const __m512i mul = _mm512_set1_epi32((int)0x9E3779B1u), add = _mm512_set1_epi32(0x7F4A7C15);
  const __m512 lo = _mm512_loadu_ps(lut), hi = _mm512_loadu_ps(lut + 16);
  for (int64_t o = 0; o < out; ++o) y[o] = 0.f;
  const int64_t step = four ? 4 : 1;
  for (int64_t j = 0; j < n; j += step) {
    const uint8_t* w = walks + j * bpc;
    for (int64_t o = 0; o < out; o += 16) {
      __m512 acc = _mm512_loadu_ps(y + o);
      for (int64_t c = 0; c < step; ++c)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(x[j + c]), lut32_codewords(w + c * bpc, o, shift, mask, mul, add, lo, hi),
                              acc);
      _mm512_storeu_ps(y + o, acc);
    }
  }
  for (int64_t o = 0; o < out; ++o) y[o] *= scale[o];
  return 0;
#else
  return -1;
#endif
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
    dll.trellis_gemv_lut32.argtypes = [p, p, i64, p, ctypes.c_int, p, i64, i64, p, ctypes.c_int]
    dll.trellis_gemv_lut32.restype = ctypes.c_int
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

    lut = torch.randn(32, generator=g)

    def lut32_call() -> int:
        return lib.trellis_gemv_lut32(x.data_ptr(), walks.data_ptr(), bpc, lut.data_ptr(), bits, scale.data_ptr(),
                                      out, n, y.data_ptr(), 0)

    def lut32x4_call() -> int:
        return lib.trellis_gemv_lut32(x.data_ptr(), walks.data_ptr(), bpc, lut.data_ptr(), bits, scale.data_ptr(),
                                      out, n, y.data_ptr(), 1)

    stream = ((walks[:, :, None].to(torch.int64) >> torch.arange(8)) & 1).reshape(n, -1)  # [n, 8 bpc]
    pos = (2 * torch.arange(out))[:, None] + torch.arange(bits)[None, :]  # [out, L]
    states = (stream[:, pos] << torch.arange(bits)).sum(-1)  # [n, out]
    trellis_call()
    want = (table[states].T * scale[:, None]) @ x
    if not torch.allclose(y, want, rtol=1e-4, atol=1e-3 * n**0.5):
        raise SystemExit(f"{out}x{n}: the prototype disagrees with the dense reference")
    from rvqllm.rvq.trellis import lut_index

    has_lut32 = lut32_call() == 0
    if has_lut32:
        want = (lut[lut_index(states, 5)].T * scale[:, None]) @ x
        if not torch.allclose(y, want, rtol=1e-4, atol=1e-3 * n**0.5):
            raise SystemExit(f"{out}x{n}: the 32-entry prototype disagrees with the dense reference")
        lut32x4_call()
        if not torch.allclose(y, want, rtol=1e-4, atol=1e-3 * n**0.5):
            raise SystemExit(f"{out}x{n}: the 4-column 32-entry prototype disagrees with the dense reference")
    w, xx = torch.randn(out, n, generator=g), x[None]
    q = QuantizedLinear(n, out, vector_dim=8, stages=2, bits=8, bias=False)
    q.codes.copy_(torch.randint(0, 256, q.codes.shape, generator=g).to(q.codes.dtype))
    q.codebooks.copy_(torch.randn(q.codebooks.shape, generator=g).half())
    with torch.no_grad():
        t_lin = microseconds(lambda: torch.nn.functional.linear(xx, w), reps)
        t_tr = microseconds(trellis_call, reps)
        t_rvq = microseconds(lambda: q(xx), reps)
        t_32 = microseconds(lut32_call, reps) if has_lut32 else None
        t_32x4 = microseconds(lut32x4_call, reps) if has_lut32 else None
    cell32 = f"{t_32:.0f} (×{t_lin / t_32:.2f})" if t_32 else "n/a (no AVX-512)"
    cell32x4 = f"{t_32x4:.0f} (×{t_lin / t_32x4:.2f})" if t_32x4 else "n/a (no AVX-512)"
    return (f"| {out} x {n} | {t_lin:.0f} | {t_tr:.0f} (×{t_lin / t_tr:.2f}) | {cell32} | {cell32x4} | "
            f"{t_rvq:.0f} (×{t_lin / t_rvq:.2f}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-bits", type=int, default=12)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| shape (out x in) | F.linear fp32 µs | trellis, 2**L table µs (× F.linear) | trellis, 32-entry table "
          "by hash µs | the same, 4 columns a pass µs | `2bit` layer µs (× F.linear) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        for out, n in SHAPES:
            print(time_shape(lib, out, n, args.state_bits, args.reps), flush=True)


if __name__ == "__main__":
    main()
