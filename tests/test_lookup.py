"""The summed codebook lookup of tuning (rvqllm.rvq.lookup): what indexing gives, forward and backward."""

import warnings

import pytest
import torch

from rvqllm.rvq.lookup import indexed_sum, lookup_sum


@pytest.mark.parametrize(("stages", "k", "d", "n", "dtype"), [
    (2, 256, 8, 5000, torch.int64),     # the 2-bit presets' shape, unpacked codes
    (3, 16, 4, 777, torch.uint8),       # three stages, stored uint8 codes as they come
    (1, 65536, 8, 3000, torch.int64),   # one shared 16-bit codebook: most codewords unused
    (1, 256, 1, 4096, torch.uint8),     # a trellis layer's table indices, one weight per index
])
def test_lookup_sum_equals_indexing_forward_and_backward(stages, k, d, n, dtype):
    gen = torch.Generator().manual_seed(stages * 1000 + d)
    table = torch.randn(stages, k, d, generator=gen, requires_grad=True)
    codes = torch.randint(0, k, (n, stages), generator=gen).to(dtype)
    codes[0] = k - 1  # both ends of every stage's range
    codes[1] = 0
    grad = torch.randn(n, d, generator=gen)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice of torch's sparse API reaches the user
        got = lookup_sum(table, codes)
        (g_got,) = torch.autograd.grad(got, table, grad)
    want = indexed_sum(table, codes)
    (g_want,) = torch.autograd.grad(want, table, grad)

    assert got.shape == (n, d) and got.dtype == torch.float32
    assert torch.equal(got, want)  # S products by exactly 1.0 summed in stage order: the same floats
    assert g_got.shape == table.shape
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-4)  # sums in another order
    unused = torch.ones(stages, k, dtype=torch.bool)
    for s in range(stages):
        unused[s, codes[:, s].long()] = False
    assert unused.any() == (k > n) and not g_got[unused].any()  # a codeword no vector uses gets exactly 0


def test_lookup_sum_under_autocast_stays_float32_and_is_deterministic():
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(2, 256, 8, generator=gen, requires_grad=True)
    codes = torch.randint(0, 256, (20000, 2), generator=gen)
    grad = torch.randn(20000, 8, generator=gen)
    grads = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lookup_sum(table, codes)
        assert out.dtype == torch.float32
        grads.append(torch.autograd.grad(out, table, grad)[0])
    assert torch.equal(grads[0], grads[1])


def test_lookup_sum_refuses_a_table_that_is_not_float32():
    with pytest.raises(TypeError, match="float32"):
        lookup_sum(torch.zeros(1, 4, 2, dtype=torch.float16), torch.zeros(3, 1, dtype=torch.long))
