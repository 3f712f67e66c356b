"""scripts/redistill.py: a run stopped before its distillation and branched into a variant gives the very
checkpoint a fresh run of the variant writes; a variant that would need re-coding is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rvqllm.synthetic import write_synthetic_llama
from rvqllm.validate import read_checksummed

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "redistill.py")
BASE = {"vector_dim": 4, "stages": 1, "bits": 4, "beam_width": 1, "kmeans_iters": 2, "kmeans_points": 8,
        "calib_sequences": 8, "calib_seq_len": 32, "calib_batch_size": 2, "distill_epochs": 1,
        "distill_chunk_tokens": 16, "distill_lr": 1e-3}
COMMON = ["--", "--calib", "kjv", "--device", "cpu", "--quiet"]


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=600)


def _config(path: Path, **fields) -> str:
    path.write_text(yaml.safe_dump({**BASE, **fields}))
    return str(path)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(read_checksummed(f)[0])
    return out


@pytest.mark.integration
def test_a_branched_run_equals_a_fresh_run_of_the_variant(tmp_path):
    model = str(write_synthetic_llama(tmp_path / "model", hidden=64, intermediate=128, heads=4, kv_heads=2, blocks=2))
    base, variant = _config(tmp_path / "base.yaml"), _config(tmp_path / "v.yaml", distill_lr=3e-3, distill_lr_tail=0.5)
    res = _run(SCRIPT, "prepare", "--model", model, "--config", base, "--out", str(tmp_path / "base"), *COMMON)
    partial = tmp_path / "base.partial"
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((partial / "progress.json").read_text()) == {"blocks_done": 2, "distilled": False}
    assert (partial / "teacher-0002").is_dir() and not (tmp_path / "base").exists()

    res = _run(SCRIPT, "branch", str(partial), "--model", model, "--config", variant, "--out", str(tmp_path / "b"),
               *COMMON, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "changed: distill_lr, distill_lr_tail" in res.stderr
    branched = json.loads(res.stdout)
    res = _run("-m", "rvqllm.cli", "quantize", model, "--config", variant, "--out", str(tmp_path / "fresh"),
               *COMMON[1:], "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    fresh = json.loads(res.stdout)
    assert branched["distill"]["kl_before"] == fresh["distill"]["kl_before"]
    assert branched["distill"]["kl_after"] == fresh["distill"]["kl_after"] < fresh["distill"]["kl_before"]
    a, b = _tensors(tmp_path / "b"), _tensors(tmp_path / "fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert partial.is_dir()  # the prepared run stays for the next branch

    coded = _config(tmp_path / "c.yaml", beam_width=2)  # changes the codes: refused, nothing written
    res = _run(SCRIPT, "branch", str(partial), "--model", model, "--config", coded, "--out", str(tmp_path / "c"), *COMMON)
    assert res.returncode != 0 and "differs from the prepared run in ['beam_width']" in res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "c.partial").exists() and not (tmp_path / "c").exists()

    done = tmp_path / "done.partial"  # a run folder already distilled (or not yet coded) is not a base to branch
    shutil.copytree(partial, done)
    (done / "progress.json").write_text(json.dumps({"blocks_done": 2, "distilled": True}))
    res = _run(SCRIPT, "branch", str(done), "--model", model, "--config", variant, "--out", str(tmp_path / "d"), *COMMON)
    assert res.returncode != 0 and "is not stopped before its distillation" in res.stderr
    assert not (tmp_path / "d.partial").exists()
