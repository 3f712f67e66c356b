"""Hadamard rotations (rvqllm.rvq.rotation): the transform, rotated layers, checkpoints, validation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import rvqllm
from rvqllm.errors import RVQError
from rvqllm.nn import QuantizedLinear
from rvqllm.rvq import quantize_weight
from rvqllm.rvq import rotation as rot
from rvqllm.size import layer_bits
from tests.conftest import tiny_llama
from tests.test_reliability import read_tensors, write_as_stranger

pytestmark = pytest.mark.unit

CFG = rvqllm.RVQConfig(vector_dim=8, stages=2, bits=6, kmeans_iters=5, calib_batch_size=4, rotate=True)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("n", "max_block", "want"), [(576, 256, 64), (1536, 256, 256), (1536, 512, 512),
                                                      (1536, 300, 256), (64, 256, 64), (40, 256, 8), (7, 256, 1)])
def test_block_size(n, max_block, want):
    assert rot.block_size(n, max_block) == want


@pytest.mark.parametrize(("n", "block"), [(96, 32), (576, 64), (64, 64), (24, 8), (7, 1)])
def test_transform_is_orthogonal_and_fast_equals_dense(n, block):
    signs = rot.random_signs(n, seed=3)
    assert signs.dtype == torch.int8 and set(signs.tolist()) <= {-1, 1}
    assert torch.equal(signs, rot.random_signs(n, seed=3))  # seeded
    r = rot.matrix(signs, block)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(r @ r.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.T @ r, eye, rtol=0, atol=1e-12)
    # the dense R built independently: diag(signs) @ blockdiag(H_b) / sqrt(b)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    dense = torch.diag(signs.double()) @ torch.block_diag(*[h] * (n // block)) / block**0.5
    torch.testing.assert_close(r, dense, rtol=0, atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rot.rotate(x, signs, block), x @ dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(rot.unrotate(x, signs, block), x @ dense.T, rtol=0, atol=1e-12)
    hess = x.reshape(-1, n).T @ x.reshape(-1, n)
    torch.testing.assert_close(rot.rotate_hessian(hess, signs, block), dense.T @ hess @ dense, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("in_features", "bias"), [(64, True), (30, False), (40, True)])
def test_rotated_layer_forward_equals_dequantized_matmul(in_features, bias):
    g = torch.Generator().manual_seed(in_features)
    w = torch.randn(24, in_features, generator=g)
    b = torch.randn(24, generator=g) if bias else None
    q = quantize_weight(w, None, vector_dim=8, stages=2, bits=5, kmeans_iters=4, seed=2, rotate=True)
    assert q.signs is not None and q.signs.shape == (q.coded_width,) and q.coded_width % 8 == 0
    layer = QuantizedLinear.from_rvq(q, 5, b)
    assert layer.spec()["hadamard_block"] == q.rotation_block == rot.block_size(q.coded_width)
    dense = layer.dequantized_weight()
    assert dense.shape == (24, in_features)
    torch.testing.assert_close(dense, q.dequantize(), rtol=1e-5, atol=1e-5)  # fp16 storage is exact
    for tokens in (1, 3, 17):  # several kernels: lookup tables, decode, tiled
        x = torch.randn(2, tokens, in_features, generator=g)
        want = x @ dense.T + (b if b is not None else 0)
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    # close to the float weight (it is a real approximation, in the original basis)
    assert float((dense - w).pow(2).mean()) < 0.5 * float(w.pow(2).mean())


def test_rotation_lowers_error_with_huge_outlier_input_columns():
    """Known answer: three of 64 input channels carry huge activations (a shared factor, as LLMs'
    "massive activations" do). Rotating spreads them over the whole block and, coded with error feedback
    at the same code size, the output error drops by ~15-30% (ratio 0.73 for this data; 0.69-0.86 over
    other seeds). Without error feedback rotation *raises* it (7x here; docs/ROTATION.md)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=g)
    x[:, [5, 23, 40]] += 20 * torch.randn(2048, 1, generator=g)
    h = (x.T @ x).double()
    w = torch.randn(128, 64, generator=g)

    def out_err(q):
        e = (w - q.dequantize()).double()
        return float(torch.trace(e @ h @ e.T) / torch.trace(w.double() @ h @ w.double().T))

    kw = dict(vector_dim=4, stages=2, bits=4, kmeans_iters=10, beam=4, error_feedback=True, seed=1)
    plain, rotated = quantize_weight(w, h, **kw), quantize_weight(w, h, rotate=True, **kw)
    assert rotated.rotation_block == 64
    assert rotated.codes.shape == plain.codes.shape and rotated.codebooks.shape == plain.codebooks.shape
    assert out_err(rotated) < 0.9 * out_err(plain)


