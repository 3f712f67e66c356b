"""CPU fast path: thin Python wrappers around the compiled kernels of :mod:`.cpu_source`.

Each wrapper takes 2-D float32 activations ``x [T, in_features]`` and the layer's buffers as stored
(``codes [out, in_groups, stages]`` uint8/int16, ``codebooks [stages, K, d]`` and ``scales [out]`` in fp16
or fp32, ``bias [out]`` or None) and writes ``out [T, out]`` float32, which it returns. Every element of
``out`` is written (callers may pass an uninitialised buffer).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

from .cpu_build import load_library

MAX_VECTOR_DIM = 64  # the C++ kernels keep one decoded vector on the stack


def available() -> bool:
    """True when the compiled kernels loaded (builds them on first call; warns once if it cannot)."""
    return load_library() is not None


def _half_flag(t: Tensor) -> tuple[Tensor, int]:
    if t.dtype == torch.float16:
        return t.contiguous(), 1
    return t.float().contiguous(), 0


#: fp16 codebooks of at least this many values that the kernels cannot read as stored go to them as a
#: cached float32 copy
LARGE_CODEBOOK = 1 << 16


def reads_half8(codebooks: Tensor) -> bool:
    """True when the decode kernels read these (d = 8, fp16) codebooks as they are stored (F16C build)."""
    lib = load_library()
    return (codebooks.dtype == torch.float16 and codebooks.shape[-1] == 8 and lib is not None
            and bool(lib.rvq_reads_half8()))


def _float_codebooks(codebooks: Tensor) -> tuple[Tensor, int]:
    """``codebooks`` for the kernels: small ones and ``d = 8`` fp16 ones the decode kernels read as stored
    (:func:`reads_half8`) as they are; other large fp16 ones (``d != 8``, or a build without F16C) as a
    float32 copy kept on the tensor itself and made again only when the tensor changes in place (its
    version counter), so a table shared by every layer is converted once, not at every call of every layer
    (the kernel reads float32 as it is)."""
    if codebooks.dtype != torch.float16 or codebooks.numel() < LARGE_CODEBOOK or reads_half8(codebooks):
        return _half_flag(codebooks)
    try:  # the storage too: a deep copy carries the attribute but has its own storage and counter
        version = (codebooks._version, codebooks.data_ptr())
    except RuntimeError:  # an inference-mode tensor keeps no version: convert every call
        return codebooks.float().contiguous(), 0
    cached = getattr(codebooks, "_rvq_float32", None)
    if cached is None or cached[0] != version:
        cached = (version, codebooks.float().contiguous())
        codebooks._rvq_float32 = cached
    return cached[1], 0


def _common(codes: Tensor, codebooks: Tensor, scales: Tensor):
    codes = codes.contiguous()
    cb, cb_half = _float_codebooks(codebooks)
    sc, sc_half = _half_flag(scales)
    return codes, int(codes.dtype == torch.int16), cb, cb_half, sc, sc_half


def _gemv(fn_name: str, x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
          in_features: int, out: Tensor | None) -> Tensor:
    lib = load_library()
    assert lib is not None, "CPU kernels unavailable; dispatch should not have chosen this path"
    x = x.float().contiguous()
    o, g, s = codes.shape
    k, d = codebooks.shape[1], codebooks.shape[2]
    assert d <= MAX_VECTOR_DIM and x.shape[-1] == in_features and x.dim() == 2
    t = x.shape[0]
    codes, c16, cb, cb_half, sc, sc_half = _common(codes, codebooks, scales)
    if bias is not None:
        bias, b_half = _half_flag(bias)
    if out is None:
        out = torch.empty(t, o, dtype=torch.float32)
    assert out.shape == (t, o) and out.dtype == torch.float32 and out.is_contiguous()
    getattr(lib, fn_name)(
        x.data_ptr(), t, codes.data_ptr(), c16, cb.data_ptr(), cb_half, sc.data_ptr(), sc_half,
        None if bias is None else bias.data_ptr(), 0 if bias is None else b_half,
        o, g, s, k, d, in_features, out.data_ptr(), torch.get_num_threads(),
    )
    return out


def lut_gemv(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
             in_features: int, out: Tensor | None = None) -> Tensor:
    """Lookup-table kernel (best for few tokens and K <= 256). Shapes: see module docstring."""
    return _gemv("rvq_gemv_lut", x, codes, codebooks, scales, bias, in_features, out)


def decode_gemv(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
                in_features: int, out: Tensor | None = None) -> Tensor:
    """Fused decode-dot kernel (few tokens, any K). Shapes: see module docstring."""
    return _gemv("rvq_gemv_decode", x, codes, codebooks, scales, bias, in_features, out)


def dequantize_rows(codes: Tensor, codebooks: Tensor, scales: Tensor, in_features: int, o0: int, o1: int,
                    out: Tensor) -> Tensor:
    """Decode rows ``[o0, o1)`` of the scaled weight into ``out[:o1-o0]`` (float32 ``[>= o1-o0, in]``)."""
    lib = load_library()
    assert lib is not None
    o, g, s = codes.shape
    k, d = codebooks.shape[1], codebooks.shape[2]
    assert out.is_contiguous() and out.dtype == torch.float32 and out.shape[1] == in_features
    assert 0 <= o0 <= o1 <= o and out.shape[0] >= o1 - o0
    codes, c16, cb, cb_half, sc, sc_half = _common(codes, codebooks, scales)
    lib.rvq_dequant_rows(codes.data_ptr(), c16, cb.data_ptr(), cb_half, sc.data_ptr(), sc_half,
                         o, g, s, k, d, in_features, o0, o1, out.data_ptr(), torch.get_num_threads())
    return out


TILE_FLOATS = 1 << 20  # 4 MiB of decoded weight per tile
_scratch = threading.local()


def _tile_buffer(rows: int, cols: int) -> Tensor:
    """A reused per-thread float32 scratch ``[rows, cols]`` (at most ``TILE_FLOATS`` + one row): a fresh
    multi-MiB allocation per call would cost page faults comparable to a small layer's matmul."""
    n = rows * cols
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float32)
        _scratch.buf = buf
    return buf[:n].view(rows, cols)


