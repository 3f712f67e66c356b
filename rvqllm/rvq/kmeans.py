"""Weighted k-means for codebook learning (torch only, deterministic for a given seed).

Each point carries a per-dimension weight, so the distortion it minimises is
``sum_i sum_j w[i, j] * (x[i, j] - c[a(i), j]) ** 2``. With the weights taken from the diagonal of the
layer's input Hessian this is the diagonal approximation of the output error ``||(W - What) X||^2``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_ELEMS = 1 << 25  # max entries of one [points, codewords] distance block


def weighted_sq_dist(x: Tensor, w: Tensor, centers: Tensor) -> Tensor:
    """Weighted squared distances, up to a per-point constant.

    Args:
        x: ``[n, d]`` points. w: ``[n, d]`` non-negative weights. centers: ``[k, d]``.
    Returns:
        ``[n, k]``: ``sum_j w[i,j] * (c[k,j]^2 - 2 x[i,j] c[k,j])``; adding ``sum_j w x^2`` gives the
        true distance, which does not change the arg-min over ``k``.
    """
    return w @ (centers * centers).T - 2.0 * (w * x) @ centers.T


def assign(x: Tensor, w: Tensor, centers: Tensor) -> Tensor:
    """Index of the nearest center under the weighted distance. Returns ``[n]`` int64."""
    n, k = x.shape[0], centers.shape[0]
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    out = torch.empty(n, dtype=torch.long, device=x.device)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        out[sl] = weighted_sq_dist(x[sl], w[sl], centers).argmin(dim=1)
    return out


def _init_plus_plus(x: Tensor, w: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding on a subsample of at most ``64 * k`` points (D^2 sampling, weighted)."""
    n = x.shape[0]
    m = min(n, max(64 * k, 4096))
    idx = torch.randperm(n, generator=gen, device="cpu")[:m].to(x.device)
    xs, ws = x[idx], w[idx]
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(m, (1,), generator=gen))
    centers[0] = xs[first]
    best = ((xs - centers[0]) ** 2 * ws).sum(1)
    for i in range(1, k):
        total = best.sum()
        if total <= 0:  # fewer distinct points than centers: repeat points
            centers[i:] = xs[torch.randint(m, (k - i,), generator=gen)]
            break
        pick = int(torch.multinomial((best / total).cpu(), 1, generator=gen))
        centers[i] = xs[pick]
        best = torch.minimum(best, ((xs - centers[i]) ** 2 * ws).sum(1))
    return centers


def weighted_kmeans(
    x: Tensor, w: Tensor, k: int, iters: int, seed: int, max_points: int | None = None
) -> tuple[Tensor, Tensor]:
    """Fit ``k`` centers to ``x`` under per-dimension weights ``w``.

    Args:
        x: ``[n, d]`` float32 points. w: ``[n, d]`` float32 non-negative weights. k: codewords.
        iters: Lloyd iterations after seeding. seed: RNG seed (same seed, same input: same result).
        max_points: fit on a random subset of this many points (``None``: ``128 * k``); the Lloyd
            steps cost ``O(points * k)``, and a few hundred points per codeword already pin it down.
    Returns:
        ``(centers [k, d] float32, assignment [m] int64 of the points fitted)``.
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
        num = torch.zeros_like(centers).index_add_(0, codes, w * x)
        den = torch.zeros_like(centers).index_add_(0, codes, w)
        occupied = den.sum(1) > 0
        new = torch.where(den > eps, num / den.clamp_min(eps), centers)
        empty = (~occupied).nonzero().flatten()
        if empty.numel():  # re-seed empty codewords at the points that are worst served
            err = ((x - new[codes]) ** 2 * w).sum(1)
            worst = err.topk(min(empty.numel(), x.shape[0])).indices
            new[empty[: worst.numel()]] = x[worst]
        centers = new
        new_codes = assign(x, w, centers)
        changed = int((new_codes != codes).sum())
        codes = new_codes
        if changed <= x.shape[0] // 1000:  # converged: under 0.1% of points moved
            break
    return centers, codes
