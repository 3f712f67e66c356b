"""Random orthogonal input rotations: a seeded sign flip followed by a block-diagonal Walsh-Hadamard transform.

For a linear layer ``y = W x`` (``W [out, n]``) and an orthogonal ``R [n, n]``, ``W x = (W R)(R^T x)``.
Coding ``W' = W R`` instead of ``W`` spreads a few large input columns (activation outliers, which the
Hessian makes expensive) over whole Hadamard blocks, so no single coded vector has to carry them.

Here ``R = diag(signs) · blockdiag(H_b, ..., H_b) / sqrt(b)`` with ``H_b`` the ``b x b`` Sylvester
Hadamard matrix (``b`` a power of two) and ``signs`` a seeded random ±1 vector. ``H_b / sqrt(b)`` is
symmetric and its own inverse, so, acting on row vectors ``v`` (inputs ``x``, weight rows)::

    v R   = hadamard(v * signs)        (rotate:   W' = W R, x' = x R)
    v R^T = hadamard(v) * signs        (unrotate: W  = W' R^T)

where ``hadamard`` applies ``H_b / sqrt(b)`` to every block of ``b`` consecutive entries.

Width: a rotated layer is rotated over its *coded* width ``n = in_groups * vector_dim`` (``in_features``
zero-padded to a multiple of ``vector_dim``), which the codes cover anyway, so padding costs nothing
and an odd ``in_features`` still gets blocks of at least the largest power of two dividing
``vector_dim``. ``b`` is the largest power of two dividing ``n``, capped at :data:`MAX_BLOCK`. When
``n`` is odd (an odd ``vector_dim`` and an odd number of groups) ``b = 1``: the rotation degenerates
to the sign flip alone, which is orthogonal and harmless but spreads nothing.

Device: the transforms run on the device of the tensor they transform (the Hadamard matrix is cached per
device, the signs are moved there if needed); the signs are drawn on a CPU generator, so a seed gives the
same signs on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: largest Hadamard block (a power of two). Bigger blocks spread outliers further but cost more per token
#: (the transform is a ``[.., b] @ [b, b]`` matmul per block); see docs/ROTATION.md for the measurement.
MAX_BLOCK = 64
#: added to the layer's quantization seed to draw its signs (the signs are stored, so only determinism matters)
SIGN_SEED_OFFSET = 0x5EED


def block_size(n: int, max_block: int = MAX_BLOCK) -> int:
    """The Hadamard block for a rotation of width ``n``: the largest power of two dividing ``n``, at most ``max_block``."""
    if n < 1 or max_block < 1:
        raise ValueError(f"rotation width {n} and max block {max_block} must be positive")
    b = n & -n  # largest power of two dividing n
    cap = 1 << (max_block.bit_length() - 1)  # largest power of two <= max_block
    return min(b, cap)


def random_signs(n: int, seed: int, device: torch.device | str | None = None) -> Tensor:
    """``[n]`` int8 of ±1, a deterministic function of ``seed`` (drawn on the CPU), on ``device`` (default CPU)."""
    gen = torch.Generator().manual_seed(int(seed) + SIGN_SEED_OFFSET)
    signs = (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8) * 2 - 1).to(torch.int8)
    return signs if device is None else signs.to(device)


def _sylvester(b: int, device: torch.device) -> Tensor:
    """``H_b / sqrt(b)`` in float64, built on ``device`` (exact entries, one IEEE division)."""
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / b**0.5


_CACHE: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def hadamard_matrix(b: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The orthonormal ``b x b`` Sylvester Hadamard matrix ``H_b / sqrt(b)`` (symmetric, its own inverse).

    Cached per ``(b, dtype, device)``: callers must not modify it."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    key = (b, dtype, device)
    h = _CACHE.get(key)
    if h is None:
        if b < 1 or b & (b - 1):
            raise ValueError(f"Hadamard block {b} is not a power of two")
        h = _CACHE[key] = _sylvester(b, device).to(dtype=dtype)
    return h


def hadamard(v: Tensor, block: int) -> Tensor:
    """``H_b / sqrt(b)`` applied to every block of ``block`` consecutive entries of ``v``'s last dim.

    Returns a new tensor of ``v``'s shape, dtype and device (``v`` itself when ``block == 1``)."""
    if block == 1:
        return v
    h = hadamard_matrix(block, v.dtype, v.device)
    return (v.reshape(-1, block) @ h).reshape(v.shape)


def rotate(v: Tensor, signs: Tensor, block: int) -> Tensor:
    """``v R`` for row vectors ``v [..., n]`` (float): ``W' = rotate(W)``, ``x' = rotate(x)``."""
    if signs.device != v.device:
        signs = signs.to(v.device)
    return hadamard(v * signs, block)  # int8 signs promote to v's float dtype


def unrotate(v: Tensor, signs: Tensor, block: int) -> Tensor:
    """``v R^T`` (the inverse of :func:`rotate`): ``W = unrotate(W')``."""
    if signs.device != v.device:
        signs = signs.to(v.device)
    return hadamard(v, block) * signs


def rotate_hessian(h: Tensor, signs: Tensor, block: int) -> Tensor:
    """``R^T H R`` for a symmetric ``H [n, n]`` (the Hessian of the rotated inputs ``x' = x R``).

    On ``h``'s device, which is not modified. Besides ``h``, at most two ``[n, n]`` matrices are alive at
    once (the result is the transpose of a contiguous matrix)."""
    if signs.device != h.device:
        signs = signs.to(h.device)
    hr = rotate(h, signs, block)  # H R: every row of H times R
    t = hr.T.contiguous()
    del hr
    t.mul_(signs)  # rotate(t) is hadamard(t * signs): the product in place, on a matrix we own
    return hadamard(t, block).T  # ((H R)^T R)^T = R^T H R


def matrix(signs: Tensor, block: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The dense ``R [n, n]`` (tests and analysis), on the signs' device."""
    n = signs.shape[0]
    return rotate(torch.eye(n, dtype=dtype, device=signs.device), signs, block)
