import copy

import pytest
import torch

from rvqllm.nn import QuantizedLinear
from rvqllm.rvq import quantize_weight

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("bits,in_features,bias", [(8, 64, True), (4, 30, False), (10, 16, True)])
def test_quantized_linear_equals_dequantized_matmul(bits, in_features, bias):
    torch.manual_seed(0)
    w = torch.randn(24, in_features)
    b = torch.randn(24) if bias else None
    q = quantize_weight(w, None, vector_dim=8, stages=2, bits=bits, kmeans_iters=3)
    layer = QuantizedLinear.from_rvq(q, bits, b)
    assert layer.codes.dtype == (torch.uint8 if bits <= 8 else torch.int16)
    assert layer.codebooks.dtype == torch.float16 and layer.scales.dtype == torch.float16
    x = torch.randn(5, 3, in_features)
    expect = x @ q.dequantize().T + (b if b is not None else 0)
    got = layer(x)
    assert got.shape == (5, 3, 24)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantized_weight(), q.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("rotate", [False, True])
def test_weight_is_the_decoded_matrix_in_the_models_dtype(rotate, monkeypatch):
    """``.weight`` (for model code that reads the matrix, e.g. Mamba's ``dt_proj.weight @ x``) is what the
    layer computes with, in its compute dtype, which follows ``.to(dtype)`` as a float parameter would; a
    tuning wrapper's ``.weight`` is the same matrix, differentiable in the codebooks."""
    from rvqllm.finetune import _TrainableRVQ

    torch.manual_seed(0)
    w, x = torch.randn(24, 30), torch.randn(4, 30)
    q = quantize_weight(w, None, vector_dim=8, stages=2, bits=6, kmeans_iters=3, rotate=rotate)
    layer = QuantizedLinear.from_rvq(q, 6, None, torch.float32)
    monkeypatch.setattr("rvqllm.kernels.cpu_build._warned", set())
    with pytest.warns(UserWarning, match="decodes it on every read"):  # said once per process
        weight = layer.weight
    assert weight.dtype == torch.float32 and weight.shape == (24, 30)
    torch.testing.assert_close(x @ weight.T, layer(x), rtol=1e-5, atol=1e-5)
    moved = copy.deepcopy(layer).to(torch.bfloat16)  # (in place: the codebooks become bf16 too)
    assert moved.weight.dtype == torch.bfloat16 and moved.float().weight.dtype == torch.float32
    assert QuantizedLinear.from_rvq(q, 6, torch.zeros(24, dtype=torch.float16)).compute_dtype == torch.float16
    tuned = _TrainableRVQ(layer)
    assert torch.equal(tuned.weight.detach(), weight)
    tuned.weight.sum().backward()
    assert tuned.codebooks.grad is not None and tuned.codebooks.grad.abs().sum() > 0


def test_decoded_linears_compute_what_the_quantized_layers_do_and_put_them_back():
    """Inside ``decoded_linears`` every quantized layer (plain, rotated with padding, trellis) is an
    ``nn.Linear`` holding its decoded weight: the same outputs, in the input's dtype as the op gives them
    (also for a layer whose model stores float16, as a streamed run's does); afterwards the very same
    quantized modules are back, also when the body raises."""
    from rvqllm.nn import TrellisLinear, decoded_linears
    from rvqllm.rvq import trellis
    from rvqllm.rvq.trellis_layer import quantize_weight_trellis

    torch.manual_seed(0)
    plain = QuantizedLinear.from_rvq(quantize_weight(torch.randn(24, 30), None, vector_dim=8, stages=2, bits=6,
                                                     kmeans_iters=3), 6, torch.randn(24), torch.float16)
    rotated = QuantizedLinear.from_rvq(quantize_weight(torch.randn(30, 24), None, vector_dim=8, stages=2, bits=6,
                                                       kmeans_iters=3, rotate=True), 6, None, torch.float32)
    table = trellis.gaussian_lut(5).half().float()
    q = quantize_weight_trellis(torch.randn(20, 30), torch.eye(30), state_bits=8, pad_to=1, seed=0,
                                values=trellis.packed_values(table, 8, 2, 5))
    walk = TrellisLinear.from_trellis(q, table, 5, None, torch.float32)
    model = torch.nn.Sequential(plain, torch.nn.GELU(), rotated, torch.nn.Sequential(walk))
    originals = [plain, rotated, walk]
    x = torch.randn(3, 7, 30)
    with torch.no_grad():
        expect = model(x)
        with decoded_linears(model) as same:
            assert same is model
            dense = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            assert len(dense) == 3 and not any(isinstance(m, QuantizedLinear) for m in model.modules())
            assert [m.weight.shape for m in dense] == [(24, 30), (30, 24), (20, 30)]
            got = model(x)
    assert got.dtype == expect.dtype == torch.float32
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    assert [model[0], model[2], model[3][0]] == originals
    with pytest.raises(RuntimeError, match="boom"), decoded_linears(model):
        raise RuntimeError("boom")
    assert [model[0], model[2], model[3][0]] == originals
