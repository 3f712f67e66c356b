"""Synthetic Llama checkpoints (rvqllm.synthetic): real HF folders, exact tensors, same bytes, small memory;
and the arithmetic of scripts/bench_scale.py on a hand-made sample."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rvqllm import synthetic
from rvqllm.synthetic import (
    SHAPES,
    block_params,
    make_tensor,
    model_params,
    read_record,
    synthetic_kwargs,
    write_synthetic_llama,
)

pytestmark = pytest.mark.integration

SMALL = {"hidden": 64, "intermediate": 160, "heads": 4, "kv_heads": 2, "blocks": 2}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_synthetic_llama(tmp_path_factory.mktemp("syn") / "small", **SMALL)


def _shard_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for name, shard in index["weight_map"].items():
        with safe_open(folder / shard, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def test_real_shapes_match_published_parameter_counts():
    assert SHAPES["tinyllama-1.1b"]["params"] == 1_100_048_384
    assert SHAPES["llama-3-8b"]["params"] == 8_030_261_248
    assert SHAPES["llama-3-70b"]["params"] == 70_553_706_496
    assert block_params(4096, 14336, 32, 8) == 218_112_000
    kw = synthetic_kwargs("llama-3-8b", blocks=2, real_vocab=True)
    assert (kw["blocks"], kw["vocab"], kw["hidden"]) == (2, 128256, 4096)
    assert synthetic_kwargs("tinyllama-1.1b")["vocab"] is None


def test_folder_layout_and_index(small):
    index = json.loads((small / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert {n for n, s in index["weight_map"].items() if s == shards[0]} == {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for b in range(SMALL["blocks"]):
        assert all(s == shards[b + 1] for n, s in index["weight_map"].items() if n.startswith(f"model.layers.{b}."))
    data = sum((small / s).stat().st_size for s in shards)
    assert index["metadata"]["total_size"] < data  # the shards add their headers
    tensors = _shard_tensors(small)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(tensors) == 3 + 9 * SMALL["blocks"]
    assert read_record(small)["blocks"] == SMALL["blocks"] and read_record(small)["vocab"] == 320
    assert not [p for p in small.parent.iterdir() if ".tmp-" in p.name]


def test_loads_with_transformers_and_state_dict_is_the_shards(small):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(small).eval()
    tok = AutoTokenizer.from_pretrained(small)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert model.config.vocab_size == 320 and len(tok) == 259
    state, shards = model.state_dict(), _shard_tensors(small)
    assert set(state) == set(shards)
    for name, t in shards.items():
        assert torch.equal(state[name], t), name
        assert torch.equal(t, make_tensor(name, tuple(t.shape))), name
    w = shards["model.layers.1.mlp.down_proj.weight"].float()
    assert w.shape == (64, 160) and abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(shards["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))

    text = "In the beginning — ὁ λόγος, 日本語, emoji 🙂 and\ttabs"
    enc = tok(text, return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == tok.bos_token_id == 1
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=True) == text
    assert tok.unk_token_id not in enc["input_ids"][0].tolist()
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 320) and torch.isfinite(logits.float()).all()


def test_same_call_same_bytes_any_thread_count(small, tmp_path):
    again = write_synthetic_llama(tmp_path / "again", **SMALL, threads=2)
    names = sorted(p.name for p in small.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for n in names:
        assert (small / n).read_bytes() == (again / n).read_bytes(), n
    other = write_synthetic_llama(tmp_path / "other", **SMALL, seed=1)
    shard = "model-00002-of-00003.safetensors"
    assert (other / shard).read_bytes() != (small / shard).read_bytes()


def test_tied_embeddings_and_refuses_existing_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = write_synthetic_llama(tmp_path / "tied", **{**SMALL, "blocks": 1}, tie_embeddings=True, vocab=384)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == 384
    assert sum(p.numel() for p in model.parameters()) == model_params(**{**SMALL, "blocks": 1}, vocab=384,
                                                                      tie_embeddings=True)
    with pytest.raises(FileExistsError):
        write_synthetic_llama(folder, **SMALL)


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from rvqllm.synthetic import block_params, write_synthetic_llama
    root = sys.argv[1]
    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # warm up: imports, the tokenizer, the thread pool
    write_synthetic_llama(root + "/warm", hidden=64, intermediate=96, heads=4, kv_heads=2, blocks=1)
    before = peak_mib()
    wide = dict(hidden=1024, intermediate=2816, heads=16, kv_heads=4)
    folder = write_synthetic_llama(root + "/wide", **wide, blocks=4, dtype=torch.float32)
    disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(json.dumps({"before": before, "after": peak_mib(), "block_mib": block_params(**wide) * 4 / 2**20,
                      "model_mib": disk / 2**20}))
""")


