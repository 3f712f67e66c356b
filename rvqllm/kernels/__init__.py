"""Dequantize-matmul: the custom op, its implementations, and the one table that chooses between them.

* :mod:`.reference` — pure torch, the oracle for tests.
* :mod:`.cpu` (+ :mod:`.cpu_source`, :mod:`.cpu_build`) — compiled-on-first-use C++ kernels: lookup
  tables / fused decode for few tokens, tiled decode + BLAS for many.
* :mod:`.triton_kernels` — GPU: fused decode + ``tl.dot``, and decode-to-fp16 + cuBLAS (imported only
  when a CUDA tensor arrives; rvqllm never needs Triton to import).
* :mod:`.dispatch` — chooses one from device, token count and codebook shape.
* :mod:`.ops` — ``torch.ops.rvqllm.rvq_linear`` with fake and autograd registrations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import run_eager, rvq_linear_op
from .reference import dequantize, rvq_linear_reference


def rvq_linear(
    x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None, in_features: int
) -> Tensor:
    """``y = x @ W.T + bias`` with ``W`` decoded from ``codes``/``codebooks``/``scales`` (shapes as in
    :func:`.reference.dequantize`). ``x [..., in_features]`` → ``[..., out]`` in ``x.dtype``.

    Goes through the custom op ``torch.ops.rvqllm.rvq_linear`` whenever autograd or ``torch.compile``
    may need to see it; plain eager inference calls the same implementation directly, which saves the
    op dispatcher's few microseconds per call (a 30-block model makes 210 such calls per token).
    """
    if (
        not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and (x.requires_grad or codebooks.requires_grad or scales.requires_grad
                                              or (bias is not None and bias.requires_grad)))
    ):
        return run_eager(x, codes, codebooks, scales, bias, in_features)
    return rvq_linear_op(x, codes, codebooks, scales, bias, in_features)


__all__ = ["dequantize", "rvq_linear", "rvq_linear_op", "rvq_linear_reference"]
