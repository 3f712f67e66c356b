"""One codebook shared by every quantized layer (config ``shared_codebook``): coding, format, loading,
tuning, resume, size accounting and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import rvqllm
from rvqllm.errors import RVQError
from rvqllm.nn import SHARED_KEY, QuantizedLinear, SharedCodebooks
from rvqllm.rvq.universal import BUILTIN, load_shared_codebook, shared_codebook_path
from rvqllm.size import summarize
from tests.conftest import tiny_llama

pytestmark = pytest.mark.integration

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def _codebook_file(tmp_path, stages=1, k=512, d=8, seed=3):
    cb = torch.randn(stages, k, d, generator=torch.Generator().manual_seed(seed)).half()
    path = tmp_path / "cb.safetensors"
    save_file({"codebooks": cb}, str(path))
    return path, cb


def _cfg(path, **kw):
    return rvqllm.RVQConfig(vector_dim=8, stages=1, bits=9, kmeans_iters=3, calib_batch_size=4,
                            shared_codebook=str(path), **kw)


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def test_every_layer_decodes_with_the_one_codebook_and_it_is_stored_once(calib_ids, tmp_path):
    path, cb = _codebook_file(tmp_path)
    model = tiny_llama()
    rvqllm.quantize(model, _cfg(path, rotate=True), calib_ids)
    layers = _layers(model)
    assert len(layers) == 14 and all(m.shared and m.shared_owner is model.rvq_shared for m in layers.values())
    assert all(m.codebooks is model.rvq_shared.codebooks for m in layers.values())  # one tensor, no copies
    assert torch.equal(model.rvq_shared.codebooks, cb)  # no tuning: the file's codebook as it is
    assert all("codebooks" not in dict(m.named_buffers()) for m in layers.values())
    with torch.no_grad():
        after = model(IDS).logits
    out = rvqllm.save(model, tmp_path / "ckpt")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert [k for k in index if k.endswith("codebooks")] == [SHARED_KEY]
    n_shards = len(set(index.values()))
    assert index[SHARED_KEY] == f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors"  # the last shard
    specs = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert all(s["shared_codebooks"] is True for s in specs.values())
    loaded = rvqllm.load(out)
    ll = _layers(loaded)
    assert all(m.codebooks is loaded.rvq_shared.codebooks for m in ll.values())
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, after)
    # transformers' own loader (the rvq quantizer) ties them too
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(m.codebooks is hf.rvq_shared.codebooks for m in _layers(hf).values())
    with torch.no_grad():
        assert torch.allclose(hf(IDS).logits, after, atol=1e-5)


def test_size_counts_the_shared_codebook_once(calib_ids, tmp_path):
    path, _ = _codebook_file(tmp_path)
    model = tiny_llama()
    report = rvqllm.quantize(model, _cfg(path), calib_ids)
    specs = {n: m.spec() for n, m in _layers(model).items()}
    s = summarize(specs)
    weights = sum(sp["out_features"] * sp["in_features"] for sp in specs.values())
    assert s["codebooks_bpw"] == pytest.approx(512 * 8 * 16 / weights)
    own = summarize({n: {k: v for k, v in sp.items() if k != "shared_codebooks"} for n, sp in specs.items()})
    assert own["codebooks_bpw"] == pytest.approx(14 * s["codebooks_bpw"])
    assert report.layers  # the report lists the layers as for any config


def test_distillation_tunes_the_shared_codebook_once_and_saves_it(calib_ids, tmp_path):
    path, cb = _codebook_file(tmp_path)
    model = tiny_llama()
    report = rvqllm.quantize(model, _cfg(path, distill_epochs=2, distill_lr=1e-2), calib_ids)
    assert report.distill["kl_after"] < report.distill["kl_before"]
    tuned = model.rvq_shared.codebooks
    assert not torch.equal(tuned, cb)
    assert all(m.codebooks is tuned for m in _layers(model).values())
    loaded = rvqllm.load(rvqllm.save(model, tmp_path / "ckpt"))
    assert torch.equal(loaded.rvq_shared.codebooks, tuned)


def test_copied_layers_and_other_devices_read_the_right_codebook(calib_ids, tmp_path):
    import copy

    path, _ = _codebook_file(tmp_path)
    model = tiny_llama()
    rvqllm.quantize(model, _cfg(path), calib_ids)
    twin = copy.deepcopy(model)  # the copy's layers point at the copy's codebook
    assert all(m.shared_owner is twin.rvq_shared for m in _layers(twin).values())
    with torch.no_grad():
        twin.rvq_shared.codebooks.mul_(2)
    assert not torch.equal(model.rvq_shared.codebooks, twin.rvq_shared.codebooks)
    owner = SharedCodebooks(torch.ones(1, 4, 8, dtype=torch.float16, device="meta"))
    assert owner.on(torch.device("cpu")).is_meta  # a skeleton's codebook stays meta until loaded


def test_resume_after_distillation_keeps_the_tuned_codebook(calib_ids, tmp_path):
    path, _ = _codebook_file(tmp_path)
    cfg = _cfg(path, distill_epochs=1, distill_lr=1e-2)
    run = tmp_path / "run"
    model = tiny_llama()
    rvqllm.quantize(model, cfg, calib_ids, run_dir=run)
    assert (run / "shared-codebook.safetensors").is_file()
    again = tiny_llama()
    report = rvqllm.quantize(again, cfg, calib_ids, run_dir=run, resume=True)  # all committed: nothing redone
    assert all(v.get("resumed") for v in report.layers.values()) and not report.distill
    assert torch.equal(again.rvq_shared.codebooks, model.rvq_shared.codebooks)
    assert all(m.shared_owner is again.rvq_shared for m in _layers(again).values())
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_a_changed_codebook_file_is_not_resumed(calib_ids, tmp_path):
    path, cb = _codebook_file(tmp_path)
    run = tmp_path / "run"
    rvqllm.quantize(tiny_llama(), _cfg(path), calib_ids, run_dir=run)
    save_file({"codebooks": (cb.float() * 1.5).half()}, str(path))
    with pytest.raises(RVQError, match="different shared codebook file"):
        rvqllm.quantize(tiny_llama(), _cfg(path), calib_ids, run_dir=run, resume=True)


def test_bad_shared_codebooks_are_refused_in_one_line(tmp_path):
    with pytest.raises(RVQError, match="no such file"):
        load_shared_codebook(str(tmp_path / "missing.safetensors"), 1, 9, 8)
    path, _ = _codebook_file(tmp_path, k=256)
    with pytest.raises(RVQError, match=r"shape \[1, 512, 8\]"):
        load_shared_codebook(str(path), 1, 9, 8)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RVQError, match="not a readable safetensors"):
        load_shared_codebook(str(tmp_path / "junk.safetensors"), 1, 9, 8)
    with pytest.raises(RVQError, match="set stages: 1, bits: 16 and vector_dim: 8"):
        rvqllm.RVQConfig(shared_codebook="gaussian-65536")  # the 2 x 256 defaults
    with pytest.raises(RVQError, match="block fine-tuning"):
        rvqllm.RVQConfig(vector_dim=8, stages=1, bits=16, shared_codebook="gaussian-65536", finetune_epochs=1)
    with pytest.raises(RVQError, match="bpw_budget"):
        rvqllm.RVQConfig(vector_dim=8, stages=1, bits=16, shared_codebook="gaussian-65536", bpw_budget=2.0,
                         mixed_candidates=[{"vector_dim": 8, "stages": 1, "bits": 16}])


def test_checkpoints_with_inconsistent_sharing_are_refused(calib_ids, tmp_path):
    path, _ = _codebook_file(tmp_path)
    model = tiny_llama()
    rvqllm.quantize(model, _cfg(path), calib_ids)
    out = rvqllm.save(model, tmp_path / "ckpt")
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    name = next(iter(config["quantization_config"]["layers"]))
    config["quantization_config"]["layers"][name]["shared_codebooks"] = "yes"
    config_path.write_text(json.dumps(config))
    with pytest.raises(RVQError, match="shared_codebooks='yes'"):
        rvqllm.load(out)
    config["quantization_config"]["layers"][name]["shared_codebooks"] = True
    config["quantization_config"]["layers"][name]["bits"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(RVQError, match="disagree on the codebook's shape"):
        rvqllm.load(out)


def test_the_builtin_gaussian_codebook_ships_with_the_package():
    name, (file, stages, bits, d) = next(iter(BUILTIN.items()))
    assert shared_codebook_path(name).name == file
    cb = load_shared_codebook(name, stages, bits, d)
    assert cb.shape == (1, 65536, 8) and cb.dtype == torch.float16
    assert torch.unique(cb[0], dim=0).shape[0] == 65536  # every codeword distinct
    # trained on a unit Gaussian: held-out MSE per dimension 0.0893 on 65,536 vectors (docs/RESULTS.md), far
    # below a 2 x 256 residual code's ~0.1 and the scalar 2-bit quantizer's 0.118
    from rvqllm.rvq.kmeans import nearest_blocked

    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(99))
    idx = nearest_blocked(x, cb[0].float())
    assert float(((x - cb[0].float()[idx]) ** 2).mean()) < 0.095