def tiled_matmul(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
                 in_features: int, out: Tensor | None = None) -> Tensor:
    """Many-token path: decode ``TILE_FLOATS``-sized row tiles of the weight and multiply each with BLAS;
    the whole weight is never materialised. Shapes: see module docstring."""
    x = x.float().contiguous()
    o = codes.shape[0]
    rows = min(o, max(16, TILE_FLOATS // max(1, in_features)))
    codes = codes.contiguous()
    return _tiles_times_x(x, o, rows, lambda o0, o1, buf: dequantize_rows(codes, codebooks, scales, in_features,
                                                                          o0, o1, buf), bias, out)


def _tiles_times_x(x: Tensor, o: int, rows: int, decode, bias: Tensor | None, out: Tensor | None) -> Tensor:
    """``x [T, n] @ W.T (+ bias)`` → ``out [T, o]`` float32, ``W`` decoded ``rows`` rows at a time by
    ``decode(o0, o1, buf)`` into the reused :func:`_tile_buffer` and multiplied there with BLAS (the prefill
    paths: the whole weight never exists)."""
    t = x.shape[0]
    buf = _tile_buffer(rows, x.shape[1])
    yt = torch.empty(o, t, dtype=torch.float32)  # y transposed: each tile's rows are contiguous
    for o0 in range(0, o, rows):
        o1 = min(o, o0 + rows)
        decode(o0, o1, buf)
        torch.mm(buf[: o1 - o0], x.T, out=yt[o0:o1])
    if out is None:
        out = torch.empty(t, o, dtype=torch.float32)
    out.copy_(yt.T)
    if bias is not None:
        out.add_(bias.float())
    return out


_repacked: dict[int, tuple[weakref.ref, int, Tensor]] = {}  # id(codes) -> (ref, version, repacked)


def has_lut16() -> bool:
    """True when the library was compiled with AVX-512BW (the int16-table LUT kernel)."""
    lib = load_library()
    return lib is not None and bool(lib.rvq_has_lut16())


def _cached(src: Tensor, make) -> Tensor:
    """``make(src)``, cached per source tensor (weakly; rebuilt if ``src`` is modified in place)."""
    hit = _repacked.get(id(src))
    if hit is not None and hit[0]() is src and hit[1] == src._version:
        return hit[2]
    value = make(src)
    key = id(src)
    _repacked[key] = (weakref.ref(src, lambda _, k=key: _repacked.pop(k, None)), src._version, value)
    return value


def _repack(codes: Tensor) -> Tensor:
    o = codes.shape[0]
    opad = -(-o // 32) * 32
    ct = torch.zeros(codes.shape[1] * codes.shape[2], opad, dtype=torch.uint8)
    ct[:, :o] = codes.reshape(o, -1).T
    return ct


def repack_codes(codes: Tensor) -> Tensor:
    """``codes [out, G, S]`` uint8 → ``[G*S, out rounded up to 32]`` uint8 (zero padded), the layout of
    :func:`lut16_gemv`: for one (group, stage), the codes of consecutive outputs are adjacent. Cached per
    codes tensor (weakly; rebuilt if the tensor is modified in place), so it costs one extra copy of the
    codes in memory while the layer lives; the module's buffers keep the checkpoint layout."""
    return _cached(codes, _repack)


def transposed_codebooks(codebooks: Tensor) -> Tensor:
    """``codebooks [S, K, d]`` → float32 ``[S, d, K]`` (the table build runs along K), cached like codes."""
    return _cached(codebooks, lambda cb: cb.detach().float().transpose(1, 2).contiguous())


def lut16_gemv(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
               in_features: int, out: Tensor | None = None) -> Tensor:
    """Lookup tables quantized to int16 and read 32 at a time with AVX-512 permutes (K = 256, uint8 codes).
    Table entries carry ~15 significant bits (one scale per 16 table rows): the result matches the
    float32 reference to ~1e-4 relative. Shapes: see module docstring."""
    lib = load_library()
    assert lib is not None and codes.dtype == torch.uint8 and codebooks.shape[1] == 256
    x = x.float().contiguous()
    o, g, s = codes.shape
    d = codebooks.shape[2]
    t = x.shape[0]
    ct = repack_codes(codes)
    cbt = transposed_codebooks(codebooks)
    sc, sc_half = _half_flag(scales)
    b_half = 0
    if bias is not None:
        bias, b_half = _half_flag(bias)
    if out is None:
        out = torch.empty(t, o, dtype=torch.float32)
    assert out.shape == (t, o) and out.dtype == torch.float32 and out.is_contiguous()
    rc = lib.rvq_gemv_lut16(x.data_ptr(), t, ct.data_ptr(), ct.shape[1], cbt.data_ptr(), sc.data_ptr(),
                            sc_half, None if bias is None else bias.data_ptr(), b_half, o, g, s, d, in_features,
                            out.data_ptr(), torch.get_num_threads())
    assert rc == 0, "lut16 kernel not compiled in (no AVX-512BW); dispatch should not have chosen it"
    return out


# ---------------------------------------------------------------------------------------------------------
# Trellis-coded layers (:mod:`rvqllm.rvq.trellis`, packed walks): ``walks [n, bpc]`` uint8 (column ``j``'s
# walk down the ``out`` rows, ``bpc = walk_bytes(out, L, k)``), ``table [2**Q]`` and ``scales [out]`` fp16 or
# fp32, ``bias [out]`` or None; the weight is ``W[o, j] = table[lut_index(p(j, o), Q)] * scales[o]``
# (:func:`rvqllm.rvq.trellis.walk_dequantize`). Activations ``x [T, n]`` (any float dtype), results
# ``[T, out]`` float32.


def has_trellis_avx512() -> bool:
    """True when the library was compiled with the AVX-512 trellis path (16 rows of a column per vector; where
    the CPU also has AVX-512VBMI, checked at run time, the kernels extract the states with ``vpmultishiftqb``)."""
    lib = load_library()
    return lib is not None and bool(lib.rvq_trellis_has_avx512())


def trellis_fast_path(state_bits: int, step_bits: int, lut_bits: int) -> bool:
    """True when :func:`trellis_gemv` and :func:`trellis_tiled` take the AVX-512 path for these parameters
    (compiled in, ``k <= 6``, ``Q <= 5``); False when they take the portable one."""
    lib = load_library()
    return lib is not None and bool(lib.rvq_trellis_fast_path(state_bits, step_bits, lut_bits))


def _f32(t: Tensor) -> Tensor:
    """``t`` as a contiguous float32 tensor: itself when it is one, else a converted copy cached on the tensor
    (weakly; made again if it is modified in place), so that an fp16 table or scales are converted once, not on
    every call (inference-mode tensors keep no version counter: converted every call)."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    try:
        return _cached(t, lambda s: s.detach().float().contiguous())
    except RuntimeError:
        return t.detach().float().contiguous()


def _trellis_operands(x: Tensor, walks: Tensor, table: Tensor, scales: Tensor, bias: Tensor | None,
                      state_bits: int, step_bits: int, lut_bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check the shapes (``ValueError`` naming the mismatch) and return ``x`` float32 ``[T, n]``, ``walks``,
    ``table`` and ``scales`` (float32), all contiguous."""
    if not (2 <= state_bits <= 24 and 1 <= step_bits <= 8 and 1 <= lut_bits <= 8):
        raise ValueError(f"trellis kernels need 2 <= state_bits <= 24, 1 <= step_bits <= 8 and 1 <= lut_bits <= 8, "
                         f"got L={state_bits}, k={step_bits}, Q={lut_bits}")
    if walks.dtype != torch.uint8 or walks.dim() != 2:
        raise ValueError(f"walks must be a 2-D uint8 tensor [n, bpc], got {walks.dtype} {list(walks.shape)}")
    if scales.dim() != 1 or scales.shape[0] < 1:
        raise ValueError(f"scales must be [out] with out >= 1, got {list(scales.shape)}")
    n, bpc = walks.shape
    o = scales.shape[0]
    want = (state_bits + step_bits * (o - 1) + 7) // 8
    if bpc != want:
        raise ValueError(f"walks have {bpc} bytes per column; {o} rows at L={state_bits}, k={step_bits} need "
                         f"exactly {want}")
    if table.shape != (1 << lut_bits,):
        raise ValueError(f"table of shape {list(table.shape)} for lut_bits={lut_bits} (need [{1 << lut_bits}])")
    if x.dim() != 2 or x.shape[1] != n:
        raise ValueError(f"x of shape {list(x.shape)} for a layer of {n} inputs (need [T, {n}])")
    if bias is not None and bias.shape != (o,):
        raise ValueError(f"bias of shape {list(bias.shape)} for {o} outputs")
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    if not walks.is_contiguous():
        walks = walks.contiguous()
    return x, walks, _f32(table), _f32(scales)


def trellis_gemv(x: Tensor, walks: Tensor, table: Tensor, scales: Tensor, bias: Tensor | None, state_bits: int,
                 step_bits: int, lut_bits: int, out: Tensor | None = None) -> Tensor:
    """Few-token path of a trellis-coded layer: ``x [T, n] → [T, out]`` float32 (+ bias), each weight decoded
    from its walk once per call and multiplied with every token, never stored. Shapes: see the section's
    comment; ``out`` (optional) is a contiguous float32 ``[T, out]`` buffer to write into."""
    lib = load_library()
    assert lib is not None, "CPU kernels unavailable; dispatch should not have chosen this path"
    x, walks, tab, sc = _trellis_operands(x, walks, table, scales, bias, state_bits, step_bits, lut_bits)
    t, n = x.shape
    o = sc.shape[0]
    if out is None:
        out = torch.empty(t, o, dtype=torch.float32)
    assert out.shape == (t, o) and out.dtype == torch.float32 and out.is_contiguous()
    rc = lib.rvq_trellis_gemv(x.data_ptr(), t, walks.data_ptr(), walks.shape[1], n, o, state_bits, step_bits,
                              lut_bits, tab.data_ptr(), sc.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError("rvq_trellis_gemv rejected the sizes")
    if bias is not None:
        out.add_(bias)
    return out


def trellis_decode_rows(walks: Tensor, table: Tensor, scales: Tensor, state_bits: int, step_bits: int,
                        lut_bits: int, o0: int, o1: int, out: Tensor) -> Tensor:
    """Decode rows ``[o0, o1)`` of a trellis-coded layer's scaled weight into ``out[:o1-o0]`` (float32
    ``[>= o1-o0, n]``, contiguous); returns ``out``. ``walks`` contiguous; ``table`` and ``scales`` as for
    :func:`trellis_gemv` (shapes checked by the kernel: ``ValueError`` if it rejects them)."""
    lib = load_library()
    assert lib is not None
    if walks.dtype != torch.uint8 or walks.dim() != 2 or not walks.is_contiguous():
        raise ValueError("walks must be a contiguous 2-D uint8 tensor [n, bpc]")
    if table.shape != (1 << lut_bits,) or scales.dim() != 1:
        raise ValueError(f"table of shape {list(table.shape)} for lut_bits={lut_bits}, or scales not 1-D")
    table, scales = _f32(table), _f32(scales)
    n, bpc = walks.shape
    assert out.is_contiguous() and out.dtype == torch.float32 and out.shape[1] == n and out.shape[0] >= o1 - o0
    rc = lib.rvq_trellis_decode_rows(walks.data_ptr(), bpc, n, scales.shape[0], state_bits, step_bits, lut_bits,
                                     table.data_ptr(), scales.data_ptr(), o0, o1, out.data_ptr(),
                                     torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"rvq_trellis_decode_rows rejected rows [{o0}, {o1}) or the sizes")
    return out


def trellis_tiled(x: Tensor, walks: Tensor, table: Tensor, scales: Tensor, bias: Tensor | None, state_bits: int,
                  step_bits: int, lut_bits: int, out: Tensor | None = None) -> Tensor:
    """Many-token path of a trellis-coded layer: decode row tiles of the weight (``TILE_FLOATS`` at a time,
    a multiple of 16 rows, into the reused :func:`_tile_buffer`) and multiply each with BLAS; the whole
    weight is never materialised. Shapes as :func:`trellis_gemv`."""
    x, walks, tab, sc = _trellis_operands(x, walks, table, scales, bias, state_bits, step_bits, lut_bits)
    o = sc.shape[0]
    rows = min(o, max(16, TILE_FLOATS // max(1, x.shape[1]) // 16 * 16))
    return _tiles_times_x(x, o, rows, lambda o0, o1, buf: trellis_decode_rows(walks, tab, sc, state_bits, step_bits,
                                                                              lut_bits, o0, o1, buf), bias, out)
