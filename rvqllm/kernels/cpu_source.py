"""C++ source of the CPU kernels, kept as a string so that the wheel ships no build step.

The source is compiled on first use by :mod:`.cpu_build` with the machine's C++ compiler into a plain
shared library (``extern "C"`` functions on raw pointers, no torch or Python headers, so it builds in
about a second) and called through ``ctypes``. All tensors are contiguous row-major; sizes are int64.

Kernels (``C`` is the code type: uint8 for bits <= 8, uint16 for the int16 bit patterns of wider codes):

* ``rvq_gemv_lut``: lookup-table kernel for a few tokens. Per input group ``g`` and stage ``s`` a
  table ``tab[g, s, t, k] = x_t[g*d:(g+1)*d] . codebooks[s, k]`` is built (``G*S*K*d*T`` FMAs), then
  every output sums the entries its codes pick: ``y[t, o] = scale[o] * sum_{g,s} tab[g, s, t, codes[o,g,s]]``.
  The table is built for a chunk of groups at a time so that it stays in L2.
* ``rvq_gemv_decode``: fused decode-dot for a few tokens: each 8-wide (``d``-wide) weight vector is
  decoded in registers from the codebooks (which sit in L1) and multiplied with every token.
* ``rvq_dequant_rows``: decodes a tile of rows ``[o0, o1)`` of the scaled weight into a float32 buffer,
  for the many-token path (decode a tile, then a BLAS matmul on it).
* ``rvq_trellis_viterbi``: the encoder of the bitshift trellis code (:mod:`rvqllm.rvq.trellis`): the walk
  of least weighted squared error through ``2**L`` states for each of ``B`` sequences, one OpenMP thread
  per sequence.
* ``rvq_trellis_gemv``: a trellis-coded layer (:func:`rvqllm.rvq.trellis.walk_dequantize`: packed walks
  ``[n, bpc]`` uint8, a ``[2**Q]`` table, ``[out]`` scales) times a few tokens ``x [T, n]``: each weight is
  decoded from its walk once per call and multiplied with every token; AVX-512 decodes 16 rows of a column
  per vector (``k <= 6``, ``Q <= 5``), a portable path takes every other case.
* ``rvq_trellis_decode_rows``: rows ``[o0, o1)`` of a trellis-coded layer's scaled weight into a float32
  buffer ``[o1 - o0, n]``, for the many-token path (decode a tile, then a BLAS matmul on it).
* ``rvq_trellis_has_avx512`` / ``rvq_trellis_fast_path``: whether the AVX-512 trellis path is compiled in,
  and whether it serves given ``(L, k, Q)``.
"""

SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline float h2f(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t ex = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (ex == 0) {
    if (man == 0) {
      bits = sign;
    } else {
      int e = -1;
      do { e++; man <<= 1; } while ((man & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (ex == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((ex + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Convert n values (fp16 bit patterns when half != 0, else float32) into dst.
static void to_f32(const void* src, int half, int64_t n, float* dst) {
  if (half) {
    const uint16_t* p = (const uint16_t*)src;
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + i))));
#endif
    for (; i < n; ++i) dst[i] = h2f(p[i]);
  } else {
    std::memcpy(dst, src, n * sizeof(float));
  }
}

// x [T, in_features] -> xp [T, G*D] zero padded.
static void pad_x(const float* x, int64_t T, int64_t in_features, int64_t GD, float* xp) {
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(xp + t * GD, x + t * in_features, in_features * sizeof(float));
    for (int64_t i = in_features; i < GD; ++i) xp[t * GD + i] = 0.f;
  }
}

static void finish(float* y, int64_t T, int64_t O, const float* sc, const void* bias, int bias_half, int nt) {
  std::vector<float> b;
  if (bias) { b.resize(O); to_f32(bias, bias_half, O, b.data()); }
  #pragma omp parallel for num_threads(nt) schedule(static) if (T * O >= 65536)
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t t = 0; t < T; ++t) {
      float v = y[t * O + o] * sc[o];
      if (bias) v += b[o];
      y[t * O + o] = v;
    }
  }
}

// Sum of tab[j*K + c[j]] over j in [0, n): the gather at the heart of the LUT kernel.
template <typename C>
static inline float gather_sum(const float* tb, const C* c, int64_t n, int64_t K) {
  int64_t j = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  if (n >= 16 && n * K < (int64_t)1 << 31) {
    __m512i off = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32((int)K));
    const __m512i step = _mm512_set1_epi32((int)(16 * K));
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; j + 32 <= n; j += 32) {
      __m512i i0, i1;
      if constexpr (sizeof(C) == 1) {
        i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(c + j)));
        i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(c + j + 16)));
      } else {
        i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(c + j)));
        i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(c + j + 16)));
      }
      a0 = _mm512_add_ps(a0, _mm512_i32gather_ps(_mm512_add_epi32(i0, off), tb, 4));
      off = _mm512_add_epi32(off, step);
      a1 = _mm512_add_ps(a1, _mm512_i32gather_ps(_mm512_add_epi32(i1, off), tb, 4));
      off = _mm512_add_epi32(off, step);
    }
    total = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
#endif
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  for (; j + 4 <= n; j += 4) {
    a0 += tb[(j + 0) * K + c[j + 0]];
    a1 += tb[(j + 1) * K + c[j + 1]];
    a2 += tb[(j + 2) * K + c[j + 2]];
    a3 += tb[(j + 3) * K + c[j + 3]];
  }
  for (; j < n; ++j) a0 += tb[j * K + c[j]];
  return total + ((a0 + a1) + (a2 + a3));
}

template <typename C>
static void lut_impl(const float* xp, int64_t T, const C* codes, const float* cb, const float* sc,
                     int64_t O, int64_t G, int64_t S, int64_t K, int64_t D, float* y, int nt) {
  const int64_t GD = G * D;
  // cbT [S, D, K] so that the table build runs along k contiguously.
  static thread_local std::vector<float> cbT, tab;
  if ((int64_t)cbT.size() < S * D * K) cbT.resize(S * D * K);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t d = 0; d < D; ++d) cbT[(s * D + d) * K + k] = cb[(s * K + k) * D + d];
  const float* cbt = cbT.data();
  const int64_t per_g = S * T * K;
  const int64_t budget = 256 * 1024;  // floats: 1 MiB of table per chunk, stays in L2
  int64_t GC = std::max<int64_t>(1, budget / per_g);
  GC = std::min(GC, G);
  if ((int64_t)tab.size() < GC * per_g) tab.resize(GC * per_g);
  float* tb = tab.data();
  for (int64_t i = 0; i < T * O; ++i) y[i] = 0.f;
  for (int64_t g0 = 0; g0 < G; g0 += GC) {
    const int64_t gc = std::min(GC, G - g0);
    const int64_t n = gc * S;
    // table layout [t, (g, s), k]
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t g = g0 + j / S, s = j % S;
      for (int64_t t = 0; t < T; ++t) {
        float* row = tb + (t * n + j) * K;
        const float* xr = xp + t * GD + g * D;
        for (int64_t k = 0; k < K; ++k) row[k] = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float xv = xr[d];
          const float* cr = cbt + (s * D + d) * K;
          for (int64_t k = 0; k < K; ++k) row[k] += xv * cr[k];
        }
      }
    }
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t o = 0; o < O; ++o) {
      const C* c = codes + o * G * S + g0 * S;
      for (int64_t t = 0; t < T; ++t) y[t * O + o] += gather_sum<C>(tb + t * n * K, c, n, K);
    }
  }
}

