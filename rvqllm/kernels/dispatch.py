"""The one dispatch table: which implementation runs a dequantize-matmul.

The choice depends on the device, the number of tokens ``T`` (rows of ``x`` after flattening), and the
codebook shape (``stages S``, ``K = 2**bits`` codewords, ``vector_dim d``) against the output width:

============  ==========================================  ===========================================
device        condition                                   implementation
============  ==========================================  ===========================================
cpu           C++ kernels unavailable, or d > 64          ``reference`` (after one loud warning)
cpu           T <= LUT16_MAX_TOKENS, K = 256, uint8 codes,  ``cpu_lut16``: int16 lookup tables read 32 outputs
              AVX-512BW compiled in                       at a time with AVX-512 permutes
cpu           T <= LUT_MAX_TOKENS and K*d <= out          ``cpu_lut``: float lookup tables, gather-sum
cpu           T <= DECODE_MAX_TOKENS                      ``cpu_decode``: fused decode-dot
cpu           otherwise (prefill)                         ``cpu_tiled``: decode row tiles + BLAS
cuda          Triton missing                              ``reference`` (after one loud warning)
cuda          T <= TRITON_FUSED_MAX_TOKENS                ``triton_fused``: decode + tl.dot in one kernel
cuda          otherwise                                   ``triton_dequant_mm``: decode to fp16, cuBLAS
other         always                                      ``reference`` (after one loud warning)
============  ==========================================  ===========================================

``RVQLLM_KERNEL=<name>`` forces one implementation (benchmarks, debugging); the thresholds come from
``scripts/bench_kernels.py`` runs recorded in docs/KERNELS.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from . import cpu
from .cpu_build import warn_once
from .reference import rvq_linear_reference

LUT16_MAX_TOKENS = 4
LUT_MAX_TOKENS = 1
DECODE_MAX_TOKENS = 8
TRITON_FUSED_MAX_TOKENS = 16

Impl = Callable[..., Tensor]  # (x2 [T, in] , codes, codebooks, scales, bias, in_features) -> [T, out]


def _reference(x, codes, codebooks, scales, bias, in_features):
    return rvq_linear_reference(x, codes, codebooks, scales, bias, in_features)


def _triton(name: str) -> Impl:
    from . import triton_kernels

    return getattr(triton_kernels, name)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


IMPLS: dict[str, Callable[[], Impl]] = {
    "reference": lambda: _reference,
    "cpu_lut16": lambda: cpu.lut16_gemv,
    "cpu_lut": lambda: cpu.lut_gemv,
    "cpu_decode": lambda: cpu.decode_gemv,
    "cpu_tiled": lambda: cpu.tiled_matmul,
    "triton_fused": lambda: _triton("fused_linear"),
    "triton_dequant_mm": lambda: _triton("dequant_linear"),
}


def choose(device_type: str, n_tokens: int, stages: int, n_codes: int, vector_dim: int, out_features: int,
           code_dtype: torch.dtype = torch.uint8) -> str:
    """Name of the implementation for this call (see the module table). May build the CPU kernels."""
    name = forced("RVQLLM_KERNEL", IMPLS)
    if name:
        return name
    if device_type == "cpu":
        if vector_dim > cpu.MAX_VECTOR_DIM:
            warn_once("cpu-d", f"vector_dim={vector_dim} > {cpu.MAX_VECTOR_DIM} has no CPU fast kernel; using the "
                      "slow pure-torch reference. Fix: quantize with vector_dim <= 64.")
            return "reference"
        if not cpu.available():
            return "reference"
        if (n_tokens <= LUT16_MAX_TOKENS and n_codes == 256 and code_dtype == torch.uint8
                and cpu.has_lut16()):
            return "cpu_lut16"
        if n_tokens <= LUT_MAX_TOKENS and n_codes * vector_dim <= out_features:
            return "cpu_lut"
        if n_tokens <= DECODE_MAX_TOKENS:
            return "cpu_decode"
        return "cpu_tiled"
    return choose_gpu(device_type, n_tokens, "triton_fused", "triton_dequant_mm")


def forced(env: str, impls: dict) -> str | None:
    """The implementation the environment variable ``env`` forces (benchmarks, debugging), or ``None``;
    :class:`ValueError` when it names none of ``impls``."""
    name = os.environ.get(env)
    if name and name not in impls:
        raise ValueError(f"{env}={name!r} is not one of {sorted(impls)}")
    return name or None


def choose_gpu(device_type: str, n_tokens: int, fused: str, dequant: str) -> str:
    """Beyond the CPU: on CUDA ``fused`` for few tokens (``<= TRITON_FUSED_MAX_TOKENS``), else ``dequant``;
    ``"reference"`` without Triton or on any other device, each said once, loudly. Shared by the RVQ and
    the trellis dispatch (:mod:`.trellis_op`)."""
    if device_type == "cuda":
        if not triton_available():
            warn_once("triton", "Triton is not installed, so quantized layers on CUDA use the slow pure-torch "
                      "reference (decodes every weight whole per call). Fix: pip install triton.")
            return "reference"
        return fused if n_tokens <= TRITON_FUSED_MAX_TOKENS else dequant
    warn_once(f"device-{device_type}", f"no fast rvqllm kernel for device {device_type!r}; using the slow "
              "pure-torch reference. Fix: run on CPU or CUDA.")
    return "reference"


def run(x2: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
        in_features: int) -> Tensor:
    """Dispatch one call. ``x2 [T, in_features]`` → ``[T, out]`` (float32 on CPU fast paths; callers cast)."""
    name = choose(x2.device.type, x2.shape[0], codes.shape[2], codebooks.shape[1], codebooks.shape[2],
                  codes.shape[0], codes.dtype)
    return IMPLS[name]()(x2, codes, codebooks, scales, bias, in_features)


def get_impl(name: str) -> Impl:
    """The implementation registered under ``name`` (tests call each one directly)."""
    return IMPLS[name]()


__all__ = ["IMPLS", "choose", "get_impl", "run", "torch"]
