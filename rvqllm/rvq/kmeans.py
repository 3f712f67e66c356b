"""Weighted k-means for codebook learning (torch only, deterministic for a given seed).

Each point carries a per-dimension weight, so the distortion it minimises is
``sum_i sum_j w[i, j] * (x[i, j] - c[a(i), j]) ** 2``. With the weights taken from the diagonal of the
layer's input Hessian this is the diagonal approximation of the output error ``||(W - What) X||^2``.

Device: everything runs on the device of the points ``x`` (CPU or an accelerator) and the results come
back there. The random draws are made on a CPU ``torch.Generator`` and then moved, so a seed selects the
same subsample and seeding candidates on every device (and CPU results are those of the CPU-only code).
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_ELEMS = 1 << 25  # max entries of one [points, codewords] distance block
#: k-means++ steps whose random draws are made (on the CPU) and moved to the device at once; the host
#: also learns only once per batch whether a step found every point already served (see _init_plus_plus)
_DRAW_BATCH = 32


def scatter_add_rows(dst: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """``dst[index[i]] += src[i]`` for every row ``i`` (in place; returns ``dst``).

    Args:
        dst: ``[r, ...]``. index: ``[n]`` int64 in ``[0, r)``, on ``dst``'s device. src: ``[n, ...]``.
    On the CPU this is ``index_add_`` (sequential, the historical bits); on other devices it is
    ``index_put_(accumulate=True)``, which sorts the indices and sums each row's contributions in a
    fixed order, where ``index_add_`` uses atomics whose order (and so rounding) changes from run to run.
    """
    if dst.device.type == "cpu":
        return dst.index_add_(0, index, src)
    return dst.index_put_((index,), src, accumulate=True)


def weighted_sq_dist(x: Tensor, w: Tensor, centers: Tensor) -> Tensor:
    """Weighted squared distances, up to a per-point constant.

    Args:
        x: ``[n, d]`` points. w: ``[n, d]`` non-negative weights. centers: ``[k, d]``. All on one device.
    Returns:
        ``[n, k]`` on that device: ``sum_j w[i,j] * (c[k,j]^2 - 2 x[i,j] c[k,j])``; adding ``sum_j w x^2``
        gives the true distance, which does not change the arg-min over ``k``. Both sums are one matrix
        product over ``2 d`` terms, ``[w, w x] @ [c^2, -2 c]^T`` (about 3x faster than two products of ``d``
        terms and a subtraction at ``d = 8``).
    """
    return _stacked_points(x, w) @ _stacked_centers(centers)


def _stacked_points(x: Tensor, w: Tensor) -> Tensor:
    """``[n, 2d]``: ``[w, w * x]``, the left side of :func:`weighted_sq_dist`."""
    return torch.cat([w, w * x], dim=1)


def _stacked_centers(centers: Tensor) -> Tensor:
    """``[2d, k]``: ``[c^2, -2 c]^T``, the right side of :func:`weighted_sq_dist`."""
    return torch.cat([centers * centers, -2.0 * centers], dim=1).T


#: codebooks larger than this are searched in blocks (:func:`nearest_blocked`); smaller ones at once
BLOCKED_ABOVE = 4096
_ROW_BLOCK, _WORD_BLOCK = 256, 2048  # one [rows, words] distance tile: 2 MiB of float32, cache-sized


def nearest_blocked(x: Tensor, words: Tensor, wt: Tensor | None = None) -> Tensor:
    """Index of the nearest of ``words [k, d]`` to each row of ``x [n, d]``, under the weighted squared
    distance ``sum_j wt[i, j] (x[i, j] - words[k, j])^2`` (plain L2 without ``wt [n, d]``). All on one
    device; returns ``[n]`` int64 there.

    For large codebooks (``2**16`` entries): the distances are built tile by tile (:data:`_ROW_BLOCK`
    rows by :data:`_WORD_BLOCK` words) keeping a running minimum, so nothing of size ``n * k`` exists and
    each tile stays in cache (about 5x faster than one ``[n, k]`` block on a CPU). Ties go to the lower
    index, as ``argmin``'s do."""
    n, k = x.shape[0], words.shape[0]
    out = torch.empty(n, dtype=torch.long, device=x.device)
    sq = words * words
    norms = sq.sum(1) if wt is None else None
    for r0 in range(0, n, _ROW_BLOCK):
        xr = x[r0 : r0 + _ROW_BLOCK] if wt is None else (wt[r0 : r0 + _ROW_BLOCK] * x[r0 : r0 + _ROW_BLOCK])
        best = torch.full((xr.shape[0],), float("inf"), device=x.device)
        arg = torch.zeros(xr.shape[0], dtype=torch.long, device=x.device)
        for k0 in range(0, k, _WORD_BLOCK):
            tile = slice(k0, k0 + _WORD_BLOCK)
            nb = norms[tile] if wt is None else wt[r0 : r0 + _ROW_BLOCK] @ sq[tile].T
            val, idx = torch.addmm(nb, xr, words[tile].T, alpha=-2.0).min(dim=1)
            better = val < best
            best = torch.where(better, val, best)
            arg = torch.where(better, idx + k0, arg)
        out[r0 : r0 + _ROW_BLOCK] = arg
    return out