// Decoded weight vector of group g (sum over stages), d = 8, AVX2.
#if defined(__AVX2__)
template <typename C>
static inline __m256 dec8(const float* cb, const C* c, int64_t S, int64_t K) {
  __m256 w = _mm256_loadu_ps(cb + (int64_t)c[0] * 8);
  for (int64_t s = 1; s < S; ++s) w = _mm256_add_ps(w, _mm256_loadu_ps(cb + (s * K + (int64_t)c[s]) * 8));
  return w;
}
template <typename C>
static inline __m128 dec4(const float* cb, const C* c, int64_t S, int64_t K) {
  __m128 w = _mm_loadu_ps(cb + (int64_t)c[0] * 4);
  for (int64_t s = 1; s < S; ++s) w = _mm_add_ps(w, _mm_loadu_ps(cb + (s * K + (int64_t)c[s]) * 4));
  return w;
}
#if defined(__F16C__)
#define RVQ_HALF8 1
// The same from an fp16 table read as it is stored (half the bytes: a 65,536 x 8 table is 1 MiB, not 2).
template <typename C>
static inline __m256 dec8h(const uint16_t* cb, const C* c, int64_t S, int64_t K) {
  __m256 w = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(cb + (int64_t)c[0] * 8)));
  for (int64_t s = 1; s < S; ++s)
    w = _mm256_add_ps(w, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(cb + (s * K + (int64_t)c[s]) * 8))));
  return w;
}
#endif
static inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
static inline float hsum4(__m128 a) {
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// Output o of the d = 8 fused decode-dot for T tokens (xp [Tpad, G*8]); dec(codes of one group) -> the
// group's decoded 8 weights. At one token four groups are in flight at a time: their table reads are
// independent, so their cache misses overlap (a 65,536-entry table lives in L2, not L1).
template <typename C, typename Dec>
static inline void dot8_row(const float* xp, int64_t T, const C* c, int64_t G, int64_t S, Dec dec, float* y,
                            int64_t O, int64_t o) {
  const int64_t GD = G * 8;
  constexpr int TB = 8;
  if (T == 1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) {
      a0 = _mm256_fmadd_ps(dec(c + g * S), _mm256_loadu_ps(xp + g * 8), a0);
      a1 = _mm256_fmadd_ps(dec(c + (g + 1) * S), _mm256_loadu_ps(xp + (g + 1) * 8), a1);
      a2 = _mm256_fmadd_ps(dec(c + (g + 2) * S), _mm256_loadu_ps(xp + (g + 2) * 8), a2);
      a3 = _mm256_fmadd_ps(dec(c + (g + 3) * S), _mm256_loadu_ps(xp + (g + 3) * 8), a3);
    }
    for (; g < G; ++g) a0 = _mm256_fmadd_ps(dec(c + g * S), _mm256_loadu_ps(xp + g * 8), a0);
    y[o] = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    return;
  }
  for (int64_t t0 = 0; t0 < T; t0 += TB) {
    __m256 acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m256 w = dec(c + g * S);
      const float* xr = xp + t0 * GD + g * 8;
      for (int t = 0; t < TB; ++t) acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + t * GD), acc[t]);
    }
    const int64_t tb = std::min<int64_t>(TB, T - t0);
    for (int64_t t = 0; t < tb; ++t) y[(t0 + t) * O + o] = hsum8(acc[t]);
  }
}

// One row of the scaled d = 8 weight (codes c of that row, its scale) into wr [in_features].
template <typename C, typename Dec>
static inline void dequant8_row(const C* c, int64_t G, int64_t S, Dec dec, float scale, int64_t in_features,
                                float* wr) {
  const __m256 vs = _mm256_set1_ps(scale);
  const int64_t full = in_features / 8;
  for (int64_t g = 0; g < full; ++g) _mm256_storeu_ps(wr + g * 8, _mm256_mul_ps(dec(c + g * S), vs));
  if (full < G) {
    alignas(32) float v8[8];
    _mm256_store_ps(v8, _mm256_mul_ps(dec(c + full * S), vs));
    for (int64_t d = 0; d < in_features - full * 8; ++d) wr[full * 8 + d] = v8[d];
  }
}
#endif

// One weight vector in float32: the sum over stages of its codewords (generic vector dim D).
template <typename C>
static inline void decode_vec(const float* cb, const C* c, int64_t S, int64_t K, int64_t D, float* out) {
  const float* v = cb + (int64_t)c[0] * D;
  for (int64_t d = 0; d < D; ++d) out[d] = v[d];
  for (int64_t s = 1; s < S; ++s) {
    v = cb + (s * K + (int64_t)c[s]) * D;
    for (int64_t d = 0; d < D; ++d) out[d] += v[d];
  }
}

// xp is [Tpad, G*D] with Tpad a multiple of 8 (rows past T are zero).
template <typename C, int DT>
static void decode_impl(const float* xp, int64_t T, const C* codes, const float* cb, const float* sc,
                        int64_t O, int64_t G, int64_t S, int64_t K, int64_t Drt, float* y, int nt) {
  const int64_t D = DT > 0 ? DT : Drt;
  const int64_t GD = G * D;
  constexpr int TB = 8;
  constexpr int DM = DT > 0 ? DT : 64;
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = 0; o < O; ++o) {
    const C* c = codes + o * G * S;
#if defined(__AVX2__)
    if constexpr (DT == 8) {
      dot8_row(xp, T, c, G, S, [&](const C* p) { return dec8(cb, p, S, K); }, y, O, o);
      continue;
    }
    if constexpr (DT == 4) {
      for (int64_t t0 = 0; t0 < T; t0 += TB) {
        __m128 acc[TB];
        for (int t = 0; t < TB; ++t) acc[t] = _mm_setzero_ps();
        const int tt = T == 1 ? 1 : TB;
        for (int64_t g = 0; g < G; ++g) {
          const __m128 w = dec4(cb, c + g * S, S, K);
          const float* xr = xp + t0 * GD + g * 4;
          if (tt == 1) acc[0] = _mm_fmadd_ps(w, _mm_loadu_ps(xr), acc[0]);
          else
            for (int t = 0; t < TB; ++t) acc[t] = _mm_fmadd_ps(w, _mm_loadu_ps(xr + t * GD), acc[t]);
        }
        const int64_t tb = std::min<int64_t>(TB, T - t0);
        for (int64_t t = 0; t < tb; ++t) y[(t0 + t) * O + o] = hsum4(acc[t]);
      }
      continue;
    }
#endif
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
      const int64_t tb = std::min<int64_t>(TB, T - t0);
      float acc[TB][DM];
      for (int t = 0; t < TB; ++t)
        for (int d = 0; d < DM; ++d) acc[t][d] = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        float w[DM];
        decode_vec(cb, c + g * S, S, K, D, w);
        for (int64_t t = 0; t < tb; ++t) {
          const float* xr = xp + (t0 + t) * GD + g * D;
          for (int64_t d = 0; d < D; ++d) acc[t][d] += w[d] * xr[d];
        }
      }
      for (int64_t t = 0; t < tb; ++t) {
        float sum = 0.f;
        for (int64_t d = 0; d < D; ++d) sum += acc[t][d];
        y[(t0 + t) * O + o] = sum;
      }
    }
  }
}

#if defined(RVQ_HALF8)
// decode_impl and dequant_impl for d = 8 with the codebooks read as fp16 (no float32 copy of the table).
template <typename C>
static void decode_h8_impl(const float* xp, int64_t T, const C* codes, const uint16_t* cb, int64_t O,
                           int64_t G, int64_t S, int64_t K, float* y, int nt) {
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = 0; o < O; ++o)
    dot8_row(xp, T, codes + o * G * S, G, S, [&](const C* p) { return dec8h(cb, p, S, K); }, y, O, o);
}

template <typename C>
static void dequant_h8_impl(const C* codes, const uint16_t* cb, const float* sc, int64_t G, int64_t S,
                            int64_t K, int64_t in_features, int64_t o0, int64_t o1, float* w, int nt) {
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = o0; o < o1; ++o)
    dequant8_row(codes + o * G * S, G, S, [&](const C* p) { return dec8h(cb, p, S, K); }, sc[o], in_features,
                 w + (o - o0) * in_features);
}
#endif

