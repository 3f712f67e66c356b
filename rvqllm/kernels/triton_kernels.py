"""GPU path: Triton kernels (imported lazily; rvqllm never needs Triton to import).

* :func:`fused_linear` — few tokens: each program decodes a ``[BLOCK_O, BLOCK_I]`` tile of the weight
  from codes and codebooks in registers and multiplies it with a ``[BLOCK_T, BLOCK_I]`` tile of ``x``
  (``tl.dot``), accumulating in fp32; the weight never exists in memory.
* :func:`dequant_linear` — many tokens: a Triton kernel decodes the weight to ``x.dtype`` (fp16/bf16/
  fp32), then ``F.linear`` runs on cuBLAS; compute-bound, so the decode is amortised.

Both also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how CI (no GPU) tests them.
Shapes: ``x [T, in_features]``, ``codes [out, G, S]`` uint8/int16, ``codebooks [S, K, d]``, ``scales [out]``,
``bias [out]`` or None → ``[T, out]`` in ``x.dtype``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _accumulate(acc, x_ptr, w, offs_t, offs_i, m_t, m_i, IN, IEEE: tl.constexpr):
    """``acc [BT, BO] += x[offs_t, offs_i] @ w.T`` for a decoded float32 weight tile ``w [BO, BI]``: fp32
    (IEEE) for fp32 activations, else in the activations' dtype."""
    xv = tl.load(x_ptr + offs_t[:, None] * IN + offs_i[None, :], mask=m_t[:, None] & m_i[None, :], other=0.0)
    if IEEE:
        return acc + tl.dot(xv.to(tl.float32), tl.trans(w), input_precision="ieee")
    return acc + tl.dot(xv, tl.trans(w).to(xv.dtype))


