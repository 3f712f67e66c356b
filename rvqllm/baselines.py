"""Round-to-nearest scalar quantization: the floor every rvqllm preset is measured against.

Asymmetric, per group of ``group`` consecutive input columns of each row, with an fp16 scale and an
fp16 zero (the minimum) per group, as in the PEERS.md rows. Used by ``scripts/bench_quality.py``: the
weights are replaced by their round trip (fake quantization), which is all a perplexity needs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .arch import find_blocks, find_linears, is_conv1d, linear_weight


def rtn_roundtrip(w: Tensor, bits: int, group: int = 128) -> Tensor:
    """``w [out, in]`` → its RTN reconstruction (same shape and dtype).

    Each row is cut into groups of ``group`` columns (the last one may be shorter); a group stores codes
    in ``[0, 2**bits)``, ``scale = (max - min) / (2**bits - 1)`` and ``zero = min``, both rounded to fp16.
    """
    out, inp = w.shape
    levels = (1 << bits) - 1
    n_groups = -(-inp // group)
    x = nn.functional.pad(w.float(), (0, n_groups * group - inp)).reshape(out, n_groups, group)
    valid = (torch.arange(n_groups * group) < inp).reshape(1, n_groups, group)
    lo = torch.where(valid, x, torch.inf).amin(-1, keepdim=True)
    hi = torch.where(valid, x, -torch.inf).amax(-1, keepdim=True)
    zero = lo.half().float()
    scale = ((hi - lo) / levels).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((x - zero) / safe).round().clamp(0, levels)
    rec = torch.where(scale > 0, q * scale + zero, zero.expand_as(x))
    return rec.reshape(out, n_groups * group)[:, :inp].to(w.dtype)


def rtn_bits(out: int, inp: int, bits: int, group: int = 128) -> int:
    """Stored bits of one RTN layer: the codes plus an fp16 scale and zero per group."""
    return out * inp * bits + out * -(-inp // group) * 32


def rtn_quantize_(model: nn.Module, bits: int, group: int = 128, skip: list[str] | None = None) -> dict:
    """Replace every decoder-block linear weight of ``model`` by its RTN round trip, in place.

    Returns ``{"layers", "weights", "bits", "bpw"}`` for the quantized layers (all-in, as PROTOCOL.md counts).
    """
    prefix, blocks = find_blocks(model)
    total_bits = weights = layers = 0
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for module in find_linears(block, f"{prefix}.{i}", skip if skip is not None else ["lm_head"]).values():
                w = linear_weight(module)
                rec = rtn_roundtrip(w, bits, group)
                module.weight.copy_(rec.T if is_conv1d(module) else rec)  # Conv1D stores [in, out]
                total_bits += rtn_bits(w.shape[0], w.shape[1], bits, group)
                weights += w.numel()
                layers += 1
    return {"layers": layers, "weights": weights, "bits": total_bits, "bpw": total_bits / max(weights, 1)}