template <typename C, int DT>
static void dequant_impl(const C* codes, const float* cb, const float* sc, int64_t G, int64_t S, int64_t K,
                         int64_t Drt, int64_t in_features, int64_t o0, int64_t o1, float* w, int nt) {
  const int64_t D = DT > 0 ? DT : Drt;
  constexpr int DM = DT > 0 ? DT : 64;
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = o0; o < o1; ++o) {
    const C* c = codes + o * G * S;
    float* wr = w + (o - o0) * in_features;
    const float scale = sc[o];
    int64_t g0 = 0;
#if defined(__AVX2__)
    if constexpr (DT == 8) {
      dequant8_row(c, G, S, [&](const C* p) { return dec8(cb, p, S, K); }, scale, in_features, wr);
      continue;
    }
    if constexpr (DT == 4) {
      const __m128 vs = _mm_set1_ps(scale);
      const int64_t full = in_features / 4;
      for (; g0 < full; ++g0) _mm_storeu_ps(wr + g0 * 4, _mm_mul_ps(dec4(cb, c + g0 * S, S, K), vs));
    }
#endif
    for (int64_t g = g0; g < G; ++g) {
      float v8[DM];
      decode_vec(cb, c + g * S, S, K, D, v8);
      const int64_t n = std::min(D, in_features - g * D);
      if (n == D) {
        for (int64_t d = 0; d < D; ++d) wr[g * D + d] = v8[d] * scale;
      } else {
        for (int64_t d = 0; d < n; ++d) wr[g * D + d] = v8[d] * scale;
      }
    }
  }
}

#if defined(__AVX512BW__)
// 256-entry int16 table lookup for 32 lanes: T holds the table in 8 registers of 32 entries.
static inline __m512i lookup256(__m512i idx, const __m512i* T) {
  const __m512i r0 = _mm512_permutex2var_epi16(T[0], idx, T[1]);
  const __m512i r1 = _mm512_permutex2var_epi16(T[2], idx, T[3]);
  const __m512i r2 = _mm512_permutex2var_epi16(T[4], idx, T[5]);
  const __m512i r3 = _mm512_permutex2var_epi16(T[6], idx, T[7]);
  const __mmask32 m6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(64));
  const __mmask32 m7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(128));
  const __m512i lo = _mm512_mask_blend_epi16(m6, r0, r1);
  const __m512i hi = _mm512_mask_blend_epi16(m6, r2, r3);
  return _mm512_mask_blend_epi16(m7, lo, hi);
}

// One token of the int16-table LUT kernel (K = 256). ct: codes repacked [G*S, Opad] (Opad % 32 == 0).
// Table rows are quantized to int16 (|v| <= 16383) with one scale per chunk of LUT16_CHUNK rows, so two
// rows can be summed in int16 before widening; each chunk's int32 sums are rescaled into float y.
static const int64_t LUT16_CHUNK = 16;
static void lut16_token(const float* xr, const uint8_t* ct, int64_t Opad, const float* cbT, int64_t G,
                        int64_t S, int64_t D, float* yo, int nt) {
  constexpr int64_t K = 256;
  const int64_t n = G * S;
  const int64_t nch = (n + LUT16_CHUNK - 1) / LUT16_CHUNK;
  // Scratch owned by the calling thread (callers may run concurrently); OpenMP workers get raw pointers,
  // never the thread_local names (which would resolve to the worker's own, empty, copies).
  static thread_local std::vector<float> tabf_v;
  static thread_local std::vector<int16_t> tq_v;
  static thread_local std::vector<float> invq_v;
  if ((int64_t)tabf_v.size() < n * K) { tabf_v.resize(n * K); tq_v.resize(n * K); }
  if ((int64_t)invq_v.size() < nch) invq_v.resize(nch);
  float* const tabf = tabf_v.data();
  int16_t* const tq = tq_v.data();
  float* const invq = invq_v.data();
  // Small problems run on one thread: an OpenMP fork/join costs microseconds (far more when the cores
  // are shared) and would dominate a 576x576 layer.
  #pragma omp parallel for num_threads(nt) schedule(static) if (nch >= 64)
  for (int64_t c = 0; c < nch; ++c) {
    const int64_t j0 = c * LUT16_CHUNK, j1 = std::min(n, j0 + LUT16_CHUNK);
    __m512 mv = _mm512_setzero_ps();
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t g = j / S, s = j % S;
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; ++d) {
        const __m512 xv = _mm512_set1_ps(xr[g * D + d]);
        const float* cr = cbT + (s * D + d) * K;
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(cr + 16 * i), acc[i]);
      }
      float* row = tabf + j * K;
      for (int i = 0; i < 16; ++i) {
        mv = _mm512_max_ps(mv, _mm512_abs_ps(acc[i]));
        _mm512_storeu_ps(row + 16 * i, acc[i]);
      }
    }
    const float m = _mm512_reduce_max_ps(mv);
    const float q = m > 0.f ? 16383.f / m : 0.f;
    invq[c] = m > 0.f ? m / 16383.f : 0.f;
    const __m512 qv = _mm512_set1_ps(q);
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t k = 0; k < K; k += 16) {
        const __m512i iv = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(tabf + j * K + k), qv));
        _mm256_storeu_si256((__m256i*)(tq + j * K + k), _mm512_cvtepi32_epi16(iv));
      }
  }
  const int64_t nb = Opad / 32;
  #pragma omp parallel num_threads(nt) if (nb * n >= 16384)
  {
    int tid = 0, nthr = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nthr = omp_get_num_threads();
#endif
    const int64_t b0 = nb * tid / nthr, b1 = nb * (tid + 1) / nthr;
    const int64_t no = (b1 - b0) * 32;
    std::vector<int32_t> acc(no);
    float* y = yo + b0 * 32;
    for (int64_t i = 0; i < no; ++i) y[i] = 0.f;
    for (int64_t c = 0; c < nch && no > 0; ++c) {
      const int64_t j0 = c * LUT16_CHUNK, j1 = std::min(n, j0 + LUT16_CHUNK);
      std::fill(acc.begin(), acc.end(), 0);
      for (int64_t j = j0; j < j1; j += 2) {
        const bool pair = j + 1 < j1;
        __m512i TA[8], TB[8];
        for (int i = 0; i < 8; ++i) TA[i] = _mm512_loadu_si512(tq + j * K + 32 * i);
        if (pair)
          for (int i = 0; i < 8; ++i) TB[i] = _mm512_loadu_si512(tq + (j + 1) * K + 32 * i);
        const uint8_t* ca = ct + j * Opad + b0 * 32;
        const uint8_t* cbp = ct + (j + 1) * Opad + b0 * 32;
        for (int64_t b = 0; b < b1 - b0; ++b) {
          __m512i v = lookup256(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(ca + b * 32))), TA);
          if (pair)
            v = _mm512_add_epi16(v, lookup256(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(cbp + b * 32))), TB));
          int32_t* a = acc.data() + b * 32;
          _mm512_storeu_si512(a, _mm512_add_epi32(_mm512_loadu_si512(a), _mm512_cvtepi16_epi32(_mm512_castsi512_si256(v))));
          _mm512_storeu_si512(a + 16, _mm512_add_epi32(_mm512_loadu_si512(a + 16),
                                                       _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1))));
        }
      }
      const float iq = invq[c];
      for (int64_t i = 0; i < no; ++i) y[i] += (float)acc[i] * iq;
    }
  }
}
#endif

struct Prep {
  std::vector<float> cb, sc, xp;
  const float* cbp = nullptr;  // the float32 codebooks: the caller's own when given in float32 (no copy)
};
static thread_local Prep g_prep;

