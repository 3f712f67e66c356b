"""Residual vector quantization of one weight matrix.

A weight ``W [out, in]`` is zero-padded along ``in`` to a multiple of the vector dimension ``d``,
divided by a per-output-channel scale, and cut into ``in_groups = in_pad / d`` vectors per row. Stage 1
codes each vector by its nearest codeword; stage ``s`` codes the residual left by stages ``1..s-1``:

    What[o, g*d:(g+1)*d] = scales[o] * sum_s codebooks[s, codes[o, g, s]]

Codebooks and scales are rounded to fp16 (the stored precision) *before* the codes that use them are
chosen, so the decoded checkpoint is exactly what was optimised.

With ``rotate=True`` the matrix coded is ``W R`` (``R`` a random sign flip + block Hadamard over the
padded width, :mod:`.rotation`) against the rotated Hessian ``R^T H R``; the layer then computes
``(W R)(R^T x)``. :meth:`RVQWeight.dequantize` always returns the weight in the original basis.

Device: everything runs on the device of the weight (CPU or an accelerator: the k-means, the residual and
beam coding, the Cholesky factor and error feedback, the re-fits, the rotation), and every tensor of the
result lives there; a Hessian on another device is moved to the weight's. Random draws come from CPU
generators (then moved), so a seed means the same draws everywhere, and CPU results are bit-identical to
those of the CPU-only code this replaced. Storing the result on the host is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import rotation
from .kmeans import BLOCKED_ABOVE, assign, nearest_blocked, weighted_kmeans


@dataclass
class RVQWeight:
    """A weight matrix in RVQ form (unpacked, float32 values that are exact in fp16).

    All tensors live on one device (that of the weight :func:`quantize_weight` was given).

    Attributes:
        codes: ``[out, in_groups, stages]`` int64, each in ``[0, 2**bits)``.
        codebooks: ``[stages, 2**bits, vector_dim]`` float32.
        scales: ``[out]`` float32.
        in_features: the original input width (``<= in_groups * vector_dim``; the rest is padding).
        signs: ``None`` (no rotation), or ``[in_groups * vector_dim]`` int8 ±1: the codes then describe
            ``W R`` over the padded width, ``R`` as in :mod:`.rotation`.
        rotation_block: the Hadamard block of the rotation (0 when there is none).
    """

    codes: Tensor
    codebooks: Tensor
    scales: Tensor
    in_features: int
    signs: Tensor | None = None
    rotation_block: int = 0

    @property
    def coded_width(self) -> int:
        """``in_groups * vector_dim``: the width the codes cover (the rotation's width when rotated)."""
        return self.codes.shape[1] * self.codebooks.shape[-1]

    def dequantize(self) -> Tensor:
        """``[out, in_features]`` float32 reconstruction in the original (unrotated) basis, on this weight's device."""
        if self.signs is None:
            return decode(self.codes, self.codebooks, self.scales, self.in_features)
        w = decode(self.codes, self.codebooks, self.scales, self.coded_width)
        return rotation.unrotate(w, self.signs, self.rotation_block)[:, : self.in_features]


def decode(codes: Tensor, codebooks: Tensor, scales: Tensor, in_features: int) -> Tensor:
    """Reconstruct ``[out, in_features]`` float32 from codes ``[out, G, S]``, codebooks ``[S, K, d]``, scales ``[out]``.

    The result is on the codebooks' device (codes and scales must be there too)."""
    out, groups, stages = codes.shape
    d = codebooks.shape[-1]
    vecs = torch.zeros(out, groups, d, dtype=torch.float32, device=codebooks.device)
    for s in range(stages):
        vecs += codebooks[s].float()[codes[..., s].long()]
    w = vecs.reshape(out, groups * d)[:, :in_features]
    return w * scales.float()[:, None]


def to_fp16_exact(t: Tensor) -> Tensor:
    """Round to the nearest fp16 value (saturating) and return it as float32."""
    return t.clamp(-65504.0, 65504.0).half().float()


#: default Hessian damping: ``DAMP * mean(diag H)`` added to the diagonal (GPTQ's 1 %)
DAMP = 0.01


def column_importance(
    h: Tensor | None, in_features: int, in_pad: int, hessian_weighted: bool, device: torch.device | str | None = None,
    damp: float = DAMP,
) -> Tensor:
    """Per-input-column weight ``[in_pad]`` float32 from the Hessian diagonal; padding columns get weight 0.

    ``h`` is the Hessian ``[in, in]`` or its diagonal ``[in]``. A floor (``damp`` of the mean) keeps
    columns the calibration never excited from being coded arbitrarily (a Hessian whose mean diagonal is
    not positive and finite weighs all columns alike). The result is on ``device`` (default: ``h``'s,
    else the CPU); ``h`` must be there too.
    """
    if device is None:
        device = h.device if h is not None else "cpu"
    imp = torch.zeros(in_pad, dtype=torch.float32, device=device)
    if h is None or not hessian_weighted:
        imp[:in_features] = 1.0
        return imp
    diag = (h.diagonal() if h.dim() == 2 else h).double().clamp_min(0)
    mean = diag.mean()
    usable = torch.isfinite(mean) & (mean > 0)  # decided on the device: no host sync
    imp[:in_features] = torch.where(usable, ((diag + damp * mean) / mean).float(), 1.0)
    return imp


def quantize_weight(
    weight: Tensor,
    hessian: Tensor | None,
    *,
    vector_dim: int,
    stages: int,
    bits: int,
    kmeans_iters: int = 20,
    hessian_weighted: bool = True,
    error_feedback: bool = True,
    kmeans_points: int = 64,
    beam: int = 1,
    seed: int = 0,
    refits: int = 0,
    rotate: bool = False,
    rotation_max_block: int = rotation.MAX_BLOCK,
    damp: float = DAMP,
    codebooks: Tensor | None = None,
) -> RVQWeight:
    """Code ``weight [out, in]`` with ``stages`` residual codebooks of ``2**bits`` entries each.

    ``hessian`` (``[in, in]`` or its diagonal ``[in]``, any float dtype) steers the k-means towards the
    input columns the layer's activations actually use. With ``error_feedback`` and a full ``[in, in]``
    Hessian, the codes are then chosen group by group against the layer's output error, pushing each
    group's error onto the columns not yet coded (:func:`encode_with_feedback`).
    The k-means of each stage runs on a seeded sample of ``kmeans_points`` vectors per codeword.
    ``refits > 0`` follows the k-means with that many rounds of joint codebook re-fitting on the sample
    (:func:`learn_codebooks`, encoding with ``beam``); the codes are then chosen with ``beam`` on the
    non-feedback path too (with ``refits == 0`` that path stays greedy, as before).
    ``damp`` adds ``damp * mean(diag H) * I`` to the Hessian everywhere it is used (the k-means weights
    and the error feedback): the larger, the more the code treats all input directions alike, the less
    it leans on which directions the calibration text happened to excite.
    Deterministic for a given ``seed``.

    ``codebooks`` (``[stages, 2**bits, vector_dim]``, fp16-exact values): use these instead of learning
    them (no k-means, no re-fits): codebooks shared by several layers, or learned elsewhere. They code
    the per-row-normalised (and rotated, with ``rotate``) vectors, as learned ones do.

    With ``rotate``, ``W R`` is coded against ``R^T H R`` instead (``R`` over the width padded to a
    multiple of ``vector_dim``, signs drawn from ``seed``, Hadamard blocks of at most
    ``rotation_max_block``); the result carries the signs and block (see :mod:`.rotation`).

    Device: the whole computation runs on ``weight``'s device, and every tensor of the result is there
    (``hessian`` is moved to it if it lives elsewhere; it is never modified). Memory: the error feedback
    needs one working ``[in, in]`` float64 matrix besides ``hessian`` (the damped Hessian, then its
    factors, at most two alive at once): the padded or rotated copy where there is one, else a copy made
    by :func:`inverse_hessian_factor`.
    """
    if rotate:
        return _quantize_rotated(weight, hessian, vector_dim=vector_dim, stages=stages, bits=bits,
                                 kmeans_iters=kmeans_iters, hessian_weighted=hessian_weighted,
                                 error_feedback=error_feedback, kmeans_points=kmeans_points, beam=beam,
                                 seed=seed, refits=refits, max_block=rotation_max_block, damp=damp,
                                 codebooks=codebooks)
    return _quantize_plain(weight, hessian, own_hessian=False, vector_dim=vector_dim, stages=stages, bits=bits,
                           kmeans_iters=kmeans_iters, hessian_weighted=hessian_weighted,
                           error_feedback=error_feedback, kmeans_points=kmeans_points, beam=beam, seed=seed,
                           refits=refits, damp=damp, codebooks=codebooks)


def _quantize_plain(
    weight: Tensor,
    hessian: Tensor | None,
    *,
    own_hessian: bool,
    vector_dim: int,
    stages: int,
    bits: int,
    kmeans_iters: int,
    hessian_weighted: bool,
    error_feedback: bool,
    kmeans_points: int,
    beam: int,
    seed: int,
    refits: int,
    damp: float = DAMP,
    codebooks: Tensor | None = None,
) -> RVQWeight:
    """:func:`quantize_weight` without rotation. ``own_hessian``: ``hessian`` is a float64 matrix on
    ``weight``'s device made for this call, which the error feedback may overwrite (saving an ``[in, in]``
    copy); a Hessian of the caller's is never modified (only copies made here: moved, converted, padded)."""
    w = weight.detach().float()
    device = w.device
    if hessian is not None:
        own_hessian = own_hessian or hessian.device != w.device  # moved here: the copy is ours
        hessian = hessian.detach().to(device)
    out, in_features = w.shape
    d = vector_dim
    groups = -(-in_features // d)
    in_pad = groups * d
    if in_pad != in_features:
        w = torch.nn.functional.pad(w, (0, in_pad - in_features))
    col = column_importance(hessian, in_features, in_pad, hessian_weighted, device, damp=damp)

    scales = row_scales(w, col)
    x = (w / scales[:, None]).reshape(out * groups, d)
    # weight of each coordinate of each vector in the layer's (diagonal) output error
    wt = (col.reshape(1, groups, d) * scales.pow(2).reshape(out, 1, 1)).reshape(out * groups, d)

    k = 1 << bits
    if codebooks is None:
        codebooks = learn_codebooks(x, wt, stages, k, kmeans_iters, seed, kmeans_points, refits=refits, beam=beam)
    else:
        if tuple(codebooks.shape) != (stages, k, d):
            raise ValueError(f"codebooks of shape {list(codebooks.shape)} do not fit the code: need [{stages}, {k}, {d}]")
        codebooks = codebooks.detach().to(device=device, dtype=torch.float32)
    if error_feedback and hessian is not None and hessian.dim() == 2:
        if in_pad == in_features:  # no padding: no copy here (unless a dtype conversion makes one)
            h, own = hessian.double(), own_hessian or hessian.dtype != torch.float64
        else:
            h, own = torch.zeros(in_pad, in_pad, dtype=torch.float64, device=device), True
            h[:in_features, :in_features] = hessian
        codes = encode_with_feedback(w, h, scales, codebooks, beam=beam, overwrite_hessian=own, damp=damp)
        return RVQWeight(codes, codebooks, scales, in_features)

    if refits > 0:  # the re-fitted codebooks are tuned to beam search, not to greedy stage-by-stage coding
        codes = encode_rvq_chunked(x, codebooks, beam, wt)
        residual = x - codebooks[torch.arange(stages, device=device)[None, :], codes].sum(1)
    else:
        codes = torch.empty(out * groups, stages, dtype=torch.long, device=device)
        residual = x.clone()
        for s in range(stages):
            codes[:, s] = assign(residual, wt, codebooks[s])
            residual -= codebooks[s][codes[:, s]]
    # least-squares refit of each row's scale to its chosen codes (weighted like the k-means)
    unit = (x - residual).reshape(out, in_pad)
    num = (unit * w * col).sum(1)
    den = (unit * unit * col).sum(1)
    refit = torch.where(den > 0, num / den.clamp_min(1e-30), scales)
    scales = to_fp16_exact(torch.where(refit.abs() > 0, refit, scales))
    return RVQWeight(codes.reshape(out, groups, stages), codebooks, scales, in_features)


def row_scales(w: Tensor, col: Tensor) -> Tensor:
    """``[out]`` fp16-exact float32: each row's RMS of ``w [out, n]`` weighted by the column importance
    ``col [n]`` (:func:`column_importance`); 1 for an all-zero row."""
    rms = (w.pow(2) * col).sum(1).div(col.sum()).sqrt()
    return to_fp16_exact(torch.where(rms > 0, rms, torch.ones_like(rms)))


def rotated_problem(weight: Tensor, hessian: Tensor | None, width: int, seed: int,
                    max_block: int) -> tuple[Tensor, Tensor | None, Tensor, int]:
    """``(W R, R^T H R, signs, block)``: ``weight [out, in]`` zero-padded to ``width`` columns and rotated
    (:mod:`.rotation`, signs from ``seed``, Hadamard blocks of at most ``max_block``), and its Hessian the
    same way (``[in, in]`` → a symmetric float64 ``[width, width]``; a diagonal ``[in]`` → the rotated
    matrix's diagonal; ``None`` → ``None``), all on ``weight``'s device.

    Besides the caller's Hessian, at most three ``[width, width]`` float64 matrices are alive at once
    (inside :func:`rotation.rotate_hessian`); the caller's is never modified."""
    w = weight.detach().float()
    device = w.device
    in_features = w.shape[1]
    block = rotation.block_size(width, max_block)
    signs = rotation.random_signs(width, seed, device=device)
    w = rotation.rotate(torch.nn.functional.pad(w, (0, width - in_features)), signs, block)
    h = None
    if hessian is not None:
        full = hessian.detach().to(device=device, dtype=torch.float64)
        if full.dim() == 1:
            full = torch.diag(full)
        if width == in_features:  # rotate_hessian does not modify its input: no padded copy needed
            h = full
        else:
            h = torch.zeros(width, width, dtype=torch.float64, device=device)
            h[:in_features, :in_features] = full
        del full
        h = rotation.rotate_hessian(h, signs, block)
        h = h + h.T
        h /= 2
        if hessian.dim() == 1:  # a diagonal in, a diagonal out (no error feedback without the full matrix)
            h = h.diagonal().clone()
    return w, h, signs, block


def _quantize_rotated(weight: Tensor, hessian: Tensor | None, *, vector_dim: int, seed: int, max_block: int,
                      **kw) -> RVQWeight:
    """:func:`quantize_weight` of ``W R`` against ``R^T H R`` over the padded width, on ``weight``'s device
    (:func:`rotated_problem`); the rotated Hessian is handed on, and the error feedback damps and factors
    it in place."""
    in_features = weight.shape[1]
    n = -(-in_features // vector_dim) * vector_dim
    w, h, signs, block = rotated_problem(weight, hessian, n, seed, max_block)
    q = _quantize_plain(w, h, own_hessian=h is not None, vector_dim=vector_dim, seed=seed, **kw)
    return RVQWeight(q.codes, q.codebooks, q.scales, in_features, signs, block)


def learn_codebooks(
    x: Tensor,
    wt: Tensor,
    stages: int,
    k: int,
    iters: int,
    seed: int,
    points_per_code: int = 64,
    *,
    refits: int = 0,
    beam: int = 1,
) -> Tensor:
    """Stage-by-stage weighted k-means on a sample of the vectors, then optional joint re-fits.

    Args:
        x: ``[n, d]`` vectors. wt: ``[n, d]`` their error weights, on ``x``'s device. k: codewords per
            stage.
        points_per_code: the sample holds ``points_per_code * k`` vectors (all of them if fewer).
        refits: rounds of alternating optimisation after the k-means (0: none), starting from the greedy
            codes of the k-means: :func:`rvqllm.rvq.refit.refine_codebooks` (weighted beam encoding under
            the sample's own ``wt``, then a joint least-squares re-fit of all stages). The weighted error
            on the sample never increases from round to round.
        beam: beam width of the encoding inside the re-fit rounds (unused when ``refits == 0``); use the
            width the final codes will be chosen with, since the re-fitted codebooks are tuned to it.
    Returns:
        codebooks ``[stages, k, d]`` float32, fp16-exact, on ``x``'s device. Stage ``s`` is fitted to what
        stages ``< s`` leave of the sample, coded greedily with the rounded codebooks (then re-fitted as above).
    """
    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape
    m = min(n, points_per_code * k)
    # the sample is drawn on the CPU generator (the same on every device), then moved
    pick = torch.randperm(n, generator=gen)[:m].to(x.device) if m < n else torch.arange(n, device=x.device)
    residual, w = x[pick].clone(), wt[pick]
    codebooks = torch.empty(stages, k, d, device=x.device)
    codes = torch.empty(m, stages, dtype=torch.long, device=x.device)
    for s in range(stages):
        centers, _ = weighted_kmeans(residual, w, k, iters, seed=seed * 1000 + s, max_points=m)
        centers = to_fp16_exact(centers)
        codebooks[s] = centers
        codes[:, s] = assign(residual, w, centers)
        residual -= centers[codes[:, s]]
    if refits <= 0:
        return codebooks

    from .refit import refine_codebooks  # refit imports this module

    codebooks, _ = refine_codebooks(x[pick], w, codebooks, refits, beam=beam, codes=codes)
    return codebooks


def inverse_hessian_factor(h: Tensor, damp: float = DAMP, *, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) after damping, as in GPTQ.

    Columns the calibration never excited (zero diagonal) get a unit diagonal and are reported in the
    returned mask so their weights can be zeroed. ``h`` is ``[n, n]`` (any float dtype); it is not
    modified unless ``overwrite`` (then, if it is float64, it is damped in place and left so, saving a
    copy). Returns ``(U [n, n] float32, dead [n] bool)`` on ``h``'s device, computed there in float64.

    Memory: besides ``h``, at most two ``[n, n]`` float64 matrices are alive at a time (the damped copy
    and its factor, then the factor and the inverse, then the inverse and ``U``). Host syncs: one per
    Cholesky attempt (reading its status decides whether to damp harder) and the final factor's error
    check -- a few per layer, none per column.
    """
    h = h.double() if overwrite else h.double().clone()
    diag = h.diagonal()
    dead = diag <= 0
    diag.masked_fill_(dead, 1.0)
    mean = diag.mean()
    diag.add_(damp * mean)  # a 0-dim tensor, not float(mean): no host sync
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:  # host sync: the branch needs the status
            break
        chol = None  # free the failed factor before the next attempt
        diag.add_(damp * mean)  # not positive definite: damp harder
    else:
        raise ValueError("Hessian is not positive definite even after damping")
    del h, diag
    hinv = torch.cholesky_inverse(chol)
    del chol
    u = torch.linalg.cholesky(hinv, upper=True)
    del hinv
    return u.float(), dead


def encode_rvq(x: Tensor, codebooks: Tensor, beam: int = 1, wt: Tensor | None = None) -> Tensor:
    """Residual encoding of ``x [n, d]`` with ``codebooks [S, K, d]``. Returns ``[n, S]`` int64.

    The error is plain L2, or with ``wt [n, d]`` (non-negative) the weighted
    ``sum_j wt[n, j] * (x[n, j] - xhat[n, j])^2``; its expansion
    ``err(r) + wt @ c^2 - 2 (wt * r) @ c`` costs the same as the unweighted one.
    ``beam == 1`` is greedy (each stage takes the codeword nearest to what the earlier stages left);
    ``beam > 1`` keeps the ``beam`` best partial sums after every stage, so the result is never worse than
    greedy: with two stages the greedy path is among those searched (its first word is the best one, and
    every second word is tried after each kept first word); with more, each vector gets the better of the
    best beam and the greedy code.
    The whole ``[n, beam, K]`` score block is materialised: chunk large inputs (:func:`encode_rvq_chunked`).
    All inputs on one device; the codes come back there, and nothing syncs with the host.
    """
    n = x.shape[0]
    stages, k, _ = codebooks.shape
    if wt is None:
        norms = (codebooks * codebooks).sum(-1)  # [S, K]

        def word_norms(s: int) -> Tensor:  # [1, K]
            return norms[s][None, :]

        def weigh(r: Tensor) -> Tensor:
            return r
    else:
        # [S, n, K]: sum_j wt[n, j] * c[k, j]^2 (not for huge codebooks: their greedy search is tiled)
        wsq = wt @ (codebooks * codebooks).transpose(1, 2) if k <= BLOCKED_ABOVE or (beam > 1 and stages > 1) else None

        def word_norms(s: int) -> Tensor:  # [n, K]
            return wsq[s]

        def weigh(r: Tensor) -> Tensor:  # r [n, d] or [n, b, d]
            return r * (wt if r.dim() == 2 else wt[:, None, :])

    if beam > 1 and stages == 2:  # the search contains the greedy path: no separate greedy pass
        return _beam_search(x, codebooks, beam, word_norms, weigh)[0]
    greedy = torch.empty(n, stages, dtype=torch.long, device=x.device)
    r = x
    for s in range(stages):
        if k > BLOCKED_ABOVE:  # 2**16-entry codebooks: tile by tile, nothing of size n * k
            idx = nearest_blocked(r, codebooks[s], wt)
        else:
            idx = torch.addmm(word_norms(s), weigh(r), codebooks[s].T, alpha=-2.0).argmin(1)
        greedy[:, s] = idx
        r = r - codebooks[s][idx]
    if beam <= 1 or stages == 1:
        return greedy
    greedy_err = (weigh(r) * r).sum(-1)
    codes, best_err = _beam_search(x, codebooks, beam, word_norms, weigh)
    return torch.where((best_err <= greedy_err)[:, None], codes, greedy)


def _beam_search(x: Tensor, codebooks: Tensor, beam: int, word_norms, weigh) -> tuple[Tensor, Tensor]:
    """The beam search of :func:`encode_rvq`: ``(codes [n, S] int64, their errors [n])`` of the best beam."""
    n = x.shape[0]
    stages, k, _ = codebooks.shape
    # beams: residuals [n, B, d], their (weighted) squared norms [n, B], their codes [n, B, s]
    res = x[:, None, :]
    err = (weigh(x) * x).sum(-1, keepdim=True)
    codes = torch.zeros(n, 1, 0, dtype=torch.long, device=x.device)
    for s in range(stages):
        b = res.shape[1]
        # [n, b, K]: err + |c|^2 - 2 r.c, in place on the product
        total = (weigh(res) @ codebooks[s].T).mul_(-2.0).add_(word_norms(s)[:, None, :]).add_(err[:, :, None])
        if s + 1 < stages:
            best, flat = total.reshape(n, b * k).topk(min(beam, b * k), dim=1, largest=False)
        else:  # the last stage only needs the best one (min is much cheaper than topk)
            best, flat = total.reshape(n, b * k).min(dim=1, keepdim=True)
        parent, word = flat // k, flat % k
        res = res.gather(1, parent[..., None].expand(-1, -1, res.shape[-1])) - codebooks[s][word]
        err = best
        codes = torch.cat([codes.gather(1, parent[..., None].expand(-1, -1, s)), word[..., None]], dim=2)
    best_err = (weigh(res[:, 0]) * res[:, 0]).sum(-1)  # topk is sorted: beam 0 is the best
    return codes[:, 0], best_err


def encode_rvq_chunked(
    x: Tensor, codebooks: Tensor, beam: int = 1, wt: Tensor | None = None, max_elems: int = 1 << 23
) -> Tensor:
    """:func:`encode_rvq` over row chunks of ``x [n, d]`` (``wt [n, d]`` likewise), each holding at most
    ``max_elems`` entries of the ``[rows, beam, K]`` score block. Returns ``[n, S]`` int64 on ``x``'s device."""
    n = x.shape[0]
    step = max(1, max_elems // (max(beam, 1) * codebooks.shape[1]))
    if n <= step:
        return encode_rvq(x, codebooks, beam, wt)
    return torch.cat([
        encode_rvq(x[i : i + step], codebooks, beam, None if wt is None else wt[i : i + step])
        for i in range(0, n, step)
    ])


def encode_with_feedback(
    w: Tensor, h: Tensor, scales: Tensor, codebooks: Tensor, block: int = 128, beam: int = 1, *,
    overwrite_hessian: bool = False, damp: float = DAMP
) -> Tensor:
    """Choose codes for ``w [out, in_pad]`` against the output error ``tr((W-Q) H (W-Q)^T)``.

    Groups of ``d`` columns are coded left to right. Each group is coded under the exact metric of the
    error it leaves, ``||(w_g - q_g) U_gg^-1||^2`` (``U`` the upper Cholesky factor of ``H^-1``), by mapping
    the target and the codebooks through ``U_gg^-1``; its error is then pushed onto the not-yet-coded
    columns through ``U`` (GPTQ's update), lazily in blocks of ``block`` columns.

    Args:
        w: ``[out, in_pad]`` float32. h: ``[in_pad, in_pad]`` float64 Hessian (padding rows/cols zero;
            not modified unless ``overwrite_hessian``: see :func:`inverse_hessian_factor`). scales:
            ``[out]``. codebooks: ``[S, K, d]`` (fixed). beam: see :func:`encode_rvq`. All on one device.
    Returns:
        codes ``[out, in_pad // d, S]`` int64 on that device.

    Everything runs on that device without host syncs in the per-group loop. Memory: ``U`` (float32
    ``[in_pad, in_pad]``), a copy of ``w``, the update ``err @ U[block, rest]`` (``[out, in_pad]`` at
    most) and per group an ``[out, beam, K]`` score block: nothing of size ``out * in_pad * K``.
    """
    out, in_pad = w.shape
    stages, _, d = codebooks.shape
    block = max(d, block // d * d)
    u, dead = inverse_hessian_factor(h, damp, overwrite=overwrite_hessian)
    w = w.clone()
    w.masked_fill_(dead, 0.0)  # w[:, dead] = 0 without the host sync of boolean indexing
    codes = torch.empty(out, in_pad // d, stages, dtype=torch.long, device=w.device)
    stage_rows = torch.arange(stages, device=codebooks.device)[None, :]
    inv_s = 1.0 / scales[:, None]
    # the inverses of U's diagonal [d, d] blocks, all at once: [G, d, d]. inv_ex skips inv's singularity
    # check (a host sync on a GPU); these blocks of an upper Cholesky factor are triangular with a positive
    # diagonal, so never singular
    groups = in_pad // d
    maps = torch.linalg.inv_ex(u.view(groups, d, groups, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)).inverse
    for b0 in range(0, in_pad, block):
        b1 = min(b0 + block, in_pad)
        wb = w[:, b0:b1].clone()
        ub = u[b0:b1, b0:b1]
        err = torch.zeros_like(wb)
        for g0 in range(0, b1 - b0, d):
            g1 = g0 + d
            a = maps[(b0 + g0) // d]  # [d, d]: maps an error to its cost coordinates
            target = (wb[:, g0:g1] * inv_s) @ a
            c = encode_rvq(target, codebooks @ a, beam)
            codes[:, (b0 + g0) // d] = c
            q = codebooks[stage_rows, c].sum(1) * scales[:, None]  # [out, d]
            e = (wb[:, g0:g1] - q) @ a
            err[:, g0:g1] = e
            wb[:, g1:] -= e @ ub[g0:g1, g1:]
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes
