import pytest
import torch

from rvqllm.rvq.refit import coordinate_errors, reconstruct, refine_codebooks, refit_codebooks
from rvqllm.rvq.residual import encode_rvq, learn_codebooks, quantize_weight, to_fp16_exact

pytestmark = pytest.mark.unit


def _weighted_error(x, wt, codes, books):
    return float(coordinate_errors(x, wt, codes, books).sum())


@pytest.mark.parametrize("uniform", [True, False])
def test_refit_never_increases_weighted_error_for_fixed_codes(uniform):
    g = torch.Generator().manual_seed(0)
    n, d, stages, k = 3000, 4, 3, 16
    x = torch.randn(n, d, generator=g)
    wt = torch.ones(n, d) if uniform else torch.rand(n, d, generator=g) ** 2
    books = to_fp16_exact(torch.randn(stages, k, d, generator=g) * torch.tensor([1.0, 0.5, 0.25])[:, None, None])
    codes = encode_rvq(x, books, 4)
    codes[:, 2] = codes[:, 2].clamp_max(k - 3)  # the last two codewords of stage 2 go unused
    before = _weighted_error(x, wt, codes, books)
    new = refit_codebooks(x, wt, codes, books)
    assert new.dtype == torch.float32 and new.shape == books.shape
    assert torch.equal(new, new.half().float())  # fp16-exact
    assert torch.equal(new[2, k - 2 :], books[2, k - 2 :])  # unused codewords keep their values
    after = _weighted_error(x, wt, codes, new)
    assert after <= before
    assert after < 0.95 * before  # random codebooks: a real improvement
    again = refit_codebooks(x, wt, codes, new)  # at the optimum: stays there, up to rounding
    assert _weighted_error(x, wt, codes, again) <= after


def test_refit_is_the_least_squares_optimum():
    """No small move of any codeword lowers the weighted error (gradient ~ 0 at the solution)."""
    g = torch.Generator().manual_seed(1)
    n, d, stages, k = 2000, 3, 2, 8
    x = torch.randn(n, d, generator=g)
    wt = torch.rand(n, d, generator=g)
    books = torch.randn(stages, k, d, generator=g)
    codes = torch.randint(0, k, (n, stages), generator=g)
    new = refit_codebooks(x, wt, codes, books, ridge=1e-9).double().requires_grad_(True)
    e = x.double() - reconstruct(codes, new)
    loss = (wt.double() * e * e).sum()
    (grad,) = torch.autograd.grad(loss, new)
    # the only deviation from the exact optimum is the fp16 rounding of the solution
    assert float(grad.abs().max()) < 1e-3 * float(wt.sum()) / k


def test_refit_recovers_known_codebooks():
    g = torch.Generator().manual_seed(2)
    n, d, stages, k = 4000, 4, 2, 16
    true = to_fp16_exact(torch.randn(stages, k, d, generator=g))
    codes = torch.randint(0, k, (n, stages), generator=g)
    x = reconstruct(codes, true) + 1e-4 * torch.randn(n, d, generator=g)
    wt = 0.5 + torch.rand(n, d, generator=g)
    start = to_fp16_exact(true + 0.3 * torch.randn(stages, k, d, generator=g))
    got = refit_codebooks(x, wt, codes, start)
    # sums of codewords are identified up to a constant moved between stages (the gauge): compare
    # every stage with its mean removed, and the sum of the stage means
    centred = got - got.mean(1, keepdim=True)
    assert torch.allclose(centred, true - true.mean(1, keepdim=True), atol=5e-3)
    assert torch.allclose(got.mean(1).sum(0), true.mean(1).sum(0), atol=5e-3)
    assert _weighted_error(x, wt, codes, got) < 1e-3 * _weighted_error(x, wt, codes, start)


def test_refine_is_monotone_and_learn_codebooks_refits_lower_distortion():
    g = torch.Generator().manual_seed(3)
    n, d, stages, k, beam = 4096, 4, 2, 16, 8
    x = torch.randn(n, d, generator=g)
    wt = torch.ones(n, d)

    def distortion(books):
        return float(((x - reconstruct(encode_rvq(x, books, beam), books)) ** 2).mean())

    plain = learn_codebooks(x, wt, stages, k, 10, 0, n // k)
    refit = learn_codebooks(x, wt, stages, k, 10, 0, n // k, refits=4, beam=beam)
    assert torch.equal(refit, refit.half().float())
    assert distortion(refit) < 0.97 * distortion(plain)

    wts = torch.rand(n, d, generator=g)  # per-vector, per-coordinate weights: the weighted path
    books, codes = plain, None
    errors = []
    for _ in range(3):
        books, codes = refine_codebooks(x, wts, books, 1, beam=beam, codes=codes)
        errors.append(_weighted_error(x, wts, codes, books))
    assert all(b <= a for a, b in zip(errors, errors[1:], strict=False)), errors


def test_weighted_beam_encoding_matches_exhaustive_search():
    g = torch.Generator().manual_seed(4)
    x, wt = torch.randn(400, 4, generator=g), torch.rand(400, 4, generator=g)
    books = torch.randn(2, 8, 4, generator=g)
    pairs = torch.cartesian_prod(torch.arange(8), torch.arange(8))
    every = (wt[:, None] * (x[:, None] - books[0][pairs[:, 0]] - books[1][pairs[:, 1]]) ** 2).sum(-1)
    got = (wt * (x - reconstruct(encode_rvq(x, books, 64, wt), books)) ** 2).sum(-1)
    assert torch.allclose(got, every.min(1).values, atol=1e-5)


def test_quantize_weight_refits():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 64, generator=g)
    h = torch.rand(64, generator=g) + 0.1
    kw = dict(vector_dim=4, stages=2, bits=4, seed=0, beam=4, kmeans_points=32)
    base = quantize_weight(w, torch.diag(h), error_feedback=False, **kw)
    refit = quantize_weight(w, torch.diag(h), error_feedback=False, refits=3, **kw)
    fb = quantize_weight(w, torch.diag(h), error_feedback=True, refits=2, **kw)
    assert torch.equal(refit.codebooks, refit.codebooks.half().float())
    assert fb.codes.shape == refit.codes.shape == (32, 16, 2)

    def err(q):
        return float(((q.dequantize() - w) ** 2 * h).sum())

    assert err(refit) < err(base)