static void prep(Prep& p, const float* x, int64_t T, const void* cb, int cb_half, const void* sc, int sc_half,
                 int64_t O, int64_t G, int64_t S, int64_t K, int64_t D, int64_t in_features, bool keep_half = false) {
  if (keep_half) {
    p.cbp = nullptr;  // the kernel reads the fp16 table itself
  } else if (cb_half) {
    p.cb.resize(S * K * D);
    to_f32(cb, cb_half, S * K * D, p.cb.data());
    p.cbp = p.cb.data();
  } else {
    p.cbp = (const float*)cb;
  }
  p.sc.resize(O);
  to_f32(sc, sc_half, O, p.sc.data());
  if (x) {
    const int64_t Tp = (T + 7) / 8 * 8;
    p.xp.resize(Tp * G * D);
    pad_x(x, T, in_features, G * D, p.xp.data());
    std::fill(p.xp.begin() + T * G * D, p.xp.end(), 0.f);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Trellis-coded layers (rvqllm.rvq.trellis, packed walks). Column j of the layer is a little-endian bit
// string walks[j, 0:bpc); the state of row o is the L bits from bit k*o on, least significant first; its
// weight is table[(state * MUL + ADD) >> (32 - Q)] * scale[o] (32-bit wraparound). No read ever leaves a
// column's bpc bytes (columns are not padded): the portable path assembles a column's last words from the
// bytes that exist, the AVX-512 path reads its last windows so that they end with the column (and columns
// shorter than one window from a zero-padded copy).

static const uint32_t TRELLIS_MUL = 0x9E3779B1u, TRELLIS_ADD = 0x7F4A7C15u;

static inline int64_t trellis_bytes(int64_t out, int L, int k) { return (L + (int64_t)k * (out - 1) + 7) / 8; }

static inline bool trellis_bad(int64_t bpc, int64_t n, int64_t out, int L, int k, int Q) {
  if (L < 2 || L > 24 || k < 1 || k > 8 || Q < 1 || Q > 8 || n < 0 || out < 0) return true;
  return out > 0 && bpc != trellis_bytes(out, L, k);
}

// The 32 bits of a column starting at byte b (bytes at or past bpc read as zero). The byte-wise form is
// endian-neutral; compilers turn the unguarded branch into one load on little-endian machines.
static inline uint32_t trellis_word(const uint8_t* col, int64_t b, int64_t bpc) {
  if (b + 4 <= bpc)
    return (uint32_t)col[b] | ((uint32_t)col[b + 1] << 8) | ((uint32_t)col[b + 2] << 16) | ((uint32_t)col[b + 3] << 24);
  uint32_t w = 0;
  for (int64_t i = 0; b + i < bpc && i < 4; ++i) w |= (uint32_t)col[b + i] << (8 * i);
  return w;
}

// Row o of the weight times `mul` for all n columns into wr[n] (portable: any L, k, Q). Every column reads
// the same byte offset and shift for a given row, so whether the 4-byte load needs the guard is per row.
static void trellis_row(const uint8_t* walks, int64_t bpc, int64_t n, int64_t o, int L, int k, int Q,
                        const float* table, float mul, float* wr) {
  const int64_t bit = (int64_t)k * o, b = bit >> 3;
  const int sh = (int)(bit & 7), qs = 32 - Q;
  const uint32_t mask = (1u << L) - 1u;
  if (b + 4 <= bpc) {
    const uint8_t* c = walks + b;
    for (int64_t j = 0; j < n; ++j, c += bpc) {
      const uint32_t w = (uint32_t)c[0] | ((uint32_t)c[1] << 8) | ((uint32_t)c[2] << 16) | ((uint32_t)c[3] << 24);
      const uint32_t p = (w >> sh) & mask;
      wr[j] = table[(p * TRELLIS_MUL + TRELLIS_ADD) >> qs] * mul;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t p = (trellis_word(walks + j * bpc, b, bpc) >> sh) & mask;
      wr[j] = table[(p * TRELLIS_MUL + TRELLIS_ADD) >> qs] * mul;
    }
  }
}

// Threads for a job of `work` multiply-adds over `units` independent pieces: one below ~64K (a fork/join
// would cost more than it saves), never more than there are pieces.
static inline int trellis_threads(int threads, int64_t work, int64_t units) {
  int64_t nt = threads > 0 ? threads : 1;
  if (work < (int64_t)1 << 16) nt = 1;
  return (int)std::max<int64_t>(1, std::min<int64_t>(nt, units));
}

// Portable gemv: each thread takes a range of rows (a multiple of 16 but for the last), decodes one row at
// a time into a buffer of n weights and dots it with every token.
static void trellis_gemv_portable(const float* x, int64_t T, const uint8_t* walks, int64_t bpc, int64_t n,
                                  int64_t out, int L, int k, int Q, const float* table, const float* scale,
                                  float* y, int nt) {
  const int64_t nv = (out + 15) / 16;
  #pragma omp parallel num_threads(nt)
  {
    int tid = 0, nthr = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nthr = omp_get_num_threads();
#endif
    const int64_t r0 = 16 * (nv * tid / nthr), r1 = std::min(out, 16 * (nv * (tid + 1) / nthr));
    std::vector<float> wr(n);
    for (int64_t o = r0; o < r1; ++o) {
      trellis_row(walks, bpc, n, o, L, k, Q, table, 1.f, wr.data());
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = x + t * n;
        float part[16] = {0.f};  // 16 independent partial sums: the loop vectorises without -ffast-math
        int64_t j = 0;
        for (; j + 16 <= n; j += 16)
          for (int i = 0; i < 16; ++i) part[i] += wr[j + i] * xr[j + i];
        float s = 0.f;
        for (; j < n; ++j) s += wr[j] * xr[j];
        for (int i = 0; i < 16; ++i) s += part[i];
        y[t * out + o] = s * scale[o];
      }
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define RVQ_TRELLIS_AVX512 1
#if defined(__GNUC__)
#define RVQ_TRELLIS_VBMI 1  // the multishift decoder: compiled with a target attribute, run where cpuid allows
#endif
// AVX-512 decoding of 16 consecutive rows of one column at a time. 16 rows take 16 k bits, a whole number
// (2 k) of bytes, so every 16-row slice of a column starts at the same bit (`phase`, 0..7) of its first
// byte and all slices share one set of constants. A slice's 16 states come out of one broadcast load of a
// window of the walk, by one of two decoders:
//  * shuffle (AVX-512BW, k <= 6): a 16-byte window in each 128-bit lane; a byte shuffle gives every 32-bit
//    lane the four bytes that hold its row's state and a per-lane shift aligns it;
//  * multishift (AVX-512VBMI, checked at run time; used when 15 k + L <= 64): an 8-byte window in each
//    64-bit lane; one vpmultishiftqb gives every 32-bit lane the 32 bits from its state's first bit on.
// Then a mask leaves the L-bit state, a multiply-add and a shift its table index, and one two-register
// permute its codeword from the table padded to 32 entries (Q <= 5). A window that would run past the end
// of its column is read `lead` bytes earlier instead, with constants to match: it then ends with the
// column, and every state it holds is still inside it.
struct TrellisAvx {
  __m512i ctl, shift, mask, mul, add, qshift;
  __m512 lo, hi;
};

static inline bool trellis_avx_ok(int k, int Q) { return k <= 6 && Q <= 5; }

static bool trellis_has_vbmi() {
#if defined(RVQ_TRELLIS_VBMI)
  static const bool yes = __builtin_cpu_supports("avx512vbmi");
  return yes;
#else
  return false;
#endif
}

// Constants for slices whose first state starts at bit `phase` of the byte `lead` bytes into the window.
static TrellisAvx trellis_avx_setup(int L, int k, int Q, const float* table, int phase, int lead, bool multishift) {
  alignas(64) uint8_t cb[64];
  alignas(64) int32_t sv[16];
  alignas(64) float tab[32];
  for (int i = 0; i < 16; ++i) {
    const int pos = 8 * lead + phase + k * i;  // the first bit of row i's state within the window
    for (int q = 0; q < 4; ++q) cb[4 * i + q] = (uint8_t)(multishift ? (pos + 8 * q) & 63 : ((pos >> 3) + q) & 15);
    sv[i] = multishift ? 0 : pos & 7;
  }
  for (int i = 0; i < 32; ++i) tab[i] = i < (1 << Q) ? table[i] : 0.f;
  TrellisAvx c;
  c.ctl = _mm512_load_si512(cb);
  c.shift = _mm512_load_si512(sv);
  c.mask = _mm512_set1_epi32((int)((1u << L) - 1u));
  c.mul = _mm512_set1_epi32((int)TRELLIS_MUL);
  c.add = _mm512_set1_epi32((int)TRELLIS_ADD);
  c.qshift = _mm512_set1_epi32(32 - Q);
  c.lo = _mm512_load_ps(tab);
  c.hi = _mm512_load_ps(tab + 16);
  return c;
}

// The 16 states of a slice from its 16-byte window at p (shuffle decoder).
static inline __m512i trellis_avx_states(const TrellisAvx& c, const uint8_t* p) {
  const __m512i w = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p)), c.ctl);
  return _mm512_and_si512(_mm512_srlv_epi32(w, c.shift), c.mask);
}

#if defined(RVQ_TRELLIS_VBMI)
// The 16 states of a slice from its 8-byte window at p (multishift decoder).
__attribute__((target("avx512vbmi"))) static inline __m512i trellis_avx_states_ms(const TrellisAvx& c,
                                                                                 const uint8_t* p) {
  long long q;
  std::memcpy(&q, p, 8);
  return _mm512_and_si512(_mm512_multishift_epi64_epi8(c.ctl, _mm512_set1_epi64(q)), c.mask);
}
#endif

// Codewords (unscaled weights) of 16 states.
static inline __m512 trellis_avx_values(const TrellisAvx& c, __m512i s) {
  const __m512i idx = _mm512_srlv_epi32(_mm512_add_epi32(_mm512_mullo_epi32(s, c.mul), c.add), c.qshift);
  return _mm512_permutex2var_ps(c.lo, idx, c.hi);
}

// y[t, 16 v : 16 v + 16) for TT tokens, one slice: decoded once per column and multiplied with every token,
// the TT accumulators in registers across all n columns; xt is [n, TT] (token-minor) and the slice's window
// sits at byte `at` of every column. Used for the slices the streaming loop below cannot take (a window that
// would run past its column's end, read earlier with constants to match). Written once as a macro to be
// instantiated per decoder: the multishift one needs its target attribute on the whole loop.
#define RVQ_TRELLIS_BLOCK(NAME, ATTR, STATES)                                                                \
  template <int TT>                                                                                          \
  ATTR __attribute__((noinline)) static void NAME(const TrellisAvx& c, const float* xt, const uint8_t* walks, \
                                                  int64_t bpc, int64_t n, int64_t at, int64_t v,             \
                                                  const float* scale, int64_t out, float* y) {                \
    __m512 acc[TT];                                                                                          \
    _Pragma("GCC unroll 8") for (int t = 0; t < TT; ++t) acc[t] = _mm512_setzero_ps();                       \
    const uint8_t* col = walks + at;                                                                         \
    for (int64_t j = 0; j < n; ++j, col += bpc) {                                                            \
      const float* xj = xt + j * TT;                                                                         \
      const __m512 w = trellis_avx_values(c, STATES(c, col));                                                \
      _Pragma("GCC unroll 8") for (int t = 0; t < TT; ++t)                                                   \
        acc[t] = _mm512_fmadd_ps(w, _mm512_set1_ps(xj[t]), acc[t]);                                          \
    }                                                                                                        \
    const int64_t o = 16 * v;                                                                                \
    const __mmask16 m = out - o >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (out - o)) - 1u);             \
    const __m512 sc = _mm512_maskz_loadu_ps(m, scale + o);                                                   \
    _Pragma("GCC unroll 8") for (int t = 0; t < TT; ++t)                                                     \
      _mm512_mask_storeu_ps(y + t * out + o, m, _mm512_mul_ps(acc[t], sc));                                  \
  }