def assign(x: Tensor, w: Tensor, centers: Tensor) -> Tensor:
    """Index of the nearest center under the weighted distance.

    ``x``, ``w``: ``[n, d]``; ``centers``: ``[k, d]``, all on one device. Returns ``[n]`` int64 on that
    device. The ``[n, k]`` distances are built in row chunks of at most :data:`_CHUNK_ELEMS` entries;
    above :data:`BLOCKED_ABOVE` centers, tile by tile (:func:`nearest_blocked`).
    """
    n, k = x.shape[0], centers.shape[0]
    if k > BLOCKED_ABOVE:
        return nearest_blocked(x, centers, w)
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    out = torch.empty(n, dtype=torch.long, device=x.device)
    right = _stacked_centers(centers)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        out[sl] = (_stacked_points(x[sl], w[sl]) @ right).argmin(dim=1)
    return out


def _init_plus_plus(x: Tensor, w: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding on a subsample of at most ``64 * k`` points (D^2 sampling, weighted).

    ``x``, ``w``: ``[n, d]`` on any device; ``gen``: a CPU generator. Returns ``[k, d]`` on ``x``'s device.

    Each D^2 draw inverts the cumulative distribution: one uniform ``u`` per step is drawn from ``gen`` on
    the CPU (a float32 scalar), moved with its batch, and the pick is the first point whose running sum of
    distances exceeds ``u`` times their total (``searchsorted`` on the device), so the distances never
    travel to the host and a seed picks the same points on every device. (Until session 26 each draw raced
    the probabilities against ``m`` exponential variates, as ``torch.multinomial`` does: 16,384 variates
    per codeword, half to two thirds of the seeding's time.)

    A step whose points are all served already (total weighted distance 0: fewer distinct points than
    codewords) fills the remaining codewords with random points instead. Whether that happened is only
    known on the device; rather than syncing at every codeword, the draws of :data:`_DRAW_BATCH` steps are
    made ahead (saving the generator's state before each), the steps run, and one sync per batch reads
    their flags; at the first such step the generator is rewound to its saved state and the fill drawn
    from there, which is what the one-step-at-a-time loop would have drawn.
    """
    n = x.shape[0]
    m = min(n, max(64 * k, 4096))
    idx = torch.randperm(n, generator=gen, device="cpu")[:m].to(x.device)
    xs, ws = x[idx], w[idx]
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(m, (1,), generator=gen))  # a CPU tensor: no device sync
    centers[0] = xs[first]
    best = ((xs - centers[0]) ** 2 * ws).sum(1)
    for i0 in range(1, k, _DRAW_BATCH):
        steps = range(i0, min(k, i0 + _DRAW_BATCH))
        states, draws = [], []
        for _ in steps:
            states.append(gen.get_state())
            draws.append(torch.rand(1, generator=gen))
        u = torch.cat(draws).to(x.device)  # [steps]: one transfer per batch
        totals = []
        for j, i in enumerate(steps):
            cum = best.cumsum(0)
            total = cum[-1]
            totals.append(total)
            pick = torch.searchsorted(cum, (u[j] * total).reshape(1), right=True).clamp_(max=m - 1)  # [1]
            centers[i] = xs.index_select(0, pick)[0]
            best = torch.minimum(best, ((xs - centers[i]) ** 2 * ws).sum(1))
        t = torch.stack(totals)
        # the one host sync of the batch: non-finite distances, and steps with nothing left to serve
        bad, spent = torch.stack([~torch.isfinite(t), t <= 0]).tolist()
        if any(bad):
            raise ValueError("k-means++ seeding: the weighted distances are not finite")
        if any(spent):  # fewer distinct points than centers: repeat points
            j = spent.index(True)
            i = steps[j]
            gen.set_state(states[j])  # as if the draws of steps j.. had never been made
            centers[i:] = xs[torch.randint(m, (k - i,), generator=gen).to(x.device)]
            break
    return centers


def weighted_kmeans(
    x: Tensor, w: Tensor, k: int, iters: int, seed: int, max_points: int | None = None
) -> tuple[Tensor, Tensor]:
    """Fit ``k`` centers to ``x`` under per-dimension weights ``w``.

    Args:
        x: ``[n, d]`` float32 points. w: ``[n, d]`` float32 non-negative weights, on ``x``'s device.
        k: codewords. iters: Lloyd iterations after seeding. seed: RNG seed (same seed, same input: same
            result; the draws are made on a CPU generator, so they are the same on every device).
        max_points: fit on a random subset of this many points (``None``: ``128 * k``); the Lloyd
            steps cost ``O(points * k)``, and a few hundred points per codeword already pin it down.
    Returns:
        ``(centers [k, d] float32, assignment [m] int64 of the points fitted)``, on ``x``'s device.

    Each Lloyd iteration syncs with the host once or twice (finding empty codewords, the convergence
    test); that is per iteration, not per point or codeword.
    """
    gen = torch.Generator().manual_seed(seed)
    x = x.float()
    w = w.float().clamp_min(0)
    limit = 128 * k if max_points is None else max_points
    if x.shape[0] > limit:
        keep = torch.randperm(x.shape[0], generator=gen)[:limit].to(x.device)
        x, w = x[keep], w[keep]
    if x.shape[0] <= k:  # every point gets its own codeword
        centers = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
        centers[: x.shape[0]] = x
        return centers, torch.arange(x.shape[0], device=x.device)
    centers = _init_plus_plus(x, w, k, gen)
    codes = assign(x, w, centers)
    eps = 1e-12
    for _ in range(iters):
        num = scatter_add_rows(torch.zeros_like(centers), codes, w * x)
        den = scatter_add_rows(torch.zeros_like(centers), codes, w)
        occupied = den.sum(1) > 0
        new = torch.where(den > eps, num / den.clamp_min(eps), centers)
        empty = (~occupied).nonzero().flatten()  # host sync: the number of empty codewords
        if empty.numel():  # re-seed empty codewords at the points that are worst served
            err = ((x - new[codes]) ** 2 * w).sum(1)
            worst = err.topk(min(empty.numel(), x.shape[0])).indices
            new[empty[: worst.numel()]] = x[worst]
        centers = new
        new_codes = assign(x, w, centers)
        changed = int((new_codes != codes).sum())  # host sync: the convergence test
        codes = new_codes
        if changed <= x.shape[0] // 1000:  # converged: under 0.1% of points moved
            break
    return centers, codes
