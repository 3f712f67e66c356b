"""Tiny random-weight models end to end: quantize, save, load, identical logits."""

import json

import pytest
import torch

import rvqllm
from rvqllm.nn import QuantizedLinear
from tests.conftest import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.integration

CFG = rvqllm.RVQConfig(vector_dim=8, stages=2, bits=6, kmeans_iters=5, calib_batch_size=4)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_quantize_save_load_identical_logits(build, calib_ids, tmp_path):
    model = build()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(ids).logits
    report = rvqllm.quantize(model, CFG, calib_ids)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == len(report.layers) == (14 if build is tiny_llama else 8)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".layers." in n or ".h." in n)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after)  # it really is quantized ...
    rel = (after - before).norm() / before.norm()
    assert rel < 0.5  # ... and still close to the original

    out = rvqllm.save(model, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "rvq" and q["format_version"] == 1
    assert len(q["layers"]) == len(quantized)
    loaded = rvqllm.load(out)
    with torch.no_grad():
        again = loaded(ids).logits
    assert torch.equal(again, after)


def test_lm_head_and_embeddings_stay_unquantized(calib_ids):
    model = tiny_llama()
    rvqllm.quantize(model, CFG, calib_ids)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)


def test_skip_keeps_named_layers(calib_ids):
    model = tiny_llama()
    rvqllm.quantize(model, CFG.replace(skip=["lm_head", "mlp.down_proj"]), calib_ids)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)


def test_same_seed_same_codes(calib_ids):
    a, b = tiny_llama(), tiny_llama()
    rvqllm.quantize(a, CFG, calib_ids)
    rvqllm.quantize(b, CFG, calib_ids)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(ta, tb), na
