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