RVQ_TRELLIS_BLOCK(trellis_avx_block, , trellis_avx_states)
#if defined(RVQ_TRELLIS_VBMI)
RVQ_TRELLIS_BLOCK(trellis_avx_block_ms, __attribute__((target("avx512vbmi"))), trellis_avx_states_ms)
#endif

// Slices [v0, v1) for TT tokens, streaming the walks: columns [j0, j1) G at a time (j1 - j0 a multiple of
// G), each slice of the range decoded from the G columns and multiplied into acc [TT][v1 - v0] (16 floats
// each, kept short enough to stay in L1). The walks are read front to back, one column after another, which
// the hardware prefetchers follow. (Session 22's loop held 128 rows in registers and stepped through all n
// columns for them, a stride of bpc bytes between reads: two to four times slower on 7B-sized layers;
// docs/RESULTS.md "Session 23".) Every window of the range must lie inside its column. The constants are
// copied into locals: stores through acc could alias the reference (vector types may alias).
#define RVQ_TRELLIS_STREAM(NAME, ATTR, STATES)                                                               \
  template <int TT, int G>                                                                                   \
  ATTR __attribute__((noinline)) static void NAME(const TrellisAvx& cref, const float* xt, const uint8_t* walks, \
                                                  int64_t bpc, int64_t j0, int64_t j1, int64_t k2, int64_t v0, \
                                                  int64_t v1, __m512* acc) {                                 \
    const TrellisAvx c = cref;                                                                               \
    const int64_t nv = v1 - v0;                                                                              \
    for (int64_t j = j0; j < j1; j += G) {                                                                   \
      const uint8_t* col = walks + j * bpc + k2 * v0;                                                        \
      const float* xj = xt + j * TT;                                                                         \
      for (int64_t v = 0; v < nv; ++v, col += k2) {                                                          \
        __m512 w[G];                                                                                         \
        _Pragma("GCC unroll 8") for (int g = 0; g < G; ++g) w[g] = trellis_avx_values(c, STATES(c, col + g * bpc)); \
        _Pragma("GCC unroll 8") for (int t = 0; t < TT; ++t) {                                               \
          __m512 a = acc[t * nv + v];                                                                        \
          _Pragma("GCC unroll 8") for (int g = 0; g < G; ++g)                                                \
            a = _mm512_fmadd_ps(w[g], _mm512_set1_ps(xj[g * TT + t]), a);                                    \
          acc[t * nv + v] = a;                                                                               \
        }                                                                                                    \
      }                                                                                                      \
    }                                                                                                        \
  }

RVQ_TRELLIS_STREAM(trellis_avx_stream, , trellis_avx_states)
#if defined(RVQ_TRELLIS_VBMI)
RVQ_TRELLIS_STREAM(trellis_avx_stream_ms, __attribute__((target("avx512vbmi"))), trellis_avx_states_ms)
#endif

struct TrellisCode {
  int L, k, Q;
  const float* table;
};

template <int TT, int G, bool MS>
static inline void trellis_stream_call(const TrellisAvx& c, const float* xt, const uint8_t* walks, int64_t bpc,
                                       int64_t j0, int64_t j1, int64_t k2, int64_t v0, int64_t v1, __m512* acc) {
#if defined(RVQ_TRELLIS_VBMI)
  if constexpr (MS) {
    trellis_avx_stream_ms<TT, G>(c, xt, walks, bpc, j0, j1, k2, v0, v1, acc);
    return;
  }
#endif
  trellis_avx_stream<TT, G>(c, xt, walks, bpc, j0, j1, k2, v0, v1, acc);
}