def test_rotation_is_deterministic_and_seeded():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    a = quantize_weight(w, None, vector_dim=4, stages=1, bits=4, kmeans_iters=2, seed=5, rotate=True)
    b = quantize_weight(w, None, vector_dim=4, stages=1, bits=4, kmeans_iters=2, seed=5, rotate=True)
    c = quantize_weight(w, None, vector_dim=4, stages=1, bits=4, kmeans_iters=2, seed=6, rotate=True)
    assert torch.equal(a.signs, b.signs) and torch.equal(a.codes, b.codes)
    assert not torch.equal(a.signs, c.signs)


def test_config_rotate_is_validated():
    assert rvqllm.RVQConfig().rotate is False
    with pytest.raises(RVQError, match="rotate"):
        rvqllm.RVQConfig(rotate="yes")
    with pytest.raises(RVQError, match="error_feedback=true"):
        rvqllm.RVQConfig(rotate=True, error_feedback=False)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """(folder of a saved rotate=True tiny llama, its logits on IDS)."""
    model = tiny_llama()
    rvqllm.quantize(model, CFG, CALIB)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(m.signs is not None for m in layers)
    with torch.no_grad():
        logits = model(IDS).logits
    return rvqllm.save(model, tmp_path_factory.mktemp("rot") / "ckpt"), logits


def test_rotated_model_save_load_identical_logits(rotated):
    folder, logits = rotated
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert q["format_version"] == 1 and q["rvq_config"]["rotate"] is True
    assert all(spec["hadamard_block"] == 64 for name, spec in q["layers"].items() if "down_proj" not in name)
    assert all(spec["hadamard_block"] == 32 for name, spec in q["layers"].items() if "down_proj" in name)  # 96
    loaded = rvqllm.load(folder)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, logits)
    specs = loaded.rvq_layers
    assert all(layer_bits(s)["signs"] == 8 * s["in_features"] for s in specs.values())


def test_rotated_model_from_pretrained_identical_logits(rotated, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, logits = rotated
    model = AutoModelForCausalLM.from_pretrained(folder)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear) and layer.signs.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, logits)
    model.save_pretrained(tmp_path / "again")
    a, b = read_tensors(folder), read_tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unrotated_checkpoint_has_no_rotation_fields(tmp_path):
    model = tiny_llama()
    rvqllm.quantize(model, CFG.replace(rotate=False), CALIB)
    folder = rvqllm.save(model, tmp_path / "plain")
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert not any("hadamard_block" in s for s in q["layers"].values())
    assert not any(k.endswith(".signs") for k in read_tensors(folder))


def _tamper(src, dst, change_tensors=None, change_config=None):
    """Copy a checkpoint, change it, and re-sign it (valid checksums: what a tamperer can do)."""
    folder = shutil.copytree(src, dst)
    tensors = read_tensors(folder)
    config = json.loads((folder / "config.json").read_text())
    if change_tensors:
        change_tensors(tensors)
    if change_config:
        change_config(config)
    write_as_stranger(folder, tensors, config)
    return folder


