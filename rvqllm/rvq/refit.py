"""Joint least-squares re-fit of all RVQ codebooks for fixed codes (the codebook step of additive quantization).

With the codes ``codes [n, S]`` held fixed, the reconstruction of vector ``n`` is linear in the codebook
entries, ``xhat[n, j] = sum_s C[s, codes[n, s], j]``, so the weighted distortion

    E(C) = sum_n sum_j wt[n, j] * (x[n, j] - sum_s C[s, codes[n, s], j]) ** 2

is a quadratic in ``C``. It separates over the coordinate ``j``: each coordinate has its own
``(S*K) x (S*K)`` normal system ``A_j c_j = b_j`` with

    A_j[p, q] = sum_n wt[n, j] * [p in P_n] * [q in P_n],    b_j[p] = sum_n wt[n, j] * x[n, j] * [p in P_n],

where ``P_n = {s*K + codes[n, s]}`` are the ``S`` codewords vector ``n`` uses. Stage-wise k-means only
ever fits stage ``s`` to what the earlier stages leave; solving the systems fits every stage at once.

The systems are singular (a constant added to every codeword of one stage and taken from another does not
change any sum; unused codewords do not appear at all), so a small ridge ``lam_j * ||c_j - c_j^old||^2``
pulls the solution towards the current codebooks: unused codewords keep their values, the gauge stays
where it was, and since the old codebooks are a feasible point of the ridged problem, the minimiser never
has a larger ``E`` than they do (before the fp16 rounding, which :func:`refit_codebooks` checks for).

Device: everything runs on the device of the vectors ``x`` (the float64 systems and their Cholesky
solves included) and the results come back there. Row sums use
:func:`rvqllm.rvq.kmeans.scatter_add_rows`, which is run-to-run deterministic on a GPU too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kmeans import scatter_add_rows
from .residual import encode_rvq_chunked, to_fp16_exact

_MAX_SYSTEM_BYTES = 1 << 28  # normal matrices built at once (float64), bounds the memory of one refit


def reconstruct(codes: Tensor, codebooks: Tensor) -> Tensor:
    """``[n, d]``: ``sum_s codebooks[s, codes[:, s]]`` for codes ``[n, S]`` and codebooks ``[S, K, d]`` (one device)."""
    out = codebooks[0][codes[:, 0]].clone()
    for s in range(1, codebooks.shape[0]):
        out += codebooks[s][codes[:, s]]
    return out


def coordinate_errors(x: Tensor, wt: Tensor, codes: Tensor, codebooks: Tensor) -> Tensor:
    """Weighted squared error of each coordinate, ``[d]`` float64: ``sum_n wt[n, j] * (x - xhat)[n, j]^2``.

    Args:
        x: ``[n, d]``. wt: ``[n, d]`` non-negative. codes: ``[n, S]`` int64. codebooks: ``[S, K, d]``.
            All on one device; the result is there too.
    """
    e = x.double() - reconstruct(codes, codebooks.double())
    return (wt.double() * e * e).sum(0)


def _solve_normal_systems(
    idx: Tensor, wcols: Tensor, rhs: Tensor, old: Tensor, sk: int, ridge: float
) -> Tensor:
    """Solve the ridged normal systems of the coordinates that share the weight columns ``wcols``.

    Args:
        idx: ``[n, S]`` flat codeword positions ``s*K + codes[:, s]``. wcols: ``[n, m]`` float64 weights of
            the ``m`` systems. rhs: ``[sk, m, r]`` right-hand sides (``r`` columns per system).
        old: ``[sk, m, r]`` current values (the ridge target). sk: ``S*K``. ridge: relative ridge.
            All on one device.
    Returns:
        ``[sk, m, r]`` float64 solutions, on that device. No host sync: a system whose Cholesky
        factorisation fails keeps ``old`` through a device-side select.
    """
    stages = idx.shape[1]
    m = wcols.shape[1]
    k = sk // stages
    upper = torch.zeros(sk * sk, m, dtype=torch.float64, device=wcols.device)
    for s in range(stages):
        for t in range(s, stages):  # block (s, t) of the upper triangle; s == t only hits the diagonal
            scatter_add_rows(upper, idx[:, s] * sk + idx[:, t], wcols)
    upper = upper.T.reshape(m, sk, sk)
    diag = upper.diagonal(dim1=1, dim2=2)  # [m, sk]
    a = upper + upper.transpose(1, 2)
    a.diagonal(dim1=1, dim2=2).sub_(diag)
    # ridge relative to the mean diagonal entry (total weight of the coordinate / K); 1 if it has none
    lam = wcols.sum(0) / k * ridge  # [m]
    lam = torch.where(lam > 0, lam, torch.ones_like(lam))
    a.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    b = rhs.permute(1, 0, 2) + lam[:, None, None] * old.permute(1, 0, 2)  # [m, sk, r]
    chol, info = torch.linalg.cholesky_ex(a)
    sol = torch.cholesky_solve(b, chol)
    # a failed factorisation cannot happen for a PSD matrix plus lam*I, but never return garbage
    sol = torch.where((info == 0)[:, None, None], sol, old.permute(1, 0, 2))
    return sol.permute(1, 0, 2)


def refit_codebooks(x: Tensor, wt: Tensor, codes: Tensor, codebooks: Tensor, ridge: float = 1e-4) -> Tensor:
    """Jointly re-fit all stages' codebooks to fixed codes by weighted least squares.

    Minimises ``sum_n sum_j wt[n,j] * (x[n,j] - sum_s C[s, codes[n,s], j])^2 + lam_j * ||C[..., j] - C0[..., j]||^2``
    exactly (one ``(S*K) x (S*K)`` system per coordinate, solved in float64 by Cholesky), where ``C0`` is
    ``codebooks`` and ``lam_j = ridge * sum_n wt[n, j] / K`` (``ridge`` times the mean diagonal of the
    normal matrix). When all coordinates carry the same weights (``wt`` has equal columns) one system is
    shared by all ``d`` coordinates.

    The solution is then rounded to fp16; any coordinate whose rounded codebooks have a larger weighted
    error than the input ones keeps the input ones, so the returned codebooks never do worse than
    ``codebooks`` for these codes.

    Args:
        x: ``[n, d]`` vectors. wt: ``[n, d]`` non-negative error weights. codes: ``[n, S]`` int64 in
            ``[0, K)``. codebooks: ``[S, K, d]`` current codebooks. ridge: relative ridge (``> 0``).
            All on one device.
    Returns:
        ``[S, K, d]`` float32 codebooks, fp16-exact (per coordinate: the rounded refit, or the input), on
        that device. One host sync (whether all coordinates share one system).
    """
    if ridge <= 0:
        raise ValueError("ridge must be positive (the normal systems are singular without it)")
    n, d = x.shape
    stages, k, _ = codebooks.shape
    sk = stages * k
    x64, w64 = x.double(), wt.double().clamp_min(0)
    codes = codes.long()
    device = x.device
    idx = codes + torch.arange(stages, dtype=torch.long, device=device)[None, :] * k  # [n, S]
    rhs = torch.zeros(sk, d, dtype=torch.float64, device=device)
    wx = w64 * x64
    for s in range(stages):
        scatter_add_rows(rhs, idx[:, s], wx)
    old = codebooks.double().reshape(sk, d)

    if n > 0 and bool(torch.equal(w64, w64[:, :1].expand_as(w64))):  # one system serves every coordinate
        sol = _solve_normal_systems(idx, w64[:, :1], rhs[:, None, :], old[:, None, :], sk, ridge)[:, 0, :]
    else:
        sol = torch.empty(sk, d, dtype=torch.float64, device=device)
        step = max(1, _MAX_SYSTEM_BYTES // (8 * sk * sk * 3))
        for j0 in range(0, d, step):
            j1 = min(d, j0 + step)
            part = _solve_normal_systems(
                idx, w64[:, j0:j1], rhs[:, j0:j1, None], old[:, j0:j1, None], sk, ridge
            )
            sol[:, j0:j1] = part[:, :, 0]

    new = to_fp16_exact(sol.reshape(stages, k, d))  # float64 -> fp16 directly: one rounding
    worse = coordinate_errors(x, wt, codes, new) > coordinate_errors(x, wt, codes, codebooks)
    return torch.where(worse, codebooks.float(), new)  # per coordinate, without a host sync


def refine_codebooks(
    x: Tensor, wt: Tensor, codebooks: Tensor, rounds: int, beam: int = 1, codes: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Alternate encoding and joint re-fitting (additive-quantization style) for ``rounds`` rounds.

    Each round encodes ``x`` with :func:`rvqllm.rvq.residual.encode_rvq` at width ``beam`` under the
    vectors' own weights: ``wt`` is per vector *and* per coordinate, and the encoder minimises exactly
    ``sum_j wt[n, j] * (x[n, j] - xhat[n, j])^2`` (the weighted score costs the same as plain L2), the
    objective :func:`refit_codebooks` minimises -- so no averaging or rescaling of the weights is needed,
    and with uniform weights the plain-L2 path gives the same codes. Each vector keeps the better of its
    new and its previous codes (beam search is not guaranteed to find the old ones), then all stages are
    re-fitted jointly. Each half-step is a descent step, so the weighted error never increases.

    Args:
        x: ``[n, d]``. wt: ``[n, d]`` non-negative. codebooks: ``[S, K, d]`` fp16-exact. rounds: ``>= 0``.
        beam: encoder beam width. codes: ``[n, S]`` current codes (``None``: start from a fresh encoding).
            All on one device.
    Returns:
        ``(codebooks [S, K, d] float32 fp16-exact, codes [n, S] int64)`` on that device; the codes are the
        ones the final codebooks were fitted to (``rounds == 0``: the input, or a fresh encoding).
    """
    uniform = bool((wt == wt.reshape(-1)[:1]).all()) if wt.numel() else True
    enc_wt = None if uniform else wt
    stages = codebooks.shape[0]
    rows = torch.arange(stages, device=codebooks.device)[None, :]

    def vector_errors(c: Tensor) -> Tensor:  # [n] weighted squared error of each vector
        e = x - codebooks[rows, c].sum(1)
        return (wt * e * e).sum(1)

    for _ in range(rounds):
        new = encode_rvq_chunked(x, codebooks, beam, enc_wt)
        if codes is not None:
            better = vector_errors(new) < vector_errors(codes)
            new = torch.where(better[:, None], new, codes)
        codes = new
        codebooks = refit_codebooks(x, wt, codes, codebooks)
    if codes is None:
        codes = encode_rvq_chunked(x, codebooks, beam, enc_wt)
    return codebooks, codes