template <int TT, bool MS>
static inline void trellis_avx_call(const TrellisAvx& c, const float* xt, const uint8_t* walks, int64_t bpc,
                                    int64_t n, int64_t at, int64_t v, const float* scale, int64_t out, float* y) {
#if defined(RVQ_TRELLIS_VBMI)
  if constexpr (MS) {
    trellis_avx_block_ms<TT>(c, xt, walks, bpc, n, at, v, scale, out, y);
    return;
  }
#endif
  trellis_avx_block<TT>(c, xt, walks, bpc, n, at, v, scale, out, y);
}

// Slices [vb, ve) of 16 rows for TT tokens: the slices whose windows lie inside their columns by the
// streaming loop, in chunks of CH slices (TT x CH x 64 bytes of accumulators, 24 KiB, stay in L1), then the
// last few (at most 8: their windows would run past the column's end) one at a time, each read from the
// column's last window with its own constants.
template <int TT, bool MS>
static void trellis_avx_range(const TrellisAvx& c, const TrellisCode& code, const float* xt, const uint8_t* walks,
                              int64_t bpc, int64_t n, int64_t vb, int64_t ve, const float* scale, int64_t out,
                              float* y) {
  constexpr int64_t W = MS ? 8 : 16;  // window bytes
  constexpr int64_t CH = 384 / TT, G = 8;
  const int64_t k2 = 2 * (int64_t)code.k, nG = n - n % G;
  const int64_t vsafe = std::min(ve, bpc >= W ? (bpc - W) / k2 + 1 : 0);
  static thread_local std::vector<__m512> acc;
  acc.resize((size_t)(TT * CH));
  for (int64_t v = vb; v < vsafe; v += CH) {
    const int64_t v1 = std::min(vsafe, v + CH), nv = v1 - v;
    std::fill(acc.begin(), acc.begin() + TT * nv, _mm512_setzero_ps());
    trellis_stream_call<TT, G, MS>(c, xt, walks, bpc, 0, nG, k2, v, v1, acc.data());
    if (nG < n) trellis_stream_call<TT, 1, MS>(c, xt, walks, bpc, nG, n, k2, v, v1, acc.data());
    for (int64_t u = v; u < v1; ++u) {
      const int64_t o = 16 * u;
      const __mmask16 m = out - o >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (out - o)) - 1u);
      const __m512 sc = _mm512_maskz_loadu_ps(m, scale + o);
      for (int t = 0; t < TT; ++t)
        _mm512_mask_storeu_ps(y + t * out + o, m, _mm512_mul_ps(acc[t * nv + (u - v)], sc));
    }
  }
  for (int64_t v = std::max(vb, vsafe); v < ve; ++v) {
    const TrellisAvx ct = trellis_avx_setup(code.L, code.k, code.Q, code.table, 0, (int)(k2 * v - (bpc - W)), MS);
    trellis_avx_call<TT, MS>(ct, xt, walks, bpc, n, bpc - W, v, scale, out, y);
  }
}

template <bool MS>
static void trellis_avx_tokens(int tc, const TrellisAvx& c, const TrellisCode& code, const float* xt,
                               const uint8_t* walks, int64_t bpc, int64_t n, int64_t vb, int64_t ve,
                               const float* scale, int64_t out, float* y) {
  switch (tc) {
    case 1: trellis_avx_range<1, MS>(c, code, xt, walks, bpc, n, vb, ve, scale, out, y); break;
    case 2: trellis_avx_range<2, MS>(c, code, xt, walks, bpc, n, vb, ve, scale, out, y); break;
    case 3: trellis_avx_range<3, MS>(c, code, xt, walks, bpc, n, vb, ve, scale, out, y); break;
    case 4: trellis_avx_range<4, MS>(c, code, xt, walks, bpc, n, vb, ve, scale, out, y); break;
    case 5: trellis_avx_range<5, MS>(c, code, xt, walks, bpc, n, vb, ve, scale, out, y); break;
    case 6: trellis_avx_range<6, MS>(c, code, xt, walks, bpc, n, vb, ve, scale, out, y); break;
    case 7: trellis_avx_range<7, MS>(c, code, xt, walks, bpc, n, vb, ve, scale, out, y); break;
    default: trellis_avx_range<8, MS>(c, code, xt, walks, bpc, n, vb, ve, scale, out, y); break;
  }
}

// Walks whose columns are shorter than a window, copied into zero-padded columns of `width` bytes.
static const uint8_t* trellis_pad(const uint8_t* walks, int64_t& bpc, int64_t n, int64_t width,
                                  std::vector<uint8_t>& buf) {
  if (bpc >= width) return walks;
  buf.assign((size_t)(n * width), 0);
  for (int64_t j = 0; j < n; ++j) std::memcpy(buf.data() + j * width, walks + j * bpc, (size_t)bpc);
  bpc = width;
  return buf.data();
}

static void trellis_gemv_avx(const float* x, int64_t T, const uint8_t* walks, int64_t bpc, int64_t n,
                             int64_t out, int L, int k, int Q, const float* table, const float* scale, float* y,
                             int nt) {
  const bool ms = 15 * k + L <= 64 && trellis_has_vbmi();
  std::vector<uint8_t> padded;
  walks = trellis_pad(walks, bpc, n, ms ? 8 : 16, padded);
  const TrellisAvx c = trellis_avx_setup(L, k, Q, table, 0, 0, ms);
  const TrellisCode code{L, k, Q, table};
  const int64_t nv = (out + 15) / 16;
  std::vector<float> xt(n * std::min<int64_t>(T, 8));
  for (int64_t t0 = 0; t0 < T; t0 += 8) {
    const int tc = (int)std::min<int64_t>(8, T - t0);
    for (int64_t j = 0; j < n; ++j)
      for (int t = 0; t < tc; ++t) xt[j * tc + t] = x[(t0 + t) * n + j];
    const float* xp = xt.data();
    float* yt = y + t0 * out;
    #pragma omp parallel num_threads(nt)
    {
      int tid = 0, nthr = 1;
#ifdef _OPENMP
      tid = omp_get_thread_num();
      nthr = omp_get_num_threads();
#endif
      const TrellisAvx cl = c;
      const int64_t vb = nv * tid / nthr, ve = nv * (tid + 1) / nthr;
      if (ms) trellis_avx_tokens<true>(tc, cl, code, xp, walks, bpc, n, vb, ve, scale, out, yt);
      else trellis_avx_tokens<false>(tc, cl, code, xp, walks, bpc, n, vb, ve, scale, out, yt);
    }
  }
}

// Transpose of a 16 x 16 block held as 16 vectors: afterwards r[i][j] is what r[j][i] was. Two rounds of
// in-lane unpacks turn each group of four vectors into 4 x 4 blocks, two rounds of 128-bit lane shuffles
// move the blocks into place.
static inline void trellis_transpose16(__m512 r[16]) {
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    const __m512 a0 = _mm512_unpacklo_ps(r[4 * g], r[4 * g + 1]), a1 = _mm512_unpackhi_ps(r[4 * g], r[4 * g + 1]);
    const __m512 b0 = _mm512_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]), b1 = _mm512_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
    // u[4 g + q], lane l: rows 4g..4g+3 of column 4 l + q
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a0), _mm512_castps_pd(b0)));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a0), _mm512_castps_pd(b0)));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a1), _mm512_castps_pd(b1)));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a1), _mm512_castps_pd(b1)));
  }
  for (int q = 0; q < 4; ++q) {
    // column 4 l + q gathers lane l of u[q], u[4 + q], u[8 + q], u[12 + q]
    const __m512 p0 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0x44), p1 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0xEE);
    const __m512 p2 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0x44), p3 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0xEE);
    r[q] = _mm512_shuffle_f32x4(p0, p2, 0x88);
    r[4 + q] = _mm512_shuffle_f32x4(p0, p2, 0xDD);
    r[8 + q] = _mm512_shuffle_f32x4(p1, p3, 0x88);
    r[12 + q] = _mm512_shuffle_f32x4(p1, p3, 0xDD);
  }
}