def _one_line(err: BaseException, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


NAME = "model.layers.0.self_attn.q_proj"


def _set(t, i, v):
    t[f"{NAME}.signs"][i] = v


@pytest.mark.parametrize(("change_tensors", "change_config", "needles"), [
    (lambda t: _set(t, 3, 0), None, [f"{NAME}.signs", "not +1 or -1"]),
    (lambda t: _set(t, 5, 7), None, [f"{NAME}.signs", "not +1 or -1"]),
    (lambda t: t.__setitem__(f"{NAME}.signs", t[f"{NAME}.signs"][:-8].clone()), None, [f"{NAME}.signs", "shape"]),
    (lambda t: t.__setitem__(f"{NAME}.signs", t[f"{NAME}.signs"].float()), None, [f"{NAME}.signs", "F32"]),
    (lambda t: t.pop(f"{NAME}.signs"), None, [f"{NAME}.signs", "lacks"]),
    (None, lambda c: c["quantization_config"]["layers"][NAME].pop("hadamard_block"), [f"{NAME}.signs"]),
    (None, lambda c: c["quantization_config"]["layers"][NAME].update(hadamard_block=48), ["hadamard_block=48"]),
    (None, lambda c: c["quantization_config"]["layers"][NAME].update(hadamard_block=128), ["hadamard_block=128"]),
], ids=["zero", "seven", "short", "float", "missing", "spec-dropped", "not-pow2", "too-big"])
def test_corrupted_signs_are_refused_with_one_line(rotated, tmp_path, change_tensors, change_config, needles):
    folder = _tamper(rotated[0], tmp_path / "bad", change_tensors, change_config)
    with pytest.raises(RVQError) as err:
        rvqllm.load(folder)
    _one_line(err.value, *needles)


def test_corrupted_signs_are_refused_by_from_pretrained(rotated, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = _tamper(rotated[0], tmp_path / "bad", lambda t: _set(t, 0, 0))
    with pytest.raises(RVQError) as err:
        AutoModelForCausalLM.from_pretrained(folder)
    _one_line(err.value, f"{NAME}.signs", "not +1 or -1")


def test_finetuning_a_rotated_block_keeps_forward_consistent():
    model = tiny_llama()
    rvqllm.quantize(model, CFG.replace(finetune_epochs=1, calib_sequences=8), CALIB)
    layer = model.model.layers[1].mlp.down_proj
    assert layer.signs is not None
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T, rtol=1e-4, atol=1e-4)


class _Stop(Exception):
    pass


def test_resumed_rotated_run_is_bit_identical(rotated, tmp_path):
    """--resume rebuilds rotated layers (signs, hadamard_block) from the run folder."""
    folder, logits = rotated
    run = tmp_path / "run"

    def stop_in_block_1(name, done, total):
        if name.startswith("model.layers.1."):
            raise _Stop

    with pytest.raises(_Stop):
        rvqllm.quantize(tiny_llama(), CFG, CALIB, stop_in_block_1, run_dir=run)
    resumed = tiny_llama()
    report = rvqllm.quantize(resumed, CFG, CALIB, run_dir=run, resume=True)
    assert sum(1 for r in report.layers.values() if r.get("resumed")) == 7
    assert all(r["hadamard_block"] > 0 for r in report.layers.values())
    ref = rvqllm.load(folder)
    with torch.no_grad():
        assert torch.equal(resumed(IDS).logits, logits)
    for name, m in resumed.named_modules():
        if isinstance(m, QuantizedLinear):
            assert torch.equal(m.signs, ref.get_submodule(name).signs), name


def test_mixed_precision_budget_counts_the_signs():
    from rvqllm.mixed import allocate
    from rvqllm.size import summarize

    low, high = {"vector_dim": 8, "stages": 1, "bits": 8}, {"vector_dim": 8, "stages": 2, "bits": 8}
    shapes = {f"l{i}": (64, 512) for i in range(6)}  # narrow outputs: the signs cost 8/64 = 0.125 bpw
    sens = {f"l{i}": float(10**i) for i in range(6)}

    def bpw(plan, rotate):
        return summarize({n: {"out_features": o, "in_features": i, **plan[n], **({"hadamard_block": 64} if rotate else {})}
                          for n, (o, i) in shapes.items()})["bpw"]

    budget = bpw(dict.fromkeys(shapes, high), rotate=False)
    assert allocate(shapes, sens, [low, high], budget) == dict.fromkeys(shapes, high)
    plan = allocate(shapes, sens, [low, high], budget, rotate=True)
    assert plan != dict.fromkeys(shapes, high) and bpw(plan, rotate=True) <= budget


def test_rotation_composes_with_codebook_refits():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(512, 64, generator=g)
    h = (x.T @ x).double()
    q = quantize_weight(w, h, vector_dim=4, stages=2, bits=4, kmeans_iters=3, beam=2, refits=1, seed=0, rotate=True)
    assert q.signs is not None
    assert float((q.dequantize() - w).pow(2).mean()) < 0.5 * float(w.pow(2).mean())
