"""QuantizedLinear: an ``nn.Linear`` stand-in that holds RVQ buffers and calls one op."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .kernels import dequantize, rvq_linear
from .rvq import RVQWeight, code_dtype, pack


class QuantizedLinear(nn.Module):
    """A linear layer whose weight stays compressed in memory and is decoded on the fly.

    Buffers (all saved in the checkpoint):
        codes: ``[out_features, in_groups, stages]`` uint8 (bits <= 8) or int16.
        codebooks: ``[stages, 2**bits, vector_dim]`` fp16.
        scales: ``[out_features]`` fp16.
        bias: ``[out_features]`` (the original layer's dtype), or absent.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        vector_dim: int,
        stages: int,
        bits: int,
        bias: bool,
        bias_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.vector_dim = vector_dim
        self.stages = stages
        self.bits = bits
        groups = -(-in_features // vector_dim)
        self.register_buffer("codes", torch.zeros(out_features, groups, stages, dtype=code_dtype(bits), device=device))
        self.register_buffer(
            "codebooks", torch.zeros(stages, 1 << bits, vector_dim, dtype=torch.float16, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_rvq(cls, q: RVQWeight, bits: int, bias: Tensor | None) -> QuantizedLinear:
        """Build from an :class:`RVQWeight` (``bits`` is the code width) and the original bias."""
        out, _, stages = q.codes.shape
        layer = cls(
            q.in_features,
            out,
            vector_dim=q.codebooks.shape[-1],
            stages=stages,
            bits=bits,
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float16,
        )
        layer.codes.copy_(pack(q.codes, bits))
        layer.codebooks.copy_(q.codebooks.half())
        layer.scales.copy_(q.scales.half())
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return rvq_linear(x, self.codes, self.codebooks, self.scales, self.bias, self.in_features)

    def dequantized_weight(self) -> Tensor:
        """``[out_features, in_features]`` float32, for tests and analysis (forward goes through the op)."""
        return dequantize(self.codes, self.codebooks, self.scales, self.in_features)

    def spec(self) -> dict[str, int]:
        """The per-layer parameters a checkpoint stores to rebuild this module."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "vector_dim": self.vector_dim,
            "stages": self.stages,
            "bits": self.bits,
            "bias": self.bias is not None,
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, vector_dim={self.vector_dim}, "
            f"stages={self.stages}, bits={self.bits}, bias={self.bias is not None}"
        )