// Rows [o0, o1) of the scaled weight into w [(o1 - o0), n]: blocks of 16 rows x 16 columns, each column's
// 16 rows decoded as one vector (shuffle decoder) and scaled, the block transposed and stored as 16 row
// pieces. Strips of 16 rows whose window would run past the column's end get their own constants.
static void trellis_rows_avx(const uint8_t* walks, int64_t bpc, int64_t n, int L, int k, int Q, const float* table,
                             const float* scale, int64_t o0, int64_t o1, float* w, int nt) {
  std::vector<uint8_t> padded;
  walks = trellis_pad(walks, bpc, n, 16, padded);
  const int64_t bit0 = (int64_t)k * o0, k2 = 2 * (int64_t)k;
  const int phase = (int)(bit0 & 7);
  const int64_t rows = o1 - o0, S = (rows + 15) / 16, CB = (n + 15) / 16;
  // strips [0, s_safe) read their window in place; later ones (at most 8) from the column's last 16 bytes
  const int64_t room = bpc - 16 - (bit0 >> 3);
  const int64_t s_safe = room < 0 ? 0 : std::min<int64_t>(S, room / k2 + 1);
  std::vector<TrellisAvx> cs((size_t)(S - s_safe + 1));
  cs[0] = trellis_avx_setup(L, k, Q, table, phase, 0, false);
  for (int64_t s = s_safe; s < S; ++s)
    cs[(size_t)(s - s_safe + 1)] = trellis_avx_setup(L, k, Q, table, phase, (int)((bit0 >> 3) + k2 * s - (bpc - 16)), false);
  const TrellisAvx* csp = cs.data();
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t task = 0; task < S * CB; ++task) {
    const int64_t s = task / CB, cb = task % CB;
    const bool tail = s >= s_safe;
    const TrellisAvx& c = csp[tail ? s - s_safe + 1 : 0];
    const int64_t at = tail ? bpc - 16 : (bit0 >> 3) + k2 * s;  // the strip's window in each column
    const int nr = (int)std::min<int64_t>(16, rows - 16 * s), nc = (int)std::min<int64_t>(16, n - 16 * cb);
    const __mmask16 mr = nr == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1u);
    const __mmask16 mc = nc == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nc) - 1u);
    const __m512 sc = _mm512_maskz_loadu_ps(mr, scale + o0 + 16 * s);
    __m512 r[16];
    const uint8_t* col = walks + 16 * cb * bpc + at;
    for (int q = 0; q < 16; ++q, col += bpc)
      r[q] = q < nc ? _mm512_mul_ps(trellis_avx_values(c, trellis_avx_states(c, col)), sc) : _mm512_setzero_ps();
    trellis_transpose16(r);
    float* dst = w + 16 * s * n + 16 * cb;
    for (int q = 0; q < nr; ++q) _mm512_mask_storeu_ps(dst + q * n, mc, r[q]);
  }
}
#endif

#define DISPATCH_D(FN, C, ...)                                    \
  do {                                                            \
    if (D == 8) FN<C, 8>(__VA_ARGS__);                            \
    else if (D == 4) FN<C, 4>(__VA_ARGS__);                       \
    else FN<C, 0>(__VA_ARGS__);                                   \
  } while (0)

