"""A bitshift trellis code with computed codewords, coded by Viterbi (issue 13, technique 3).

A sequence of ``T`` scalars is coded as a walk through ``2**L`` states. Each step shifts ``k`` new bits
into an ``L``-bit state, ``s_t = ((s_{t-1} << k) | b_t) mod 2**L``, and emits the state's codeword
``v(s_t)``. The codewords are *computed* from the state (a multiplicative hash whose four bytes are
summed, then standardised: close to a unit Gaussian), so no codebook is stored and a decoder needs one
multiply and a byte sum per weight. The encoder picks the walk of least squared error by dynamic
programming over the states (Viterbi). Stored: the first state (``L`` bits) and ``k`` bits per later
step, so the rate is ``(L + (T - 1) k) / T`` bits per scalar (exactly what :func:`rate` reports; no
tail-biting trick hides the first state).

Measured on the unit Gaussian source (``scripts/bench_rd.py --trellis``); the model quantizer's
``coder: trellis`` codes each layer with it (:mod:`.trellis_layer`), stores the walks packed (the layout at
the bottom of this file) and decodes them with :mod:`rvqllm.kernels.trellis_op`.

Shapes: sources ``x [B, T]`` float32; states ``[B, T]`` int64 in ``[0, 2**L)``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_MUL = 0x9E3779B1  # Knuth's multiplicative-hash constant (odd, 32 bits)
_ADD = 0x7F4A7C15
_BYTE_SUM_MEAN = 4 * 127.5
_BYTE_SUM_STD = (4 * (256**2 - 1) / 12) ** 0.5


def codewords(states: Tensor) -> Tensor:
    """The computed codeword of each state (any integer shape): the four bytes of
    ``(s * _MUL + _ADD) mod 2**32`` summed and standardised. float32, mean ~0, variance ~1."""
    h = (states.to(torch.int64) * _MUL + _ADD) & 0xFFFFFFFF
    total = (h & 0xFF) + ((h >> 8) & 0xFF) + ((h >> 16) & 0xFF) + ((h >> 24) & 0xFF)
    return (total.to(torch.float32) - _BYTE_SUM_MEAN) / _BYTE_SUM_STD


def lut_index(states: Tensor, lut_bits: int) -> Tensor:
    """The top ``lut_bits`` bits of each state's multiplicative hash: an index into a ``2**lut_bits``-entry
    table of codewords (a table a CPU keeps in registers at 32 entries), int64, same shape."""
    if not 1 <= lut_bits <= 16:
        raise ValueError(f"need 1 <= lut_bits <= 16, got {lut_bits}")
    h = (states.to(torch.int64) * _MUL + _ADD) & 0xFFFFFFFF
    return h >> (32 - lut_bits)


def gaussian_lut(lut_bits: int) -> Tensor:
    """``[2**lut_bits]`` float32: the unit Gaussian's equiprobable quantiles (the midpoints of ``2**Q``
    equal-probability cells), scaled to unit mean square: the codewords :func:`lut_index` picks from."""
    p = (torch.arange(1 << lut_bits, dtype=torch.float64) + 0.5) / (1 << lut_bits)
    q = torch.special.ndtri(p)
    return (q / q.pow(2).mean().sqrt()).float()


def trained_lut(state_bits: int, step_bits: int, lut_bits: int, iters: int) -> Tensor:
    """``[2**Q]`` float32: a codeword table for the packed trellis ``(L, k, Q)`` trained on a unit Gaussian
    source by alternating Viterbi walks and centroid updates (Lloyd's algorithm with the trellis as the
    encoder), started from :func:`gaussian_lut`; ``iters`` 0 returns that start.

    The equiprobable quantiles suit ``k = 2`` (training lowers the Gaussian distortion by ~1 %); at ``k = 3``
    and ``4`` the walks want wider tables. Held out at ``L = 12``, ``Q = 5`` (``scripts/bench_rd.py --rates``;
    docs/RESULTS.md, session 22): ×1.43 → ×1.25 of the bound at ``k = 3`` after 32 iterations (settled), ×2.81
    → ×1.63 at ``k = 4`` after 32 and ×1.56 after 64 (still improving).
    Deterministic (a seeded source of ``2**16 >> max(0, L - 12)`` scalars, at least 4,096, so the time stays
    near constant in ``L``); cached per process. Entries never used by a walk keep their previous value."""
    return _trained_lut(state_bits, step_bits, lut_bits, iters).clone()


@functools.lru_cache(maxsize=16)
def _trained_lut(state_bits: int, step_bits: int, lut_bits: int, iters: int) -> Tensor:
    start = gaussian_lut(lut_bits)
    if iters <= 0:
        return start
    _check(state_bits, step_bits)
    rows = max(4, 64 >> max(0, state_bits - 12))
    x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(20_261_206))
    index = lut_index(digit_reverse(torch.arange(1 << state_bits), state_bits, step_bits), lut_bits)  # [2**L]
    table = start.double()
    for _ in range(iters):
        used = index[viterbi(x, state_bits, step_bits, values=table.float()[index])].flatten()
        sums = torch.zeros_like(table).index_add_(0, used, x.flatten().double())
        counts = torch.bincount(used, minlength=table.numel()).double()
        table = torch.where(counts > 0, sums / counts.clamp(min=1.0), table)
    return table.float()


def rate(length: int, state_bits: int, step_bits: int) -> float:
    """Stored bits per scalar of a ``length``-step walk."""
    return (state_bits + (length - 1) * step_bits) / length


def viterbi(x: Tensor, state_bits: int = 12, step_bits: int = 2, gain: float = 1.0,
            weights: Tensor | None = None, values: Tensor | None = None) -> Tensor:
    """States ``[B, T]`` of the walk minimising ``sum_t w_t (x_t - gain * v(s_t))^2`` for each row of ``x``
    (``weights [B, T]``, default all 1). ``values [2**L]``, when given, replaces ``gain * v`` (a table of
    the codewords as stored, e.g. rounded to fp16, or tuned).

    Every ``s_t`` is reachable from exactly ``2**step_bits`` states ``s_{t-1}`` (the top bits that
    shift out); the first state is free. On the CPU this runs the compiled kernel
    (``rvq_trellis_viterbi``: ``T x 2**(L - k)`` bytes of back-pointers per thread, one thread per row,
    time ``O(B T 2**L)``); elsewhere, or where the CPU kernels cannot be built (said once, loudly, by
    :func:`rvqllm.kernels.cpu_build.load_library`), the torch path :func:`viterbi_torch`."""
    _check(state_bits, step_bits)
    if weights is not None and weights.shape != x.shape:
        raise ValueError(f"weights of shape {list(weights.shape)} do not match x {list(x.shape)}")
    if x.device.type == "cpu":
        from ..kernels.cpu_build import load_library

        lib = load_library()
        if lib is not None:
            return _viterbi_cpu(lib, x, state_bits, step_bits, gain, weights, values)
    return viterbi_torch(x, state_bits, step_bits, gain, weights, values)


def _check(state_bits: int, step_bits: int) -> None:
    if not (1 <= step_bits <= 8 and step_bits < state_bits <= 24):  # back-pointers are uint8
        raise ValueError(f"need 1 <= step_bits <= 8 and step_bits < state_bits <= 24, got k={step_bits}, "
                         f"L={state_bits}")


def codeword_table(state_bits: int, gain: float, values: Tensor | None, device: torch.device) -> Tensor:
    """``[2**L]`` float32 codeword of every state on ``device``: ``values`` or ``gain * v``."""
    if values is None:
        return decode(torch.arange(1 << state_bits, device=device), gain)
    if values.shape != (1 << state_bits,):
        raise ValueError(f"values of shape {list(values.shape)} for {1 << state_bits} states")
    return values.detach().to(device=device, dtype=torch.float32)


def _viterbi_cpu(lib, x: Tensor, state_bits: int, step_bits: int, gain: float, weights: Tensor | None,
                 values: Tensor | None) -> Tensor:
    x = x.detach().float().contiguous()
    b, t = x.shape
    values = codeword_table(state_bits, gain, values, x.device).contiguous()
    w = None if weights is None else weights.detach().float().contiguous()
    states = torch.empty(b, t, dtype=torch.int32)
    rc = lib.rvq_trellis_viterbi(x.data_ptr(), None if w is None else w.data_ptr(), b, t, state_bits, step_bits,
                                 values.data_ptr(), states.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"trellis Viterbi: could not allocate {t} x {1 << (state_bits - step_bits)} back-pointers "
                          "per thread") if rc == -2 else ValueError("trellis Viterbi: bad sizes")
    return states.to(torch.int64)


def viterbi_torch(x: Tensor, state_bits: int = 12, step_bits: int = 2, gain: float = 1.0,
                  weights: Tensor | None = None, values: Tensor | None = None) -> Tensor:
    """:func:`viterbi` in torch on ``x``'s device (any device). Memory: ``B x T x 2**L`` back-pointers
    (uint8) plus a few ``[B, 2**L]`` float32 rows; time ``O(B T 2**(L + k))``."""
    _check(state_bits, step_bits)
    x = x.float()
    b, t = x.shape
    w = torch.ones_like(x) if weights is None else weights.float()
    n, k = 1 << state_bits, 1 << step_bits
    values = codeword_table(state_bits, gain, values, x.device)  # [n]
    # predecessors of state s: (s >> step_bits) + j * 2**(L - step_bits), j < 2**step_bits
    pred = (torch.arange(n, device=x.device)[:, None] >> step_bits) + \
        torch.arange(k, device=x.device)[None, :] * (n >> step_bits)  # [n, k]
    cost = w[:, :1] * (x[:, :1] - values[None, :]).pow(2)  # [B, n]
    back = torch.empty(t, b, n, dtype=torch.uint8, device=x.device)
    for i in range(1, t):
        best, arg = cost[:, pred].min(dim=2)  # [B, n]
        back[i] = arg.to(torch.uint8)
        cost = best + w[:, i : i + 1] * (x[:, i : i + 1] - values[None, :]).pow(2)
    states = torch.empty(b, t, dtype=torch.int64, device=x.device)
    states[:, -1] = cost.argmin(dim=1)
    rows = torch.arange(b, device=x.device)
    for i in range(t - 1, 0, -1):
        j = back[i, rows, states[:, i]].to(torch.int64)
        states[:, i - 1] = pred[states[:, i], j]
    return states


def decode(states: Tensor, gain: float = 1.0) -> Tensor:
    """``gain * v(states)``, float32, same shape."""
    return gain * codewords(states)


def quantize(x: Tensor, state_bits: int = 12, step_bits: int = 2, gain: float = 1.0,
             rows_per_chunk: int = 8) -> tuple[Tensor, Tensor]:
    """``(states, reconstruction)`` of ``x [B, T]``, coded ``rows_per_chunk`` rows at a time (bounds the
    back-pointer memory to ``rows_per_chunk x T x 2**L`` bytes)."""
    states = torch.cat([viterbi(x[i : i + rows_per_chunk], state_bits, step_bits, gain)
                        for i in range(0, x.shape[0], rows_per_chunk)])
    return states, decode(states, gain)


# ---------------------------------------------------------------------------------------------------------
# Packed walks: the checkpoint's and the kernels' layout.
#
# A walk of ``T`` states is stored as a little-endian bit string of ``L + k (T - 1)`` bits (bit ``b`` is bit
# ``b % 8`` of byte ``b // 8``) in which the state of step ``t`` is the ``L`` bits from bit ``k t`` on, read
# least significant first. Successive windows overlap in ``L - k`` bits, so each step adds its ``k`` new bits
# at the *top* of the window: ``p_t = (p_{t-1} >> k) | (b_t << (L - k))``. The coder above shifts new bits in
# at the bottom; the two are the same code under the relabelling :func:`digit_reverse` (reverse the order of
# the ``L / k`` digits of ``k`` bits), which :func:`pack_walks` applies, so ``L`` must be a multiple of ``k``.
# A packed state's codeword index is ``lut_index(p, Q)`` of the *packed* state, which is what the kernels
# compute; the coder is given the table ``packed_values`` so it chooses walks against exactly that.


def walk_bytes(length: int, state_bits: int, step_bits: int) -> int:
    """Bytes of one packed walk of ``length`` states: ``ceil((L + k (length - 1)) / 8)``."""
    return -(-(state_bits + step_bits * (length - 1)) // 8)


def digit_reverse(states: Tensor, state_bits: int, step_bits: int) -> Tensor:
    """``states`` (any shape, int64) with the order of their ``L / k`` digits of ``k`` bits reversed: the
    bijection between the coder's states and the packed ones (its own inverse)."""
    if state_bits % step_bits:
        raise ValueError(f"packed walks need state_bits a multiple of step_bits, got L={state_bits}, k={step_bits}")
    digits = state_bits // step_bits
    mask = (1 << step_bits) - 1
    out = torch.zeros_like(states)
    for i in range(digits):
        out |= ((states >> (step_bits * i)) & mask) << (step_bits * (digits - 1 - i))
    return out


