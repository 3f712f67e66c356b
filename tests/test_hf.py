"""transformers integration: from_pretrained / save_pretrained / generate / device_map on rvqllm checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import rvqllm
from rvqllm.errors import RVQError
from rvqllm.nn import QuantizedLinear
from tests.test_architectures import _build

pytestmark = pytest.mark.integration

CFG = rvqllm.RVQConfig(vector_dim=8, stages=2, bits=4, kmeans_iters=2, calib_batch_size=4, error_feedback=False)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def checkpoint(request, tmp_path_factory):
    """``(folder written by rvqllm.save, logits of the quantized model on IDS)``."""
    model = _build(request.param)
    rvqllm.quantize(model, CFG, torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        logits = model(IDS).logits
    return rvqllm.save(model, tmp_path_factory.mktemp(request.param) / "ckpt"), logits


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):  # every shard (or the one model.safetensors)
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_from_pretrained_then_save_pretrained_is_the_same_format(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, logits = checkpoint
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32  # the tiny models were built in fp32 and stored so
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model), logits, rtol=0, atol=1e-5)

    model.save_pretrained(tmp_path / "hf")
    ours, theirs = json.loads((folder / "config.json").read_text()), json.loads((tmp_path / "hf/config.json").read_text())
    assert theirs["quantization_config"] == ours["quantization_config"]
    a, b = _tensors(folder), _tensors(tmp_path / "hf")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # ... and rvqllm.load reads what save_pretrained wrote
    torch.testing.assert_close(_logits(rvqllm.load(tmp_path / "hf")), logits, rtol=0, atol=1e-5)


def test_generate_works(checkpoint):
    from transformers import AutoModelForCausalLM

    folder, _ = checkpoint
    model = AutoModelForCausalLM.from_pretrained(folder)
    out = model.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    # greedy generation matches argmax of the loaded rvqllm model, step by step
    ref = rvqllm.load(folder)
    seq = IDS[:1, :5]
    for _ in range(6):
        with torch.no_grad():
            nxt = ref(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_device_map_with_offloading(checkpoint, tmp_path):
    """A model that does not fit the memory given: accelerate offloads blocks to disk; same logits."""
    from transformers import AutoModelForCausalLM

    folder, logits = checkpoint
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=str(tmp_path / "offload"))
    placed = set(model.hf_device_map.values())
    assert "disk" in placed, model.hf_device_map
    torch.testing.assert_close(_logits(model), logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("version,match", [(3, "newer than this rvqllm"), (0, "never written by a released rvqllm"),
                                           ("1", "not an integer")])
def test_other_format_versions_say_why(checkpoint, tmp_path, version, match):
    import shutil

    from transformers import AutoModelForCausalLM

    folder, _ = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["format_version"] = version
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(RVQError, match=match):
        AutoModelForCausalLM.from_pretrained(bad)


def test_quantizing_inside_from_pretrained_is_refused():
    """rvq needs calibration: transformers itself refuses a non-pre-quantized load (requires_calibration)."""
    from rvqllm.hf import RVQHfQuantizer, RVQQuantizationConfig

    layer = dict.fromkeys(("in_features", "out_features", "vector_dim", "stages", "bits", "bias"), 1)
    with pytest.raises(ValueError, match="pre-quantized"):
        RVQHfQuantizer(RVQQuantizationConfig(layers={"x": layer}), pre_quantized=False)
