"""Every dequantize-matmul implementation against the pure-torch reference; op registration; fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rvqllm.kernels import cpu, cpu_build, dispatch, rvq_linear, rvq_linear_op, rvq_linear_reference
from rvqllm.nn import QuantizedLinear

pytestmark = pytest.mark.unit

CPU_IMPLS = ["cpu_lut", "cpu_decode", "cpu_tiled"]
LUT16_TOL = 5e-4  # int16 tables: ~15 significant bits per table entry
# (out, in, vector_dim, stages, K, code dtype): odd widths, partial last group, 16-bit codes, d not 4/8
SHAPES = [
    (37, 45, 8, 2, 256, torch.uint8),
    (40, 30, 4, 3, 16, torch.uint8),
    (33, 50, 5, 2, 300, torch.int16),
    (19, 64, 8, 1, 65536, torch.int16),
    (130, 72, 8, 3, 256, torch.uint8),
]
TOKENS = [1, 2, 5, 9, 17]


def make_layer(out, inf, d, s, k, cdtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    groups = -(-inf // d)
    codes = torch.randint(0, k, (out, groups, s), generator=g)
    codes = codes.to(torch.uint8) if cdtype == torch.uint8 else codes.to(torch.int32).to(torch.int16)
    codebooks = torch.randn(s, k, d, generator=g).half()
    scales = (torch.rand(out, generator=g) + 0.5).half()
    b = torch.randn(out, generator=g) if bias else None
    return codes, codebooks, scales, b


@pytest.fixture(scope="module")
def fast_cpu():
    if not cpu.available():
        pytest.skip("C++ kernels could not be built here (the fallback is tested separately)")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_impl_matches_reference(fast_cpu, impl, shape, bias):
    codes, cb, sc, b = make_layer(*shape, bias=bias)
    inf = shape[1]
    fn = dispatch.get_impl(impl)
    for t in TOKENS:
        x = torch.randn(t, inf, generator=torch.Generator().manual_seed(t))
        out = torch.full((t, shape[0]), float("nan"))  # poison: every element must be written
        y = fn(x, codes, cb, sc, b, inf, out=out)
        assert y.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
        torch.testing.assert_close(y, rvq_linear_reference(x, codes, cb, sc, b, inf), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[4] == 256] + [(64, 1000, 4, 2, 256, torch.uint8)],
                         ids=lambda s: "x".join(map(str, s[:5])))
def test_cpu_lut16_matches_reference(fast_cpu, shape):
    if not cpu.has_lut16():
        pytest.skip("compiled without AVX-512BW")
    codes, cb, sc, b = make_layer(*shape)
    inf = shape[1]
    for t in TOKENS:
        x = torch.randn(t, inf, generator=torch.Generator().manual_seed(t))
        x[:, :3] *= 50  # an outlier channel, as LLM activations have
        out = torch.full((t, shape[0]), float("nan"))
        y = cpu.lut16_gemv(x, codes, cb, sc, b, inf, out=out)
        assert y.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
        ref = rvq_linear_reference(x, codes, cb, sc, b, inf)
        assert ((y - ref).norm() / ref.norm()).item() < LUT16_TOL
        torch.testing.assert_close(y, ref, rtol=LUT16_TOL, atol=LUT16_TOL * ref.abs().max().item())


def test_repacked_codes_follow_in_place_edits(fast_cpu):
    codes, cb, sc, b = make_layer(40, 64, 8, 2, 256, torch.uint8)
    first = cpu.repack_codes(codes)
    assert cpu.repack_codes(codes) is first
    codes[3, 2, 1] = 255 - codes[3, 2, 1]
    again = cpu.repack_codes(codes)
    assert again is not first and again[2 * 2 + 1, 3] == codes[3, 2, 1]


def test_d8_fp16_codebooks_are_read_as_stored(fast_cpu):
    """With F16C the decode kernels read a d = 8 fp16 table as it is (a 65,536-entry table is 1 MiB, not
    2): no float32 copy is made, and the output matches the reference at one token (four groups in flight,
    a tail of groups), at several tokens, and on the many-token tiled path."""
    codes, cb, sc, b = make_layer(19, 100, 8, 1, 65536, torch.int16, seed=4)  # 13 groups: 3 x 4 + 1
    if not cpu.reads_half8(cb):
        pytest.skip("kernels built without F16C")
    got, flag = cpu._float_codebooks(cb)
    assert flag == 1 and got.data_ptr() == cb.data_ptr()
    for t in (1, 3, 9):
        x = torch.randn(t, 100, generator=torch.Generator().manual_seed(t))
        ref = rvq_linear_reference(x, codes, cb, sc, b, 100)
        for impl in ("cpu_decode", "cpu_tiled"):
            torch.testing.assert_close(dispatch.get_impl(impl)(x, codes, cb, sc, b, 100), ref, rtol=1e-4, atol=1e-4)
            # the same table in float32 takes the float32 decoder of the same loops
            torch.testing.assert_close(dispatch.get_impl(impl)(x, codes, cb.float(), sc, b, 100), ref, rtol=1e-4,
                                       atol=1e-4)


def test_large_codebooks_are_converted_once_and_follow_in_place_edits(fast_cpu):
    """A 65,536-entry fp16 table the kernels do not read as stored (d != 8, or no F16C) goes to them as a
    float32 copy kept on the tensor: made once for every call (and every layer sharing the tensor), made
    again after an in-place edit (the output follows it) and never taken over by a copy of the tensor."""
    codes, cb, sc, b = make_layer(19, 64, 4, 1, 65536, torch.int16, seed=4)
    x = torch.randn(2, 64)
    first, flag = cpu._float_codebooks(cb)
    assert flag == 0 and first.dtype == torch.float32 and cpu._float_codebooks(cb)[0] is first
    code = int(codes[5, 1, 0]) & 0xFFFF
    with torch.no_grad():
        cb[0, code] += 1.0
    assert cpu._float_codebooks(cb)[0] is not first
    for impl in CPU_IMPLS:
        torch.testing.assert_close(dispatch.get_impl(impl)(x, codes, cb, sc, b, 64),
                                   rvq_linear_reference(x, codes, cb, sc, b, 64), rtol=1e-4, atol=1e-4)
    twin = cb.clone()
    twin.__dict__.update(cb.__dict__)  # a copy carrying the attribute: its own storage, so not reused
    assert cpu._float_codebooks(twin)[0] is not cpu._float_codebooks(cb)[0]
    small = torch.randn(2, 256, 8).half()
    assert cpu._float_codebooks(small)[1] == 1  # small tables: as they are, the kernel converts them


def test_sixteen_bit_codes_use_the_upper_half(fast_cpu):
    """int16 codes >= 32768 are negative bit patterns; every implementation must read them as unsigned."""
    codes, cb, sc, b = make_layer(24, 40, 8, 2, 65536, torch.int16, seed=3)
    assert (codes < 0).any()
    x = torch.randn(3, 40)
    ref = rvq_linear_reference(x, codes, cb, sc, b, 40)
    for impl in CPU_IMPLS:
        torch.testing.assert_close(dispatch.get_impl(impl)(x, codes, cb, sc, b, 40), ref, rtol=1e-4, atol=1e-4)


def test_dequantize_rows_tile_matches_reference(fast_cpu):
    from rvqllm.kernels import dequantize

    codes, cb, sc, _ = make_layer(50, 61, 8, 3, 256, torch.uint8)
    out = torch.full((20, 61), float("nan"))
    cpu.dequantize_rows(codes, cb, sc, 61, 17, 37, out)
    torch.testing.assert_close(out, dequantize(codes, cb, sc, 61)[17:37], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("tokens", [1, 3, 16, 40])
def test_op_dtypes_and_leading_dims(dtype, tol, tokens):
    codes, cb, sc, b = make_layer(48, 52, 8, 2, 256, torch.uint8)
    x = torch.randn(2, tokens, 52).to(dtype)
    y = rvq_linear(x, codes, cb, sc, b, 52)
    assert y.shape == (2, tokens, 48) and y.dtype == dtype
    ref = rvq_linear_reference(x.float(), codes, cb, sc, b, 52)
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_dispatch_table():
    c = dispatch.choose
    assert os.environ.get("RVQLLM_KERNEL") is None
    if cpu.available():
        assert c("cpu", 1, 2, 256, 8, 4096) == ("cpu_lut16" if cpu.has_lut16() else "cpu_lut")
        assert c("cpu", 1, 2, 64, 8, 4096) == "cpu_lut"
        assert c("cpu", 1, 2, 65536, 8, 4096) == "cpu_decode"  # table would dwarf the weight
        assert c("cpu", 8, 2, 256, 8, 4096) == "cpu_decode"
        assert c("cpu", 128, 2, 256, 8, 4096) == "cpu_tiled"
    with pytest.warns(cpu_build.KernelFallbackWarning):
        assert c("cpu", 1, 2, 256, 96, 4096) == "reference"
    if dispatch.triton_available():
        assert c("cuda", 1, 2, 256, 8, 4096) == "triton_fused"
        assert c("cuda", 512, 2, 256, 8, 4096) == "triton_dequant_mm"


def test_forced_kernel_env(monkeypatch):
    monkeypatch.setenv("RVQLLM_KERNEL", "reference")
    assert dispatch.choose("cpu", 1, 2, 256, 8, 4096) == "reference"
    monkeypatch.setenv("RVQLLM_KERNEL", "nope")
    with pytest.raises(ValueError, match="RVQLLM_KERNEL"):
        dispatch.choose("cpu", 1, 2, 256, 8, 4096)


def test_opcheck_registrations():
    codes, cb, sc, b = make_layer(20, 27, 8, 2, 64, torch.uint8)
    for t in (1, 12):
        x = torch.randn(t, 27, requires_grad=True)
        torch.library.opcheck(rvq_linear_op, (x, codes, cb.float().requires_grad_(), sc.float().requires_grad_(),
                                              b.requires_grad_(), 27))


def test_gradients_match_reference():
    codes, cb, sc, b = make_layer(30, 37, 8, 3, 32, torch.uint8)
    x = torch.randn(2, 5, 37)
    grads = []
    for fn in (rvq_linear, rvq_linear_reference):
        leaves = [x.clone().requires_grad_(), cb.float().requires_grad_(), sc.float().requires_grad_(),
                  b.clone().requires_grad_()]
        y = fn(leaves[0], codes, leaves[1], leaves[2], leaves[3], 37)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_torch_compile_traces_through_the_op():
    codes, cb, sc, b = make_layer(24, 40, 8, 2, 256, torch.uint8)
    layer = QuantizedLinear(40, 24, vector_dim=8, stages=2, bits=8, bias=True, bias_dtype=torch.float32)
    layer.codes.copy_(codes), layer.codebooks.copy_(cb), layer.scales.copy_(sc), layer.bias.copy_(b)
    x = torch.randn(3, 40)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_fallback_warns_once_loudly_and_stays_correct(monkeypatch, capfd):
    codes, cb, sc, b = make_layer(24, 40, 8, 2, 256, torch.uint8)
    x = torch.randn(1, 40)
    cpu_build.reset_for_tests()
    monkeypatch.delenv("RVQLLM_DISABLE_CPU_KERNELS", raising=False)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    try:
        with pytest.warns(cpu_build.KernelFallbackWarning, match="no C.. compiler found"):
            y = rvq_linear(x, codes, cb, sc, b, 40)
        assert "CPU fast kernels are unavailable" in capfd.readouterr().err
        assert dispatch.choose("cpu", 1, 2, 256, 8, 4096) == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second call must not warn again
            y2 = rvq_linear(x, codes, cb, sc, b, 40)
        torch.testing.assert_close(y, rvq_linear_reference(x, codes, cb, sc, b, 40))
        torch.testing.assert_close(y2, y)
    finally:
        monkeypatch.delenv("CXX")
        cpu_build.reset_for_tests()


def test_build_is_cached(tmp_path, monkeypatch):
    if cpu_build.find_compiler() is None:
        pytest.skip("no compiler here")
    monkeypatch.setenv("RVQLLM_CACHE_DIR", str(tmp_path))
    first = cpu_build._compile(cpu_build.find_compiler())
    assert first.is_file() and tmp_path in first.parents
    stamp = first.stat().st_mtime_ns
    assert cpu_build._compile(cpu_build.find_compiler()) == first and first.stat().st_mtime_ns == stamp


TRITON_SCRIPT = r"""
import torch
from rvqllm.kernels import triton_kernels as tk
from rvqllm.kernels.reference import rvq_linear_reference
from tests.test_kernels import make_layer
for shape in [(37, 45, 8, 2, 256, torch.uint8), (70, 100, 4, 3, 16, torch.int16), (19, 64, 8, 1, 65536, torch.int16)]:
    codes, cb, sc, b = make_layer(*shape)
    inf = shape[1]
    for t in (1, 5, 17):
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 5e-3)):
            x = torch.randn(t, inf).to(dtype)
            ref = rvq_linear_reference(x.float(), codes, cb, sc, b, inf)
            for fn in (tk.fused_linear, tk.dequant_linear):
                out = torch.full((t, shape[0]), float("nan"), dtype=dtype)
                y = fn(x, codes, cb, sc, b, inf, out=out)
                assert not torch.isnan(out).any(), fn.__name__
                torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
