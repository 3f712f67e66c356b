"""Summed codebook lookups with a fast gradient, for tuning codebooks under fixed codes.

Decoding an RVQ weight is ``out[i] = sum_s table[s, codes[i, s]]``. Indexing does that, but on a CPU
its gradient (an accumulating ``index_put``: every vector's gradient added into its codeword one row at
a time) took 14 % of a whole-model distillation epoch on the reference model, and the gather
another few per cent. Here both directions are sparse products instead:

- forward: ``A @ table`` with ``A [n, S*K]`` the 0/1 matrix of the codes (``S`` ones per row), which is
  free to build in CSR form (its row pointers are ``0, S, 2S, ...``; its columns the offset codes);
- backward: ``Aᵀ @ grad``, with ``Aᵀ`` built in CSR form by sorting each stage's codes (a stable sort,
  so each codeword sums its vectors' gradients in one fixed order on every run).

``scripts/bench_lookup.py`` times both ways in one run: per 1536 x 576 layer (8-dim vectors, 2 stages x
256, 2 CPU threads) about x4 faster forward and x3-4 backward; a whole distillation epoch of the reference
model x1.16-1.21 (docs/RESULTS.md, session 27). Nothing is kept between calls: ``Aᵀ`` is built in backward
from the codes saved by forward (in the smallest integer dtype that holds them: a byte each at 256
codewords, where indexing saves 8), so codes that change between steps need nothing.

The sparse products are CPU-only here (a GPU keeps indexing, whose gradient there is already a sorted
parallel reduction, and this path has not been measured on one).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def _index_dtype(nnz: int) -> torch.dtype:
    return torch.int32 if nnz < 2**31 - 1 else torch.int64


def _csr(crow: Tensor, cols: Tensor, shape: tuple[int, int]) -> Tensor:
    """A 0/1 CSR matrix (float32 ones). torch's one-time "CSR support is in beta" notice is silenced here:
    it is about the API's maturity, not about this use, and a user cannot act on it."""
    ones = torch.ones(cols.numel(), dtype=torch.float32, device=cols.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, cols, ones, shape, check_invariants=False)


def _transposed(codes: Tensor, k: int) -> Tensor:
    """``codes [n, S]`` (each column in ``[0, K)``) → CSR ``Aᵀ [S*K, n]``: row ``s*K + c`` lists the
    vectors whose stage-``s`` code is ``c``, in increasing order."""
    n, stages = codes.shape
    itype = _index_dtype(n * stages + 1)
    rows, counts = [], []
    for s in range(stages):
        col = codes[:, s]
        rows.append(torch.argsort(col, stable=True).to(itype))
        counts.append(torch.bincount(col, minlength=k))
    crow = torch.zeros(stages * k + 1, dtype=torch.int64, device=codes.device)
    torch.cumsum(torch.cat(counts), 0, out=crow[1:])
    return _csr(crow.to(itype), torch.cat(rows), (stages * k, n))


class _LookupSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, codes: Tensor) -> Tensor:
        stages, k, d = table.shape
        n = codes.shape[0]
        itype = _index_dtype(n * stages + 1)
        offsets = torch.arange(stages, device=codes.device, dtype=itype) * k
        cols = (codes.to(itype) + offsets).reshape(-1)
        crow = torch.arange(0, n * stages + 1, stages, device=codes.device, dtype=itype)
        a = _csr(crow, cols, (n, stages * k))
        # the smallest dtype that holds them: the sort in backward is fastest on bytes
        small = torch.uint8 if k <= 256 else torch.int16 if k <= 2**15 else torch.int32
        ctx.save_for_backward(codes.to(small))
        ctx.k = k
        with torch.autocast(codes.device.type, enabled=False):
            return a @ table.detach().reshape(stages * k, d)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (codes,) = ctx.saved_tensors
        stages = codes.shape[1]
        with torch.autocast(grad.device.type, enabled=False):
            g = _transposed(codes, ctx.k) @ grad.float().contiguous()
        return g.reshape(stages, ctx.k, -1), None


def lookup_sum(table: Tensor, codes: Tensor) -> Tensor:
    """``table [S, K, d]`` float32, ``codes [n, S]`` integer (column ``s`` in ``[0, K)``) → ``[n, d]``
    float32: ``sum_s table[s, codes[:, s]]``, differentiable in ``table``. On a CPU tensor the sparse
    products of the module docstring; elsewhere indexing (the same values; gradients equal up to the order
    of float addition)."""
    if table.dtype != torch.float32:
        raise TypeError(f"lookup_sum needs a float32 table, got {table.dtype}")
    if table.device.type != "cpu":
        return indexed_sum(table, codes)
    return _LookupSum.apply(table, codes)


def indexed_sum(table: Tensor, codes: Tensor) -> Tensor:
    """:func:`lookup_sum` by plain indexing (what a GPU uses, and what the CPU used before session 27)."""
    stages, k, d = table.shape
    return table.reshape(stages * k, d)[codes.long() + torch.arange(stages, device=codes.device) * k].sum(1)
