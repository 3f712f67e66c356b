"""A linear layer's weight coded by the bitshift trellis (issue 13's technique 3), with error feedback.

The weight ``W [out, in]`` is rotated as the RVQ path rotates it (:mod:`.rotation`: ``W R`` against
``R^T H R``), each row is divided by an fp16 scale (the row's RMS, weighted by the Hessian diagonal as
:func:`.residual.column_importance` weighs it), and then every input column ``j``, left to right, is
coded as one trellis walk down the ``out`` rows (:func:`.trellis.viterbi`; each row's squared error
weighted by its scale squared, so the walk minimises the column's error in the layer's own units). The
column's error is then pushed onto the columns not yet coded through the upper Cholesky factor ``U`` of
``H^-1`` (GPTQ's update; LDLQ in QuIP's terms), lazily in blocks of columns. Coding a column as a whole is
what lets the feedback be exact column by column: the walk's cost is separable over the rows, and all rows
of a column share the factor ``1 / U_jj^2``.

Stored per column: the walk's first state (``L`` bits) and ``k`` bits per later row; per row an fp16
scale; the rotation's signs. No codebook: a state's value is computed from it (:func:`.trellis.codewords`)
or read from a small table by its hash (``values``; :func:`.trellis.lut_index`).

The pipeline (config ``coder: trellis``) codes against the table of :func:`.trellis.packed_values` with
``pad_to=1`` and stores the result as a :class:`rvqllm.nn.TrellisLinear` (packed walks, the fp16 table,
scales, signs); ``scripts/bench_layer_techniques.py --trellis`` and ``scripts/bench_coders.py`` measure
the coder in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.cpu_build import load_library
from . import rotation, trellis
from .residual import DAMP, column_importance, inverse_hessian_factor, rotated_problem, row_scales


@dataclass
class TrellisWeight:
    """A weight in trellis form (unpacked).

    Attributes:
        states: ``[n, out]`` int64: column ``j``'s walk down the rows, ``n`` the rotated (padded) width.
        scales: ``[out]`` float32, exact in fp16.
        in_features: the original input width (``<= n``).
        signs: ``[n]`` int8 ±1 and ``rotation_block``: the rotation ``R`` of :mod:`.rotation`.
        state_bits, step_bits, gain: the code (``L``, ``k``, and the factor on the computed codewords).
        values: ``[2**L]`` float32 codeword table the walks were chosen against, or ``None``: ``gain``
            times the computed codewords.
    """

    states: Tensor
    scales: Tensor
    in_features: int
    signs: Tensor
    rotation_block: int
    state_bits: int
    step_bits: int
    gain: float
    values: Tensor | None = None

    def table(self) -> Tensor:
        """``[2**L]`` float32: the codeword of every state."""
        return trellis.codeword_table(self.state_bits, self.gain, self.values, self.states.device)

    def dequantize(self) -> Tensor:
        """``[out, in_features]`` float32 reconstruction in the original basis."""
        w = self.table()[self.states].T * self.scales[:, None]
        return rotation.unrotate(w, self.signs, self.rotation_block)[:, : self.in_features]

    def code_bits(self) -> int:
        """Stored bits of the walks (first states whole, ``k`` per later step): codes only."""
        n, out = self.states.shape
        return n * (self.state_bits + (out - 1) * self.step_bits)

    def bits(self) -> int:
        """Everything stored: the walks, the fp16 scales and the int8 rotation signs."""
        return self.code_bits() + 16 * self.scales.numel() + 8 * self.signs.numel()


def quantize_weight_trellis(weight: Tensor, hessian: Tensor, *, state_bits: int = 12, step_bits: int = 2,
                            gain: float = 1.0, seed: int = 0, damp: float = DAMP, pad_to: int = 8,
                            block: int = 128, values: Tensor | None = None) -> TrellisWeight:
    """Code ``weight [out, in]`` against its input Hessian ``hessian [in, in]`` (module docstring).

    ``values [2**L]``: the codeword table to code with (default ``gain`` times the computed codewords;
    e.g. their fp16 rounding, as a checkpoint stores them); the result's ``table()`` returns it.

    The width is padded to a multiple of ``pad_to`` (the rotation's width; 8 matches the RVQ presets'
    ``vector_dim``, so both codes see the same rotated weight). ``damp`` as in
    :func:`.residual.quantize_weight`. The Viterbi runs on the CPU (the compiled one, each column moved
    there and back when the weight is on a GPU); the feedback on the weight's device. Without the compiled
    kernels (said once, loudly), the torch Viterbi on the weight's device.
    """
    out, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"the trellis coder needs the full [{in_features}, {in_features}] input Hessian, "
                         f"got {list(hessian.shape)}")
    n = -(-in_features // pad_to) * pad_to
    w, h, signs, rblock = rotated_problem(weight, hessian, n, seed, rotation.MAX_BLOCK)
    device = w.device
    scales = row_scales(w, column_importance(h, n, n, True, device, damp=damp))
    row_weight = scales.pow(2)[None, :]  # [1, out]

    u, dead = inverse_hessian_factor(h, damp, overwrite=True)
    del h
    w.masked_fill_(dead, 0.0)
    states = torch.empty(n, out, dtype=torch.int64, device=device)
    table = trellis.codeword_table(state_bits, gain, values, device)
    viterbi_on_host = device.type != "cpu" and load_library() is not None
    row_cpu, table_cpu = row_weight.cpu(), table.cpu()
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        for j in range(b1 - b0):
            target = (wb[:, j] / scales)[None, :]
            if viterbi_on_host:  # the compiled Viterbi: one walk is a chain of small steps, slow as GPU kernels
                s = trellis.viterbi(target.cpu(), state_bits, step_bits, gain, row_cpu, table_cpu)[0].to(device)
            else:
                s = trellis.viterbi(target, state_bits, step_bits, gain, row_weight, table)[0]
            states[b0 + j] = s
            e = (wb[:, j] - table[s] * scales) / u[b0 + j, b0 + j]
            err[:, j] = e
            wb[:, j + 1 :] -= e[:, None] * u[b0 + j, b0 + j + 1 : b1][None, :]
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return TrellisWeight(states, scales, in_features, signs, rblock, state_bits, step_bits, gain,
                         None if values is None else table)