def test_peak_memory_while_writing_is_about_one_block(tmp_path):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=env, cwd=Path(synthetic.__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    grew = m["after"] - m["before"]
    assert m["model_mib"] > 4 * m["block_mib"] > 150  # four fp32 blocks of 11.2M weights (+ embeddings)
    assert grew < 1.5 * m["block_mib"], m  # measured: ~20 MiB (one piece of 4M weights), a block is 43 MiB


def _bench_scale():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_scale_extrapolation_on_a_hand_made_sample():
    """scripts/bench_scale.py's arithmetic on made-up CLI output (not a measurement)."""
    bench = _bench_scale()
    stages = dict.fromkeys(bench.STAGES, 0.0)
    cli = {"quantize_seconds": 100.0, "peak_rss_mib": 9000.0, "threads": 16, "device": "cuda:0",
           "blocks": [{"block": 0, "seconds": {**stages, "code": 36.5}, "total_seconds": 36.5,
                       "peak_rss_mib": 8000.0, "peak_device_mib": 12000.0},
                      {"block": 1, "seconds": {**stages, "code": 29.5}, "total_seconds": 29.5,
                       "peak_rss_mib": 8100.0, "peak_device_mib": 11000.0}],
           "distill": {"seconds": 20.0, "peak_rss_mib": 8500.0, "peak_device_mib": 30000.0}}
    record = {"shape": "llama-3-8b", "preset": "2bit", "vocab_size": 128256, "wall_seconds": 130.0,
              "machine": {"cores": 16}, "cli": cli}
    sm = bench.summarize(record)
    assert sm["stage_mean"]["code"] == 29.5 and sm["first"]["total"] == 36.5
    assert sm["blocks_full_s"] == pytest.approx(36.5 + 31 * 29.5)
    p_run = 2 * 218_103_808 + 128256 * 4096
    p_full = 32 * 218_103_808 + 128256 * 4096
    assert (sm["params_run"], sm["params_full"]) == (p_run, p_full)
    assert sm["distill_full_s"] == pytest.approx(20.0 * p_full / p_run)
    assert sm["other_s"] == pytest.approx(130.0 - 66.0 - 20.0)
    assert sm["total_full_s"] == pytest.approx(951.0 + 20.0 * p_full / p_run + 44.0)
    assert sm["device_mib"]["full"] == pytest.approx(12000 + 18000 * 16)
    assert sm["host_mib"]["full"] == pytest.approx(8100 + 400 * 16)
    (goal,) = sm["goals"]
    assert not goal["applies"] and "no typical block" in goal["note"]
    assert goal["ratio"] == pytest.approx(sm["total_full_s"] / 3600)
    assert "| decoder blocks |" in bench.format_record({**record, "status": "ok"})
    # three blocks: warm-up, a typical block, the last; the typical one is the per-block figure
    last = {"block": 2, "seconds": {**stages, "calibrate": 9.0, "code": 29.5}, "total_seconds": 38.5,
            "peak_rss_mib": 8000.0, "peak_device_mib": 11000.0}
    three = bench.summarize({**record, "cli": {**cli, "blocks": [*cli["blocks"], last]}})
    assert three["typical"] and three["total_mean"] == 29.5 and three["last"]["total"] == 38.5
    assert three["blocks_full_s"] == pytest.approx(36.5 + 30 * 29.5 + 38.5)
    assert three["goals"][0]["applies"]
    # with the 2-block run beside it, distillation is fitted as a line in the block count: 10 + 10 x blocks
    rec3 = {**record, "cli": {**cli, "blocks": [*cli["blocks"], last], "distill": {**cli["distill"], "seconds": 40.0}}}
    rec2 = {**record, "cli": {**cli, "distill": {**cli["distill"], "seconds": 30.0}}}
    fitted = bench.summarize(rec3, [rec2, rec3])
    assert fitted["distill_fit"]["blocks"] == [2, 3]
    assert fitted["distill_full_s"] == pytest.approx(10.0 + 10.0 * 32)
    assert bench.summarize(rec3, [rec3])["distill_fit"] is None
    # bpw_budget's sensitivity pass (before the blocks) visits every block: it scales with their number
    with_mixed = {**record, "cli": {**cli, "mixed": {"seconds": 4.0, "shapes": {}}}}
    mixed = bench.summarize(with_mixed)
    assert mixed["mixed_full_s"] == pytest.approx(4.0 * 32 / 2) and mixed["other_s"] == pytest.approx(40.0)
    assert mixed["total_full_s"] == pytest.approx(sm["total_full_s"] - 4.0 + 64.0)
    assert "| sensitivity pass (bpw_budget) |" in bench.format_record({**with_mixed, "status": "ok"})
    del cli["blocks"][1]["seconds"]["tune"]
    with pytest.raises(bench.SpecError, match=r"blocks\[1\]\.seconds\.tune"):
        bench.summarize(record)
