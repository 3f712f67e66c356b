"""Dequantize-matmul implementations and the one place that chooses between them.

Today there is one implementation, the pure-torch reference (:mod:`.reference`), which decodes the
weight then multiplies. Faster paths (CPU lookup tables, Triton) plug in behind :func:`rvq_linear`.
"""

from __future__ import annotations

from torch import Tensor

from .reference import dequantize, rvq_linear_reference


def rvq_linear(
    x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None, in_features: int
) -> Tensor:
    """``y = x @ W.T + bias`` with ``W`` decoded from ``codes``/``codebooks``/``scales`` (shapes as in
    :func:`.reference.dequantize`). ``x [..., in_features]`` → ``[..., out]`` in ``x.dtype``."""
    return rvq_linear_reference(x, codes, codebooks, scales, bias, in_features)


__all__ = ["dequantize", "rvq_linear", "rvq_linear_reference"]
