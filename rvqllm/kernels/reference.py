"""The pure-torch reference dequantize-matmul: the oracle every faster kernel is tested against."""

from __future__ import annotations

import torch
from torch import Tensor


def dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor, in_features: int) -> Tensor:
    """Decode a stored RVQ weight.

    Args:
        codes: ``[out, in_groups, stages]`` uint8/int16 (int16 holds 16-bit codes as bit patterns).
        codebooks: ``[stages, 2**bits, vector_dim]`` fp16.
        scales: ``[out]`` fp16.
        in_features: original input width (``<= in_groups * vector_dim``).
    Returns:
        ``[out, in_features]`` float32.
    """
    out, groups, stages = codes.shape
    d = codebooks.shape[-1]
    idx = codes.long()
    if codes.dtype == torch.int16:
        idx = idx & 0xFFFF
    vecs = codebooks[0].float()[idx[..., 0]]
    for s in range(1, stages):
        vecs = vecs + codebooks[s].float()[idx[..., s]]
    w = vecs.reshape(out, groups * d)[:, :in_features]
    return w * scales.float()[:, None]


def rvq_linear_reference(
    x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None, in_features: int
) -> Tensor:
    """``x @ dequantize(...).T + bias`` computed in float32, returned in ``x.dtype``.

    Args:
        x: ``[..., in_features]``. bias: ``[out]`` or None.
    Returns:
        ``[..., out]`` in ``x.dtype``.
    """
    w = dequantize(codes, codebooks, scales, in_features)
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)