@triton.jit
def _finish(acc, sc_ptr, bias_ptr, y_ptr, offs_t, offs_o, m_t, m_o, NOUT, HAS_BIAS: tl.constexpr):
    """Scale the rows of ``acc [BT, BO]``, add the bias, store into ``y [T, NOUT]`` (the fused kernels' end)."""
    sc = tl.load(sc_ptr + offs_o, mask=m_o, other=0.0).to(tl.float32)
    acc = acc * sc[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=m_o, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * NOUT + offs_o[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_o[None, :])


@triton.jit
def _fused_kernel(x_ptr, codes_ptr, cb_ptr, sc_ptr, bias_ptr, y_ptr, T, NOUT, IN, G, K,
                  S: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_o = offs_o < NOUT
    m_t = offs_t < T
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        m_i = offs_i < IN
        grp = offs_i // D
        dd = offs_i % D
        m_w = m_o[:, None] & m_i[None, :]
        w = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for s in tl.static_range(S):
            c = tl.load(codes_ptr + (offs_o[:, None] * G + grp[None, :]) * S + s, mask=m_w, other=0)
            c = c.to(tl.int32) & 0xFFFF
            w += tl.load(cb_ptr + (s * K + c) * D + dd[None, :], mask=m_w, other=0.0).to(tl.float32)
        acc = _accumulate(acc, x_ptr, w, offs_t, offs_i, m_t, m_i, IN, IEEE)
    _finish(acc, sc_ptr, bias_ptr, y_ptr, offs_t, offs_o, m_t, m_o, NOUT, HAS_BIAS)


@triton.jit
def _dequant_kernel(codes_ptr, cb_ptr, sc_ptr, w_ptr, NOUT, IN, G, K,
                    S: tl.constexpr, D: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    m = (offs_o < NOUT)[:, None] & (offs_i < IN)[None, :]
    grp = offs_i // D
    dd = offs_i % D
    w = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for s in tl.static_range(S):
        c = tl.load(codes_ptr + (offs_o[:, None] * G + grp[None, :]) * S + s, mask=m, other=0)
        c = c.to(tl.int32) & 0xFFFF
        w += tl.load(cb_ptr + (s * K + c) * D + dd[None, :], mask=m, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptr + offs_o, mask=offs_o < NOUT, other=0.0).to(tl.float32)
    w = w * sc[:, None]
    tl.store(w_ptr + offs_o[:, None] * IN + offs_i[None, :], w.to(w_ptr.dtype.element_ty), mask=m)


def fused_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
                 in_features: int, out: Tensor | None = None) -> Tensor:
    """Fused decode + matmul (few tokens). ``out`` (``[T, out]``, ``x.dtype``) may be uninitialised."""
    x = x.contiguous()
    o, g, s = codes.shape
    k, d = codebooks.shape[1], codebooks.shape[2]
    t = x.shape[0]
    if out is None:
        out = torch.empty(t, o, dtype=x.dtype, device=x.device)
    block_t, block_o, block_i = 16, 64, 64
    grid = (triton.cdiv(o, block_o), triton.cdiv(t, block_t))
    _fused_kernel[grid](x, codes.contiguous(), codebooks.contiguous(), scales.contiguous(),
                        bias if bias is not None else scales, out, t, o, in_features, g, k,
                        S=s, D=d, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                        BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_I=block_i)
    return out


def dequantize_triton(codes: Tensor, codebooks: Tensor, scales: Tensor, in_features: int,
                      dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """Decode the whole scaled weight ``[out, in_features]`` in ``dtype`` (the GPU many-token path)."""
    o, g, s = codes.shape
    k, d = codebooks.shape[1], codebooks.shape[2]
    if out is None:
        out = torch.empty(o, in_features, dtype=dtype, device=codes.device)
    block_o, block_i = 32, 128
    grid = (triton.cdiv(o, block_o), triton.cdiv(in_features, block_i))
    _dequant_kernel[grid](codes.contiguous(), codebooks.contiguous(), scales.contiguous(), out, o, in_features,
                          g, k, S=s, D=d, BLOCK_O=block_o, BLOCK_I=block_i)
    return out


def dequant_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
                   in_features: int, out: Tensor | None = None) -> Tensor:
    """Many tokens: decode to ``x.dtype`` with Triton, then ``F.linear`` (cuBLAS on a GPU)."""
    w = dequantize_triton(codes, codebooks, scales, in_features, x.dtype)
    y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    if out is not None:
        out.copy_(y)
        return out
    return y


# ---------------------------------------------------------------------------------------------------------
# Trellis-coded layers (config ``coder: trellis``): ``walks [n, bpc]`` uint8 packed walks (column ``j``'s
# walk down the ``out`` rows; row ``o``'s state the ``L`` bits from bit ``k o`` of the column's little-endian
# bit string), ``table [2**Q]``, ``scales [out]``; ``W[o, j] = table[hash(state) >> (32 - Q)] * scales[o]``
# (:func:`rvqllm.rvq.trellis.walk_dequantize` is the oracle). A state spans at most 4 bytes (``L + 7 <= 32``
# for ``L <= 24`` and any start bit), so each weight of a tile costs four byte loads, shifts, one multiply
# and a gather from the small table (in L1/L2).


@triton.jit
def _trellis_tile(walks_ptr, table_ptr, offs_o, offs_i, m, BPC, L: tl.constexpr, K: tl.constexpr,
                  Q: tl.constexpr):
    """``[BLOCK_O, BLOCK_I]`` float32 codewords (unscaled) of rows ``offs_o`` and columns ``offs_i``."""
    bit = offs_o[:, None].to(tl.int64) * K  # [BO, 1]
    byte0 = bit >> 3
    base = offs_i[None, :].to(tl.int64) * BPC + byte0  # [BO, BI]
    word = tl.zeros(base.shape, dtype=tl.int64)
    for b in tl.static_range(4):
        mb = m & (byte0 + b < BPC)
        word |= tl.load(walks_ptr + base + b, mask=mb, other=0).to(tl.int64) << (8 * b)
    state = (word >> (bit & 7)) & ((1 << L) - 1)
    h = (state * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
    return tl.load(table_ptr + (h >> (32 - Q)), mask=m, other=0.0).to(tl.float32)


@triton.jit
def _trellis_fused_kernel(x_ptr, walks_ptr, table_ptr, sc_ptr, bias_ptr, y_ptr, T, NOUT, IN, BPC,
                          L: tl.constexpr, K: tl.constexpr, Q: tl.constexpr, HAS_BIAS: tl.constexpr,
                          IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_o = offs_o < NOUT
    m_t = offs_t < T
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        m_i = offs_i < IN
        w = _trellis_tile(walks_ptr, table_ptr, offs_o, offs_i, m_o[:, None] & m_i[None, :], BPC, L, K, Q)
        acc = _accumulate(acc, x_ptr, w, offs_t, offs_i, m_t, m_i, IN, IEEE)
    _finish(acc, sc_ptr, bias_ptr, y_ptr, offs_t, offs_o, m_t, m_o, NOUT, HAS_BIAS)


@triton.jit
def _trellis_dequant_kernel(walks_ptr, table_ptr, sc_ptr, w_ptr, NOUT, IN, BPC, L: tl.constexpr, K: tl.constexpr,
                            Q: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    m = (offs_o < NOUT)[:, None] & (offs_i < IN)[None, :]
    w = _trellis_tile(walks_ptr, table_ptr, offs_o, offs_i, m, BPC, L, K, Q)
    sc = tl.load(sc_ptr + offs_o, mask=offs_o < NOUT, other=0.0).to(tl.float32)
    tl.store(w_ptr + offs_o[:, None] * IN + offs_i[None, :], (w * sc[:, None]).to(w_ptr.dtype.element_ty), mask=m)


def trellis_fused_linear(x: Tensor, walks: Tensor, table: Tensor, scales: Tensor, bias: Tensor | None,
                         state_bits: int, step_bits: int, lut_bits: int, out: Tensor | None = None) -> Tensor:
    """Trellis layer, few tokens: decode + ``tl.dot`` per tile. ``x [T, n]`` → ``[T, out]`` in ``x.dtype``."""
    x = x.contiguous()
    n, bpc = walks.shape
    o, t = scales.shape[0], x.shape[0]
    if out is None:
        out = torch.empty(t, o, dtype=x.dtype, device=x.device)
    block_t, block_o, block_i = 16, 64, 64
    grid = (triton.cdiv(o, block_o), triton.cdiv(t, block_t))
    _trellis_fused_kernel[grid](x, walks.contiguous(), table.contiguous(), scales.contiguous(),
                                bias if bias is not None else scales, out, t, o, n, bpc, L=state_bits, K=step_bits,
                                Q=lut_bits, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                                BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_I=block_i)
    return out


def trellis_dequantize(walks: Tensor, table: Tensor, scales: Tensor, state_bits: int, step_bits: int,
                       lut_bits: int, dtype: torch.dtype) -> Tensor:
    """A trellis layer's whole scaled weight ``[out, n]`` in ``dtype`` (the GPU many-token path)."""
    n, bpc = walks.shape
    o = scales.shape[0]
    w = torch.empty(o, n, dtype=dtype, device=walks.device)
    block_o, block_i = 32, 128
    grid = (triton.cdiv(o, block_o), triton.cdiv(n, block_i))
    _trellis_dequant_kernel[grid](walks.contiguous(), table.contiguous(), scales.contiguous(), w, o, n, bpc,
                                  L=state_bits, K=step_bits, Q=lut_bits, BLOCK_O=block_o, BLOCK_I=block_i)
    return w


def trellis_dequant_linear(x: Tensor, walks: Tensor, table: Tensor, scales: Tensor, bias: Tensor | None,
                           state_bits: int, step_bits: int, lut_bits: int, out: Tensor | None = None) -> Tensor:
    """Trellis layer, many tokens: decode to ``x.dtype`` with Triton, then ``F.linear`` (cuBLAS on a GPU)."""
    w = trellis_dequantize(walks, table, scales, state_bits, step_bits, lut_bits, x.dtype)
    y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    if out is not None:
        out.copy_(y)
        return out
    return y