extern "C" {

int rvq_abi_version() { return 2; }

float rvq_h2f(uint16_t h) { return h2f(h); }

void rvq_gemv_lut(const float* x, int64_t T, const void* codes, int code16, const void* cb, int cb_half,
                  const void* sc, int sc_half, const void* bias, int bias_half, int64_t O, int64_t G,
                  int64_t S, int64_t K, int64_t D, int64_t in_features, float* y, int nt) {
  Prep& p = g_prep;
  prep(p, x, T, cb, cb_half, sc, sc_half, O, G, S, K, D, in_features);
  if (code16) lut_impl<uint16_t>(p.xp.data(), T, (const uint16_t*)codes, p.cbp, p.sc.data(), O, G, S, K, D, y, nt);
  else lut_impl<uint8_t>(p.xp.data(), T, (const uint8_t*)codes, p.cbp, p.sc.data(), O, G, S, K, D, y, nt);
  finish(y, T, O, p.sc.data(), bias, bias_half, nt);
}

void rvq_gemv_decode(const float* x, int64_t T, const void* codes, int code16, const void* cb, int cb_half,
                     const void* sc, int sc_half, const void* bias, int bias_half, int64_t O, int64_t G,
                     int64_t S, int64_t K, int64_t D, int64_t in_features, float* y, int nt) {
  Prep& p = g_prep;
#if defined(RVQ_HALF8)
  if (cb_half && D == 8) {
    prep(p, x, T, cb, cb_half, sc, sc_half, O, G, S, K, D, in_features, true);
    if (code16) decode_h8_impl<uint16_t>(p.xp.data(), T, (const uint16_t*)codes, (const uint16_t*)cb, O, G, S, K, y, nt);
    else decode_h8_impl<uint8_t>(p.xp.data(), T, (const uint8_t*)codes, (const uint16_t*)cb, O, G, S, K, y, nt);
    finish(y, T, O, p.sc.data(), bias, bias_half, nt);
    return;
  }
#endif
  prep(p, x, T, cb, cb_half, sc, sc_half, O, G, S, K, D, in_features);
  if (code16) DISPATCH_D(decode_impl, uint16_t, p.xp.data(), T, (const uint16_t*)codes, p.cbp, p.sc.data(), O, G, S, K, D, y, nt);
  else DISPATCH_D(decode_impl, uint8_t, p.xp.data(), T, (const uint8_t*)codes, p.cbp, p.sc.data(), O, G, S, K, D, y, nt);
  finish(y, T, O, p.sc.data(), bias, bias_half, nt);
}

void rvq_dequant_rows(const void* codes, int code16, const void* cb, int cb_half, const void* sc, int sc_half,
                      int64_t O, int64_t G, int64_t S, int64_t K, int64_t D, int64_t in_features,
                      int64_t o0, int64_t o1, float* w, int nt) {
  Prep& p = g_prep;
#if defined(RVQ_HALF8)
  if (cb_half && D == 8) {
    prep(p, nullptr, 0, cb, cb_half, sc, sc_half, O, G, S, K, D, in_features, true);
    if (code16) dequant_h8_impl<uint16_t>((const uint16_t*)codes, (const uint16_t*)cb, p.sc.data(), G, S, K, in_features, o0, o1, w, nt);
    else dequant_h8_impl<uint8_t>((const uint8_t*)codes, (const uint16_t*)cb, p.sc.data(), G, S, K, in_features, o0, o1, w, nt);
    return;
  }
#endif
  prep(p, nullptr, 0, cb, cb_half, sc, sc_half, O, G, S, K, D, in_features);
  if (code16) DISPATCH_D(dequant_impl, uint16_t, (const uint16_t*)codes, p.cbp, p.sc.data(), G, S, K, D, in_features, o0, o1, w, nt);
  else DISPATCH_D(dequant_impl, uint8_t, (const uint8_t*)codes, p.cbp, p.sc.data(), G, S, K, D, in_features, o0, o1, w, nt);
}

// 1 when the decode kernels read d = 8 fp16 codebooks as they are (F16C), 0 when they convert them first.
int rvq_reads_half8() {
#if defined(RVQ_HALF8)
  return 1;
#else
  return 0;
#endif
}

int rvq_has_lut16() {
#if defined(__AVX512BW__)
  return 1;
#else
  return 0;
#endif
}

// ct: codes repacked to [G*S, Opad] uint8; cbT: codebooks as float32 [S, D, 256] (K must be 256).
// Returns 0, or -1 when not compiled in.
int rvq_gemv_lut16(const float* x, int64_t T, const uint8_t* ct, int64_t Opad, const float* cbT,
                   const void* sc, int sc_half, const void* bias, int bias_half, int64_t O, int64_t G,
                   int64_t S, int64_t D, int64_t in_features, float* y, int nt) {
#if defined(__AVX512BW__)
  Prep& p = g_prep;
  p.sc.resize(O);
  to_f32(sc, sc_half, O, p.sc.data());
  const int64_t GD = G * D;
  p.xp.resize(GD);
  static thread_local std::vector<float> yb;
  yb.resize(Opad);
  for (int64_t t = 0; t < T; ++t) {
    pad_x(x + t * in_features, 1, in_features, GD, p.xp.data());
    lut16_token(p.xp.data(), ct, Opad, cbT, G, S, D, yb.data(), nt);
    std::memcpy(y + t * O, yb.data(), O * sizeof(float));
  }
  finish(y, T, O, p.sc.data(), bias, bias_half, nt);
  return 0;
#else
  return -1;
#endif
}

// Viterbi for the bitshift trellis: for each of B walks of T steps, the states s_t in [0, 2^L) with
// s_t = ((s_{t-1} << k) | b_t) mod 2^L minimising sum_t wt_t (x_t - values[s_t])^2 (wt null: all 1).
// The predecessors of s are (s >> k) + j * 2^(L-k), j < 2^k: the same 2^k for the 2^k states that share
// s >> k, so each step takes one min over 2^k contiguous slices, then adds every state's own cost.
// Ties go to the lowest predecessor and the lowest final state. x, wt: [B, T] float32; values: [2^L];
// states: [B, T] int32 out. Returns 0, -1 on bad sizes, -2 if the back-pointers could not be allocated.
int rvq_trellis_viterbi(const float* x, const float* wt, int64_t B, int64_t T, int L, int k,
                        const float* values, int32_t* states, int nt) {
  if (L < 2 || L > 24 || k < 1 || k > 8 || k >= L || T < 1 || B < 0) return -1;
  const int64_t N = int64_t(1) << L, K = int64_t(1) << k, M = N >> k;
  int bad = 0;
#pragma omp parallel num_threads(nt > 0 ? nt : 1)
  {
    std::vector<float> cost, next, best;
    std::vector<uint8_t> back;
    try {
      cost.resize(N); next.resize(N); best.resize(M); back.resize((size_t)T * M);
    } catch (...) {
#pragma omp atomic write
      bad = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      if (back.size() != (size_t)T * M) continue;
      const float* xb = x + b * T;
      const float* wb = wt ? wt + b * T : nullptr;
      float x0 = xb[0], w0 = wb ? wb[0] : 1.0f;
      for (int64_t s = 0; s < N; ++s) { float d = x0 - values[s]; cost[s] = w0 * d * d; }
      for (int64_t t = 1; t < T; ++t) {
        uint8_t* bk = back.data() + t * M;
        float* bs = best.data();
        const float* c0 = cost.data();
        for (int64_t m = 0; m < M; ++m) { bs[m] = c0[m]; bk[m] = 0; }
        for (int64_t j = 1; j < K; ++j) {
          const float* cj = c0 + j * M;
          const uint8_t jj = (uint8_t)j;
          for (int64_t m = 0; m < M; ++m) {
            bool lt = cj[m] < bs[m];
            bs[m] = lt ? cj[m] : bs[m];
            bk[m] = lt ? jj : bk[m];
          }
        }
        const float xt = xb[t], wt_ = wb ? wb[t] : 1.0f;
        float* nx = next.data();
        for (int64_t m = 0; m < M; ++m) {
          const float bm = bs[m];
          const float* v = values + m * K;
          float* o = nx + m * K;
          for (int64_t q = 0; q < K; ++q) { float d = xt - v[q]; o[q] = bm + wt_ * d * d; }
        }
        cost.swap(next);
      }
      int64_t s = 0;
      for (int64_t i = 1; i < N; ++i) if (cost[i] < cost[s]) s = i;
      int32_t* out = states + b * T;
      out[T - 1] = (int32_t)s;
      for (int64_t t = T - 1; t > 0; --t) {
        const int64_t m = s >> k;
        s = m + (int64_t)back[t * M + m] * M;
        out[t - 1] = (int32_t)s;
      }
    }
  }
  return bad ? -2 : 0;
}

// 1 when the trellis kernels have their AVX-512 path compiled in.
int rvq_trellis_has_avx512() {
#if defined(RVQ_TRELLIS_AVX512)
  return 1;
#else
  return 0;
#endif
}

// 1 when rvq_trellis_gemv / rvq_trellis_decode_rows take the AVX-512 path for these parameters (compiled
// in, k <= 6, Q <= 5), 0 when they take the portable one.
int rvq_trellis_fast_path(int L, int k, int Q) {
#if defined(RVQ_TRELLIS_AVX512)
  return L >= 2 && L <= 24 && k >= 1 && trellis_avx_ok(k, Q) && Q >= 1 ? 1 : 0;
#else
  (void)L; (void)k; (void)Q;
  return 0;
#endif
}

// y [T, out] = x [T, n] @ W.T for a trellis-coded layer (walks [n, bpc], bpc = ceil((L + k (out - 1)) / 8);
// table [2^Q]; scale [out]; all float32 but walks), for a few tokens: the weight is decoded once per call and
// multiplied with every token (AVX-512: up to 8 tokens per decode, then again for the next 8). Threads take
// ranges of rows. Every element of y is written. Returns 0, or -1 on bad sizes.
int rvq_trellis_gemv(const float* x, int64_t T, const uint8_t* walks, int64_t bpc, int64_t n, int64_t out, int L,
                     int k, int Q, const float* table, const float* scale, float* y, int threads) {
  if (trellis_bad(bpc, n, out, L, k, Q) || T < 0) return -1;
  if (T == 0 || out == 0) return 0;
  if (n == 0) {
    std::fill(y, y + T * out, 0.f);
    return 0;
  }
  const int nt = trellis_threads(threads, out * n * T, (out + 15) / 16);
#if defined(RVQ_TRELLIS_AVX512)
  if (trellis_avx_ok(k, Q)) {
    trellis_gemv_avx(x, T, walks, bpc, n, out, L, k, Q, table, scale, y, nt);
    return 0;
  }
#endif
  trellis_gemv_portable(x, T, walks, bpc, n, out, L, k, Q, table, scale, y, nt);
  return 0;
}

// w [(o1 - o0), n] (row-major float32) = rows [o0, o1) of the scaled weight of a trellis-coded layer (sizes
// as in rvq_trellis_gemv), for the many-token path: decode a tile of rows, then a BLAS matmul on it.
// Returns 0, or -1 on bad sizes.
int rvq_trellis_decode_rows(const uint8_t* walks, int64_t bpc, int64_t n, int64_t out, int L, int k, int Q,
                            const float* table, const float* scale, int64_t o0, int64_t o1, float* w,
                            int threads) {
  if (trellis_bad(bpc, n, out, L, k, Q) || o0 < 0 || o1 < o0 || o1 > out) return -1;
  if (o1 == o0 || n == 0) return 0;
  const int64_t rows = o1 - o0;
#if defined(RVQ_TRELLIS_AVX512)
  if (trellis_avx_ok(k, Q)) {
    trellis_rows_avx(walks, bpc, n, L, k, Q, table, scale, o0, o1, w,
                     trellis_threads(threads, rows * n, ((rows + 15) / 16) * ((n + 15) / 16)));
    return 0;
  }
#endif
  const int nt = trellis_threads(threads, rows * n, rows);
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = o0; o < o1; ++o) trellis_row(walks, bpc, n, o, L, k, Q, table, scale[o], w + (o - o0) * n);
  return 0;
}

}  // extern "C"
"""
