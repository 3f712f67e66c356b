"""The trellis coder as a product (config ``coder: trellis``): packed walks, TrellisLinear, its op and
autograd, the pipeline, tuning, checkpoints (format 2), loading through rvqllm and transformers, resume,
validation and size accounting. The kernels themselves: tests/test_trellis_kernels.py."""

from __future__ import annotations

import json

import pytest
import torch

import rvqllm
from rvqllm.errors import RVQError
from rvqllm.nn import QuantizedLinear, TrellisLinear
from rvqllm.rvq import trellis
from rvqllm.rvq.trellis_layer import quantize_weight_trellis
from tests.conftest import tiny_llama

CFG = rvqllm.RVQConfig(coder="trellis", rotate=True, trellis_state_bits=8, calib_batch_size=4)
CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ------------------------------------------------------------------------------------------ packed walks
@pytest.mark.unit
@pytest.mark.parametrize(("L", "k"), [(12, 2), (8, 2), (9, 3), (6, 1)])
def test_packed_walks_round_trip_and_decode_what_the_coder_chose(L, k):
    x = torch.randn(3, 37, generator=torch.Generator().manual_seed(L))
    table = trellis.gaussian_lut(5)
    values = trellis.packed_values(table, L, k, 5)
    states = trellis.viterbi(x, L, k, values=values)
    walks = trellis.pack_walks(states, L, k)
    assert walks.dtype == torch.uint8 and walks.shape == (3, trellis.walk_bytes(37, L, k))
    assert walks.shape[1] == -(-(L + k * 36) // 8)
    windows = trellis.unpack_windows(walks, 37, L, k)
    assert torch.equal(windows, trellis.digit_reverse(states, L, k))
    assert torch.equal(trellis.digit_reverse(windows, L, k), states)  # its own inverse
    assert torch.equal(table[trellis.lut_index(windows, 5)], values[states])  # the codewords the coder chose


@pytest.mark.unit
def test_pack_walks_refuses_states_that_are_not_a_walk_and_odd_digits():
    with pytest.raises(ValueError, match="not a walk"):
        trellis.pack_walks(torch.tensor([[0, 4095, 0]]), 12, 2)
    with pytest.raises(ValueError, match="multiple of step_bits"):
        trellis.digit_reverse(torch.tensor([1]), 7, 2)
    with pytest.raises(ValueError, match="bytes"):
        trellis.unpack_windows(torch.zeros(1, 2, dtype=torch.uint8), 10, 12, 2)


# ------------------------------------------------------------------------------------------ the layer
def _layer(out=24, inp=20, bias=True, seed=0) -> tuple[TrellisLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    table = trellis.gaussian_lut(5).half().float()
    q = quantize_weight_trellis(w, torch.eye(inp), state_bits=8, pad_to=1, seed=seed,
                                values=trellis.packed_values(table, 8, 2, 5))
    layer = TrellisLinear.from_trellis(q, table, 5, torch.randn(out, generator=g) if bias else None, torch.float32)
    return layer, q.dequantize()


@pytest.mark.unit
def test_trellis_linear_decodes_what_was_coded_and_forward_matches():
    layer, recon = _layer()
    torch.testing.assert_close(layer.dequantized_weight(), recon, rtol=1e-3, atol=1e-3)  # fp16 scales
    x = torch.randn(5, 20)
    want = x @ layer.dequantized_weight().T + layer.bias.float()
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    assert layer.codes.shape == (20, trellis.walk_bytes(24, 8, 2)) and layer.codes.dtype == torch.uint8
    assert layer.codebooks.shape == (1, 32, 1) and layer.codebooks.dtype == torch.float16
    spec = layer.spec()
    assert spec["trellis_state_bits"] == 8 and spec["trellis_step_bits"] == 2 and spec["bits"] == 5
    rebuilt = QuantizedLinear.from_spec(spec, bias_dtype=torch.float32)
    assert isinstance(rebuilt, TrellisLinear)
    assert [(n, b.shape, b.dtype) for n, b in rebuilt.named_buffers()] == \
        [(n, b.shape, b.dtype) for n, b in layer.named_buffers()]


@pytest.mark.unit
def test_trellis_op_gradients_match_the_dense_layer():
    layer, _ = _layer(out=10, inp=12)
    table = layer.codebooks.reshape(-1).float().clone().requires_grad_()
    scales = layer.scales.float().clone().requires_grad_()
    bias = layer.bias.float().clone().requires_grad_()
    x = torch.randn(3, 12, requires_grad=True)
    from rvqllm.kernels.trellis_op import trellis_linear

    y = trellis_linear(x, layer.codes, table, scales, bias, 8, 2, 5)
    g = torch.randn_like(y)
    y.backward(g)
    grads = [t.grad.clone() for t in (x, table, scales, bias)]
    for t in (x, table, scales, bias):
        t.grad = None
    idx = layer.table_indices()
    dense = x @ (table[idx] * scales[:, None]).T + bias
    dense.backward(g)
    for got, t in zip(grads, (x, table, scales, bias), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.unit
@pytest.mark.parametrize(("changes", "needle"), [
    ({"coder": "lattice"}, "coder='lattice' is unknown"),
    ({"coder": "trellis", "rotate": False}, "set rotate: true"),
    ({"coder": "trellis", "rotate": True, "trellis_state_bits": 13}, "multiple of trellis_step_bits"),
    ({"coder": "trellis", "rotate": True, "trellis_lut_bits": 9}, "trellis_lut_bits=9"),
    ({"coder": "trellis", "rotate": True, "trellis_table_iters": -1}, "trellis_table_iters=-1"),
    ({"coder": "trellis", "rotate": True, "distill_code_fraction": 0.01}, "distill_code_fraction: 0"),
    ({"coder": "trellis", "rotate": True, "shared_codebook": "gaussian-65536", "vector_dim": 8, "stages": 1,
      "bits": 16}, "drop shared_codebook"),
])
def test_config_says_what_is_wrong_with_a_trellis_recipe(changes, needle):
    with pytest.raises(RVQError, match=needle):
        rvqllm.RVQConfig(**changes)


# ------------------------------------------------------------------------------------------ whole model
@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """A tiny Llama coded by the trellis with one epoch of distillation, saved: ``(model, folder, logits)``."""
    model = tiny_llama()
    before = _logits(model)
    rvqllm.quantize(model, CFG.replace(distill_epochs=1, distill_lr=1e-3), CALIB)
    after = _logits(model)
    assert (after - before).norm() / before.norm() < 0.5
    return model, rvqllm.save(model, tmp_path_factory.mktemp("trellis") / "ckpt"), after


@pytest.mark.integration
def test_quantize_save_load_gives_identical_logits_in_format_2(coded):
    model, folder, logits = coded
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(isinstance(m, TrellisLinear) for m in layers)
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert q["format_version"] == 2 and all(s["trellis_state_bits"] == 8 for s in q["layers"].values())
    assert q["rvq_config"]["coder"] == "trellis"
    loaded = rvqllm.load(folder)
    assert torch.equal(_logits(loaded), logits)
    assert all(isinstance(m, TrellisLinear) for m in loaded.modules() if isinstance(m, QuantizedLinear))


@pytest.mark.integration
@pytest.mark.parametrize(("L", "k", "iters"), [(9, 3, 16), (8, 4, 4), (8, 2, 0)])
def test_three_and_four_bit_walks_start_from_the_trained_table_and_round_trip(L, k, iters, tmp_path):
    model = tiny_llama()
    cfg = CFG.replace(trellis_state_bits=L, trellis_step_bits=k, trellis_table_iters=iters)
    rvqllm.quantize(model, cfg, CALIB)
    start = trellis.trained_lut(L, k, 5, iters).half()
    layers = [m for m in model.modules() if isinstance(m, TrellisLinear)]
    assert len(layers) == 14 and all(torch.equal(m.codebooks.reshape(-1), start) for m in layers)  # no tuning
    assert cfg.code_bits_per_weight == k
    logits = _logits(model)
    loaded = rvqllm.load(rvqllm.save(model, tmp_path / "ckpt"))
    spec = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["layers"]
    assert all(s["trellis_step_bits"] == k and s["trellis_state_bits"] == L for s in spec.values())
    assert torch.equal(_logits(loaded), logits)


@pytest.mark.integration
def test_distillation_tunes_each_layers_table():
    model = tiny_llama()
    rvqllm.quantize(model, CFG.replace(distill_epochs=1, distill_lr=1e-2), CALIB)
    start = trellis.trained_lut(8, 2, 5, CFG.trellis_table_iters).half()
    tables = [m.codebooks.reshape(-1) for m in model.modules() if isinstance(m, TrellisLinear)]
    moved = [not torch.equal(t, start) for t in tables]
    assert all(moved)
    assert not torch.equal(tables[0], tables[1])  # per layer, not shared


@pytest.mark.integration
def test_transformers_from_pretrained_reads_a_trellis_checkpoint(coded, tmp_path):
    from transformers import AutoModelForCausalLM

    _, folder, logits = coded
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(isinstance(m, TrellisLinear) for m in model.modules()) == 14
    torch.testing.assert_close(_logits(model), logits, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "hf")
    ours = json.loads((folder / "config.json").read_text())["quantization_config"]
    theirs = json.loads((tmp_path / "hf/config.json").read_text())["quantization_config"]
    assert theirs == ours


@pytest.mark.integration
def test_rvq_checkpoints_stay_format_1(tmp_path):
    model = tiny_llama()
    rvqllm.quantize(model, rvqllm.RVQConfig(vector_dim=8, stages=1, bits=4, kmeans_iters=2, calib_batch_size=4),
                    CALIB)
    folder = rvqllm.save(model, tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format_version"] == 1


def _edit_config(folder, edit) -> None:
    """Change config.json's quantization_config and re-seal the checksums, as a tool would that writes a
    (wrong) checkpoint with valid checksums: the layer checks, not the checksums, must catch it."""
    from rvqllm.checkpoint import write_index

    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))
    write_index(folder, config)


@pytest.mark.integration
@pytest.mark.parametrize(("edit", "needle"), [
    (lambda q: q.update(format_version=1), "format version 1 does not match its layers"),
    (lambda q: q.update(format_version=3), "reads versions"),
    (lambda q: next(iter(q["layers"].values())).update(trellis_state_bits=7), "not a trellis code"),
])
def test_a_wrong_trellis_config_is_refused_in_one_line(coded, tmp_path, edit, needle):
    import shutil

    _, folder, _ = coded
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    _edit_config(copy, edit)
    with pytest.raises(RVQError, match=needle) as info:
        rvqllm.load(copy)
    assert "\n" not in str(info.value)


class _Stop(Exception):
    pass


@pytest.mark.integration
def test_resumed_trellis_run_is_bit_identical(tmp_path):
    whole = tiny_llama()
    rvqllm.quantize(whole, CFG, CALIB)

    def stop_in_block_1(name, done, total):
        if name.startswith("model.layers.1."):
            raise _Stop

    run = tmp_path / "run"
    with pytest.raises(_Stop):
        rvqllm.quantize(tiny_llama(), CFG, CALIB, stop_in_block_1, run_dir=run)
    resumed = tiny_llama()
    report = rvqllm.quantize(resumed, CFG, CALIB, run_dir=run, resume=True)
    assert sum(1 for r in report.layers.values() if r.get("resumed")) == 7
    assert torch.equal(_logits(resumed), _logits(whole))


@pytest.mark.unit
def test_size_counts_the_packed_walks():
    from rvqllm.size import layer_bits

    layer, _ = _layer(out=24, inp=20)
    parts = layer_bits(layer.spec())
    assert parts["codes"] == 20 * 8 * trellis.walk_bytes(24, 8, 2) == layer.codes.numel() * 8
    assert parts["codebooks"] == 32 * 16 and parts["scales"] == 24 * 16 and parts["signs"] == 20 * 8


class _OneAtATime:
    """A stand-in for ThreadPoolExecutor that codes the layers one after the other, in order."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, fn, items):
        return [fn(item) for item in items]


@pytest.mark.integration
def test_layers_coded_side_by_side_give_the_same_bytes_as_one_at_a_time(monkeypatch):
    import rvqllm.pipeline as pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        side_by_side = tiny_llama()
        rvqllm.quantize(side_by_side, CFG, CALIB)
        monkeypatch.setattr(pipeline, "ThreadPoolExecutor", _OneAtATime)
        in_order = tiny_llama()
        rvqllm.quantize(in_order, CFG, CALIB)
    finally:
        torch.set_num_threads(threads)
    a = dict(side_by_side.named_buffers())
    b = dict(in_order.named_buffers())
    assert a.keys() == b.keys() and any(k.endswith(".codes") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
