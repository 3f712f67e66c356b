"""Codes in the smallest integer dtype that holds them.

Codes of up to 8 bits are stored as ``uint8``, up to 15 bits as ``int16`` and 16 bits as ``int16``
holding the two's-complement bit pattern (``pack`` / ``unpack`` convert exactly). Sizes are counted in
these stored bits (see :mod:`rvqllm.size`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def code_dtype(bits: int) -> torch.dtype:
    """The storage dtype for codes of ``bits`` bits."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    return torch.uint8 if bits <= 8 else torch.int16


def pack(codes: Tensor, bits: int) -> Tensor:
    """int64 codes in ``[0, 2**bits)`` → storage dtype (same shape)."""
    dtype = code_dtype(bits)
    if dtype == torch.int16:
        c = codes.long()
        return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)
    return codes.to(dtype)


def unpack(packed: Tensor) -> Tensor:
    """Storage dtype → int64 codes in ``[0, 2**bits)`` (same shape)."""
    c = packed.long()
    if packed.dtype == torch.int16:
        c = c & 0xFFFF
    return c
