"""The CPU decode-matmul kernels of trellis-coded layers (``rvqllm.kernels.cpu.trellis_gemv`` / ``trellis_tiled``)
against the torch reference ``x @ walk_dequantize(...).T + bias``: every (L, k, Q) shape class, row counts on
and off the 16-row slices, fp16 and fp32 tables, walks from the coder, both kernel paths (AVX-512 where the
machine has it, the portable one for the parameters it does not serve), and the shape checks."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rvqllm.kernels import cpu
from rvqllm.rvq import trellis
from rvqllm.rvq.trellis import walk_bytes, walk_dequantize

pytestmark = pytest.mark.unit

# (L, k, Q): the common case, small tables, long states, k = 3 (multishift decoder where the CPU has VBMI),
# Q = 8 and k = 1, plus L = 21 / k = 3 and L = 20 / k = 4 (too long for the 8-byte window: the shuffle decoder)
# and k = 8 (portable path).
CODES = [(12, 2, 5), (12, 2, 3), (16, 2, 5), (18, 2, 5), (12, 3, 4), (8, 2, 8), (6, 1, 5), (21, 3, 5), (20, 4, 5),
         (16, 8, 5)]
OUTS = [1, 7, 33, 100, 64, 576]
INS = [1, 5, 96]


@pytest.fixture(autouse=True)
def _kernels():
    if not cpu.available():
        pytest.skip("C++ kernels could not be built here")


def _layer(out: int, n: int, L: int, k: int, Q: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    walks = torch.randint(0, 256, (n, walk_bytes(out, L, k)), dtype=torch.uint8, generator=g)  # any bits: a walk
    table = torch.randn(1 << Q, generator=g).to(dtype)
    scales = (torch.rand(out, generator=g) + 0.5).to(dtype)
    bias = torch.randn(out, generator=g)
    return walks, table, scales, bias


def _close(y: torch.Tensor, ref: torch.Tensor, n: int) -> None:
    assert y.dtype == torch.float32 and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * max(1.0, n**0.5))


def _cpu_has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("code", CODES, ids=lambda c: "L{}k{}Q{}".format(*c))
def test_kernels_match_reference(code, dtype):
    L, k, Q = code
    g = torch.Generator().manual_seed(1)
    for out in OUTS:
        for n in INS:
            walks, table, scales, bias = _layer(out, n, L, k, Q, dtype, seed=out * 131 + n)
            w = walk_dequantize(walks, table, scales, L, k, Q)
            for t in (1, 3, 8):
                x = torch.randn(t, n, generator=g)
                b = bias if t != 3 else None
                ref = x @ w.T + (0 if b is None else b)
                _close(cpu.trellis_gemv(x, walks, table, scales, b, L, k, Q), ref, n)
            for t in (1, 17, 40):
                x = torch.randn(t, n, generator=g)
                _close(cpu.trellis_tiled(x, walks, table, scales, bias, L, k, Q), x @ w.T + bias, n)


def test_paths_are_the_expected_ones():
    """Which path serves which parameters; on an AVX-512 machine the common case must take the fast one."""
    if _cpu_has_avx512() and torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert cpu.has_trellis_avx512()
    if cpu.has_trellis_avx512():
        for code in [(12, 2, 5), (12, 2, 3), (16, 2, 5), (18, 2, 5), (12, 3, 4), (6, 1, 5), (21, 3, 5), (20, 4, 5)]:
            assert cpu.trellis_fast_path(*code), code
    for code in [(8, 2, 8), (16, 8, 5), (12, 2, 6)]:  # Q > 5 or k > 6: the portable path
        assert not cpu.trellis_fast_path(*code), code


@pytest.mark.parametrize("code", [(12, 2, 5), (12, 3, 4), (21, 3, 5), (8, 2, 8)], ids=lambda c: "L{}k{}Q{}".format(*c))
def test_decode_rows_any_range(code):
    """Row ranges starting anywhere (a start row whose state does not begin on a byte boundary, ranges ending
    inside a 16-row slice, the column's last rows) decode exactly the reference's rows."""
    L, k, Q = code
    for out, n in ((1, 3), (21, 5), (100, 40), (333, 17)):
        walks, table, scales, _ = _layer(out, n, L, k, Q, torch.float32, seed=out)
        w = walk_dequantize(walks, table, scales, L, k, Q)
        for o0, o1 in ((0, out), (out // 3, out), (1 % out, max(1 % out, out - 1)), (out - 1, out), (out // 2, out // 2)):
            buf = torch.full((max(1, o1 - o0), n), float("nan"))
            cpu.trellis_decode_rows(walks, table, scales, L, k, Q, o0, o1, buf)
            torch.testing.assert_close(buf[: o1 - o0], w[o0:o1], rtol=0, atol=0)


@pytest.mark.parametrize("code", [(12, 2, 5), (12, 3, 5), (12, 4, 5)], ids=lambda c: "L{}k{}Q{}".format(*c))
def test_gemv_streams_long_columns_in_chunks(code):
    """The few-token path streams the columns eight at a time into accumulators for at most 384 / T slices of
    16 rows: columns past the last eight, long columns cut into several chunks (6,200 rows: 17 chunks at
    8 tokens, 2 at one), every token count, and one or two threads (each its own range of rows)."""
    L, k, Q = code
    out, n = 6200, 19
    walks, table, scales, bias = _layer(out, n, L, k, Q, torch.float32, seed=k)
    w = walk_dequantize(walks, table, scales, L, k, Q)
    g = torch.Generator().manual_seed(2)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for t in (1, 2, 5, 8):
                x = torch.randn(t, n, generator=g)
                _close(cpu.trellis_gemv(x, walks, table, scales, bias, L, k, Q), x @ w.T + bias, n)
    finally:
        torch.set_num_threads(threads)


def test_many_tiles_threads_and_inputs(monkeypatch):
    """Small tiles (many of them), 1 or 3 threads, and activations that are fp16/bf16 or not contiguous."""
    L, k, Q = 12, 2, 5
    out, n = 1000, 300
    walks, table, scales, bias = _layer(out, n, L, k, Q, torch.float16, seed=7)
    w = walk_dequantize(walks, table, scales, L, k, Q)
    x = torch.randn(n, 12).T  # [12, n], not contiguous
    ref = x @ w.T + bias
    threads = torch.get_num_threads()
    try:
        for nt in (1, 3):
            torch.set_num_threads(nt)
            _close(cpu.trellis_gemv(x, walks, table, scales, bias, L, k, Q), ref, n)
            _close(cpu.trellis_tiled(x, walks, table, scales, bias, L, k, Q), ref, n)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(cpu, "TILE_FLOATS", 1)  # tiles of 16 rows
    _close(cpu.trellis_tiled(x, walks, table, scales, bias, L, k, Q), ref, n)
    for dt in (torch.float16, torch.bfloat16):
        xl = x.to(dt)
        ref_l = xl.float() @ w.T + bias
        _close(cpu.trellis_gemv(xl, walks, table, scales, bias, L, k, Q), ref_l, n)
        _close(cpu.trellis_tiled(xl, walks, table, scales, bias, L, k, Q), ref_l, n)
    y = torch.full((12, out), float("nan"))
    assert cpu.trellis_gemv(x, walks, table, scales, None, L, k, Q, out=y) is y
    _close(y, ref - bias, n)


@pytest.mark.parametrize("code", [(12, 2, 5), (6, 1, 5), (8, 2, 8)], ids=lambda c: "L{}k{}Q{}".format(*c))
def test_coded_walks(code):
    """Walks the coder chose (Viterbi against the packed table, then pack_walks) decode identically in the
    kernels and the reference, and the decoded layer is close to the weights it codes."""
    L, k, Q = code
    out, n = 50, 24
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(out, n, generator=g)
    table = trellis.gaussian_lut(Q)
    states = trellis.viterbi(weight.T.contiguous(), L, k, values=trellis.packed_values(table, L, k, Q))  # [n, out]
    walks = trellis.pack_walks(states, L, k)
    assert walks.shape == (n, walk_bytes(out, L, k))
    scales = torch.ones(out)
    w = walk_dequantize(walks, table, scales, L, k, Q)
    assert torch.equal(w, trellis.packed_values(table, L, k, Q)[states].T)  # the coder's own reconstruction
    assert (w - weight).pow(2).mean() < 0.5 * weight.pow(2).mean()
    x = torch.randn(5, n, generator=g)
    _close(cpu.trellis_gemv(x, walks, table, scales, None, L, k, Q), x @ w.T, n)
    _close(cpu.trellis_tiled(x, walks, table, scales, None, L, k, Q), x @ w.T, n)


def _next_to_guard_page(data: torch.Tensor, after: bool):
    """A copy of the uint8 tensor ``data`` that ends right before an inaccessible page (``after``: starts right
    after one instead), so that a kernel reading past its end (before its start) faults; returns (copy, the
    mapping, to be kept alive meanwhile)."""
    page = mmap.PAGESIZE
    size = data.numel()
    total = -(-size // page) * page + page
    m = mmap.mmap(-1, total, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base if after else base + total - page, page, 0) == 0  # PROT_NONE
    t = torch.frombuffer(m, dtype=torch.uint8, count=size, offset=page if after else total - page - size)
    t = t.view(data.shape)
    t.copy_(data)
    return t, m


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard pages via mprotect: Linux only")
@pytest.mark.parametrize("code", [(12, 2, 5), (12, 3, 4), (21, 3, 5), (6, 1, 5), (8, 2, 8)],
                         ids=lambda c: "L{}k{}Q{}".format(*c))
def test_no_read_past_the_walks(code):
    """A single column (so its ends are the tensor's) next to an unmapped page, after it or before it: for every
    row count both kernels and the row decoder read only the column's ``bpc`` bytes (anything else faults)."""
    L, k, Q = code
    for out in [*range(1, 80), 127, 128, 129, 576]:
        walks, table, scales, _ = _layer(out, 1, L, k, Q, torch.float32, seed=out)
        w = walk_dequantize(walks, table, scales, L, k, Q)
        x = torch.randn(3, 1)
        for after in (False, True):
            guarded, mapping = _next_to_guard_page(walks, after)
            _close(cpu.trellis_gemv(x, guarded, table, scales, None, L, k, Q), x @ w.T, 1)
            _close(cpu.trellis_gemv(x[:1], guarded, table, scales, None, L, k, Q), x[:1] @ w.T, 1)
            buf = torch.empty(out, 1)
            for o0 in (0, out // 2, out - 1):
                cpu.trellis_decode_rows(guarded, table, scales, L, k, Q, o0, out, buf)
                assert torch.equal(buf[: out - o0], w[o0:])
            del guarded
            mapping.close()


def test_bad_shapes_raise():
    L, k, Q = 12, 2, 5
    out, n = 40, 8
    walks, table, scales, bias = _layer(out, n, L, k, Q, torch.float32)
    x = torch.randn(2, n)
    cases = [
        (x, walks[:, :-1], table, scales, None, L, k, Q),  # too few bytes per column
        (x, torch.cat([walks, walks[:, :1]], 1), table, scales, None, L, k, Q),  # too many
        (x, walks, table, scales[:-1], None, L, k, Q),  # scales for another row count
        (x, walks, table[:16], scales, None, L, k, Q),  # table not 2**Q
        (x[:, :-1], walks, table, scales, None, L, k, Q),  # x of the wrong width
        (x[0], walks, table, scales, None, L, k, Q),  # x not 2-D
        (x, walks, table, scales, bias[:-1], L, k, Q),  # bias
        (x, walks.to(torch.int16), table, scales, None, L, k, Q),  # walks not uint8
        (x, walks, table, scales, None, 25, k, Q),  # L out of range
        (x, walks, table, scales, None, L, 9, Q),  # k out of range
        (x, walks, torch.zeros(512), scales, None, L, k, 9),  # Q out of range
    ]
    for args in cases:
        for fn in (cpu.trellis_gemv, cpu.trellis_tiled):
            with pytest.raises(ValueError):
                fn(*args)
    buf = torch.empty(out + 1, n)
    for o0, o1 in ((-1, 3), (5, 4), (0, out + 1)):  # rows outside [0, out) or reversed
        with pytest.raises(ValueError):
            cpu.trellis_decode_rows(walks, table, scales, L, k, Q, o0, o1, buf)
    with pytest.raises(ValueError):
        cpu.trellis_decode_rows(walks, table[:16], scales, L, k, Q, 0, out, buf)


TRITON_SCRIPT = r"""
import torch
from rvqllm.kernels import triton_kernels as tk
from rvqllm.kernels.trellis_op import reference
from rvqllm.rvq.trellis import walk_bytes
g = torch.Generator().manual_seed(0)
for (o, n, L, k, Q) in [(37, 45, 12, 2, 5), (70, 100, 24, 3, 8), (5, 64, 6, 1, 3), (130, 20, 16, 2, 5)]:
    walks = torch.randint(0, 256, (n, walk_bytes(o, L, k)), generator=g, dtype=torch.uint8)
    table = torch.randn(1 << Q, generator=g).half()
    sc = (torch.rand(o, generator=g) + 0.5).half()
    b = torch.randn(o, generator=g)
    for t in (1, 5, 17):
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 5e-3)):
            x = torch.randn(t, n, generator=g).to(dtype)
            ref = reference(x.float(), walks, table, sc, b, L, k, Q)
            for fn in (tk.trellis_fused_linear, tk.trellis_dequant_linear):
                out = torch.full((t, o), float("nan"), dtype=dtype)
                y = fn(x, walks, table, sc, b, L, k, Q, out=out)
                assert not torch.isnan(out).any(), fn.__name__
                torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
print("TRITON-TRELLIS-OK")
"""


def test_triton_trellis_kernels_under_interpreter():
    """The GPU kernels (rvqllm.kernels.triton_kernels.trellis_*) against the torch oracle, run by Triton's
    interpreter on CPU tensors (no GPU here): odd shapes, L up to 24, k 1-3, Q 3-8, fp32 and fp16."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "TRITON-TRELLIS-OK" in proc.stdout, proc.stderr[-3000:]


def test_dispatch_names_a_kernel_for_every_device(monkeypatch):
    from rvqllm.kernels import dispatch, trellis_op

    monkeypatch.delenv("RVQLLM_TRELLIS_KERNEL", raising=False)
    if cpu.available():
        assert trellis_op.choose("cpu", 1) == "cpu_trellis_gemv"
        assert trellis_op.choose("cpu", trellis_op.GEMV_MAX_TOKENS + 1) == "cpu_trellis_tiled"
    if dispatch.triton_available():
        assert trellis_op.choose("cuda", 1) == "triton_trellis_fused"
        assert trellis_op.choose("cuda", 512) == "triton_trellis_dequant"
    monkeypatch.setenv("RVQLLM_TRELLIS_KERNEL", "nope")
    with pytest.raises(ValueError, match="RVQLLM_TRELLIS_KERNEL"):
        trellis_op.choose("cpu", 1)