def packed_values(table: Tensor, state_bits: int, step_bits: int, lut_bits: int) -> Tensor:
    """``[2**L]`` float32: the codeword of each *coder* state ``s`` when stored packed: ``table[lut_index(
    digit_reverse(s), Q)]`` for a ``[2**Q]`` table. Give it to :func:`viterbi` as ``values``."""
    s = torch.arange(1 << state_bits, device=table.device)
    return table.float()[lut_index(digit_reverse(s, state_bits, step_bits), lut_bits)]


def pack_walks(states: Tensor, state_bits: int, step_bits: int) -> Tensor:
    """``states [B, T]`` (the coder's, from :func:`viterbi`) → packed walks ``[B, walk_bytes(T)]`` uint8.

    Raises :class:`ValueError` when the states are not a walk (a step that does not shift the previous
    state's bits)."""
    p = digit_reverse(states.to(torch.int64), state_bits, step_bits)  # [B, T] packed windows
    b, t = p.shape
    keep = state_bits - step_bits
    if t > 1 and not torch.equal(p[:, 1:] & ((1 << keep) - 1), p[:, :-1] >> step_bits):
        raise ValueError(f"pack_walks: these states are not a walk of the trellis (L={state_bits}, k={step_bits})")
    nbits = state_bits + step_bits * (t - 1)
    bits = torch.empty(b, walk_bytes(t, state_bits, step_bits) * 8, dtype=torch.uint8, device=p.device)
    bits.zero_()
    bits[:, :state_bits] = ((p[:, :1] >> torch.arange(state_bits, device=p.device)) & 1).to(torch.uint8)
    if t > 1:
        new = p[:, 1:] >> keep  # [B, T-1] the k new (top) bits of each later window
        bits[:, state_bits:nbits] = ((new[:, :, None] >> torch.arange(step_bits, device=p.device)) & 1) \
            .reshape(b, -1).to(torch.uint8)
    weights = (1 << torch.arange(8, device=p.device, dtype=torch.int32))
    return (bits.reshape(b, -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_windows(walks: Tensor, length: int, state_bits: int, step_bits: int) -> Tensor:
    """Packed walks ``[B, bytes]`` uint8 → the packed states ``p [B, length]`` int64 (the windows the kernels
    read; :func:`lut_index` of them indexes the layer's table)."""
    b = walks.shape[0]
    need = walk_bytes(length, state_bits, step_bits)
    if walks.shape[1] < need:
        raise ValueError(f"packed walks of {walks.shape[1]} bytes for {length} states need {need}")
    bits = ((walks[:, :need, None].to(torch.int64) >> torch.arange(8, device=walks.device)) & 1).reshape(b, -1)
    pos = step_bits * torch.arange(length, device=walks.device)[:, None] + \
        torch.arange(state_bits, device=walks.device)[None, :]  # [length, L]
    return (bits[:, pos] << torch.arange(state_bits, device=walks.device)).sum(-1)


def walk_indices(walks: Tensor, out: int, state_bits: int, step_bits: int, lut_bits: int) -> Tensor:
    """``[out, n]`` int64: the table entry of every weight of a trellis-coded layer whose packed walks are
    ``walks [n, bytes]`` (row ``o`` of column ``j``: ``lut_index(p(j, o), Q)``)."""
    return lut_index(unpack_windows(walks, out, state_bits, step_bits), lut_bits).T


def walk_dequantize(walks: Tensor, table: Tensor, scales: Tensor, state_bits: int, step_bits: int,
                    lut_bits: int) -> Tensor:
    """The reference decoder of a trellis-coded layer: ``walks [n, bytes]`` (column ``j``'s walk down the
    ``out`` rows), ``table [2**Q]``, ``scales [out]`` → ``W [out, n]`` float32 with
    ``W[o, j] = table[lut_index(p(j, o), Q)] * scales[o]``."""
    out = scales.shape[0]
    return table.float()[walk_indices(walks, out, state_bits, step_bits, lut_bits)] * scales.float()[:, None]
