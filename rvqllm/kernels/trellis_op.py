"""The decode-matmul of a trellis-coded layer (config ``coder: trellis``): dispatch and the custom op.

A trellis layer stores per input column ``j`` a packed walk down its ``out`` rows (``walks [n, bytes]``
uint8, layout in :mod:`rvqllm.rvq.trellis`, "Packed walks"), a codeword table ``table [2**Q]`` fp16 and
row scales ``scales [out]`` fp16; ``W[o, j] = table[lut_index(p(j, o), Q)] * scales[o]``.

============  ==========================================  ===========================================
device        condition                                   implementation
============  ==========================================  ===========================================
cpu           C++ kernels unavailable                     ``reference`` (after one loud warning)
cpu           T <= GEMV_MAX_TOKENS                        ``cpu_trellis_gemv``: decode each 16-row slice
                                                          of a column once, FMA into every token
cpu           otherwise (prefill)                         ``cpu_trellis_tiled``: decode row tiles + BLAS
cuda          Triton missing                              ``reference`` (after one loud warning)
cuda          T <= TRITON_FUSED_MAX_TOKENS                ``triton_trellis_fused``: decode + tl.dot
cuda          otherwise                                   ``triton_trellis_dequant``: decode, cuBLAS
other         always                                      ``reference`` (after one loud warning)
============  ==========================================  ===========================================

``RVQLLM_TRELLIS_KERNEL=<name>`` forces one implementation (benchmarks, tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rvq import trellis
from . import cpu
from .dispatch import choose_gpu, forced

GEMV_MAX_TOKENS = 8


def reference(x2: Tensor, walks: Tensor, table: Tensor, scales: Tensor, bias: Tensor | None, state_bits: int,
              step_bits: int, lut_bits: int) -> Tensor:
    """Pure torch: ``x2 [T, n] @ W.T + bias`` in float32 with ``W`` from :func:`rvqllm.rvq.trellis.walk_dequantize`
    (decodes the whole ``[out, n]`` weight: the oracle, and the path of devices without a kernel)."""
    w = trellis.walk_dequantize(walks, table, scales, state_bits, step_bits, lut_bits)
    return torch.nn.functional.linear(x2.float(), w, None if bias is None else bias.float())


def _triton(name: str):
    from . import triton_kernels

    return getattr(triton_kernels, name)


IMPLS = {
    "reference": lambda: reference,
    "cpu_trellis_gemv": lambda: cpu.trellis_gemv,
    "cpu_trellis_tiled": lambda: cpu.trellis_tiled,
    "triton_trellis_fused": lambda: _triton("trellis_fused_linear"),
    "triton_trellis_dequant": lambda: _triton("trellis_dequant_linear"),
}


def choose(device_type: str, n_tokens: int) -> str:
    """Name of the implementation for this call (module table). May build the CPU kernels."""
    name = forced("RVQLLM_TRELLIS_KERNEL", IMPLS)
    if name:
        return name
    if device_type == "cpu":
        if not cpu.available():
            return "reference"
        return "cpu_trellis_gemv" if n_tokens <= GEMV_MAX_TOKENS else "cpu_trellis_tiled"
    return choose_gpu(device_type, n_tokens, "triton_trellis_fused", "triton_trellis_dequant")


def run_eager(x: Tensor, walks: Tensor, table: Tensor, scales: Tensor, bias: Tensor | None, state_bits: int,
              step_bits: int, lut_bits: int) -> Tensor:
    """Flatten, dispatch, reshape, cast: ``x [..., n]`` → ``[..., out]`` in ``x.dtype``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    impl = IMPLS[choose(x2.device.type, x2.shape[0])]()
    y = impl(x2, walks, table.reshape(-1), scales, bias, state_bits, step_bits, lut_bits)
    return y.reshape(*lead, scales.shape[0]).to(x.dtype)


@torch.library.custom_op("rvqllm::trellis_linear", mutates_args=())
def trellis_linear_op(x: Tensor, walks: Tensor, table: Tensor, scales: Tensor, bias: Tensor | None,
                      state_bits: int, step_bits: int, lut_bits: int) -> Tensor:
    """``x [..., n]`` → ``[..., out]``; see :func:`trellis_linear`."""
    return run_eager(x, walks, table, scales, bias, state_bits, step_bits, lut_bits)


@trellis_linear_op.register_fake
def _fake(x, walks, table, scales, bias, state_bits, step_bits, lut_bits):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def _setup_context(ctx, inputs, output):
    x, walks, table, scales, bias, state_bits, step_bits, lut_bits = inputs
    ctx.save_for_backward(x, walks, table, scales)
    ctx.code = (state_bits, step_bits, lut_bits)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    x, walks, table, scales = ctx.saved_tensors
    state_bits, step_bits, lut_bits = ctx.code
    need_x, _, need_table, need_scales, need_bias, *_ = ctx.needs_input_grad
    out = scales.shape[0]
    idx = trellis.walk_indices(walks, out, state_bits, step_bits, lut_bits)  # [out, n]
    unscaled = table.reshape(-1).float()[idx]  # [out, n]
    g2 = grad.reshape(-1, out).float()
    x2 = x.reshape(-1, x.shape[-1]).float()
    gx = gt = gs = gb = None
    if need_x:
        gx = (g2 @ (unscaled * scales.float()[:, None])).reshape(x.shape).to(x.dtype)
    if need_table or need_scales:
        dw = g2.T @ x2  # [out, n]
        if need_scales:
            gs = (dw * unscaled).sum(1).to(scales.dtype)
        if need_table:
            flat = torch.zeros(table.numel(), dtype=torch.float32, device=table.device)
            flat.index_add_(0, idx.reshape(-1), (dw * scales.float()[:, None]).reshape(-1))
            gt = flat.reshape(table.shape).to(table.dtype)
    if need_bias:
        gb = g2.sum(0).to(ctx.bias_dtype)
    return gx, None, gt, gs, gb, None, None, None


trellis_linear_op.register_autograd(_backward, setup_context=_setup_context)


def trellis_linear(x: Tensor, walks: Tensor, table: Tensor, scales: Tensor, bias: Tensor | None,
                   state_bits: int, step_bits: int, lut_bits: int) -> Tensor:
    """``y = x @ W.T + bias`` with ``W`` decoded from the packed walks (module docstring).

    ``x [..., n]`` → ``[..., out]`` in ``x.dtype``. Through the custom op ``torch.ops.rvqllm.trellis_linear``
    whenever autograd or ``torch.compile`` may need to see it (gradients for ``x``, ``table``, ``scales``
    and ``bias``; the backward decodes the weight whole), else the same implementation called directly."""
    if (not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or table.requires_grad or scales.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
        return run_eager(x, walks, table, scales, bias, state_bits, step_bits, lut_bits)
    return trellis_linear_op(x, walks, table, scales, bias, state_bits, step_bits, lut_bits)