print("TRITON-OK")
"""


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stderr[-3000:]


def test_quantized_model_generates_same_tokens_as_reference_path(monkeypatch):
    """A tiny quantized Llama generates the same greedy tokens through the fast paths and the oracle."""
    import rvqllm
    from tests.conftest import tiny_llama

    model = tiny_llama()
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    rvqllm.quantize(model, rvqllm.RVQConfig(vector_dim=8, stages=2, bits=6, kmeans_iters=2, calib_batch_size=4),
                    calib)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=10, do_sample=False)
        monkeypatch.setenv("RVQLLM_KERNEL", "reference")
        slow = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(fast, slow)


def test_portable_build_without_simd_flags(monkeypatch, tmp_path):
    """The kernels compiled for a generic x86-64 / other CPU (no -march: scalar and SSE2 paths only)."""
    if cpu_build.find_compiler() is None:
        pytest.skip("no compiler here")
    monkeypatch.setenv("RVQLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RVQLLM_DISABLE_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu_build, "_arch_flags", lambda: [])
    cpu_build.reset_for_tests()
    try:
        assert cpu.available() and not cpu.has_lut16()
        assert dispatch.choose("cpu", 1, 2, 256, 8, 4096) == "cpu_lut"
        for shape in (SHAPES[0], SHAPES[1], (33, 70, 8, 2, 256, torch.uint8)):
            codes, cb, sc, b = make_layer(*shape)
            inf = shape[1]
            for t in (1, 3, 11):
                x = torch.randn(t, inf)
                ref = rvq_linear_reference(x, codes, cb, sc, b, inf)
                for impl in CPU_IMPLS:
                    torch.testing.assert_close(dispatch.get_impl(impl)(x, codes, cb, sc, b, inf), ref,
                                               rtol=1e-4, atol=1e-4)
    finally:
        monkeypatch.undo()
        cpu_build.reset_for_tests()


def test_concurrent_callers_do_not_share_scratch(fast_cpu):
    """ctypes releases the GIL, so two Python threads can be inside the kernels at once."""
    from concurrent.futures import ThreadPoolExecutor

    layers = [make_layer(64 + 32 * i, 200 + 24 * i, 8, 2, 256, torch.uint8, seed=i) for i in range(4)]
    xs = [torch.randn(t, 200 + 24 * i) for i, t in enumerate((1, 3, 1, 12))]

    def work(i):
        codes, cb, sc, b = layers[i]
        return [rvq_linear(xs[i], codes, cb, sc, b, xs[i].shape[1]) for _ in range(20)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4)))
    for i, ys in enumerate(results):
        codes, cb, sc, b = layers[i]
        ref = rvq_linear_reference(xs[i], codes, cb, sc, b, xs[i].shape[1])
        for y in ys:
            torch.testing.assert_close(y, ref, rtol=LUT16_TOL, atol=LUT16_TOL * ref.abs().max().item())
