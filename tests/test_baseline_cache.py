"""The baseline-perplexity cache (rvqllm/eval/baseline_cache.py): reused only for the same model files,
tokenizer, texts, protocol and versions; ``--no-cache`` measures again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import rvqllm.models
from rvqllm.cli import main
from rvqllm.eval import baseline_cache
from tests.test_reliability import make_model_folder

pytestmark = pytest.mark.integration


def _text(path: Path) -> Path:
    words = " ".join(f"w{(i * 7) % 120}" for i in range(3000))
    path.write_text(words)
    return path


def _eval(capfd, model: Path, text: Path, *extra) -> dict:
    rc = main(["eval", "--baseline", str(model), "--text", str(text), "--context", "32", "--windows", "4",
               "--json", *extra])
    out, err = capfd.readouterr()
    assert rc == 0, err
    return json.loads(out)["rows"][0]


def test_baseline_is_measured_once_then_reused_until_something_changes(tmp_path, capfd, monkeypatch):
    model, text = make_model_folder(tmp_path / "model"), _text(tmp_path / "t.txt")
    loads = []
    real = rvqllm.models.load_model
    monkeypatch.setattr(rvqllm.models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    first = _eval(capfd, model, text)
    assert len(loads) == 1 and "cached" not in first
    again = _eval(capfd, model, text)
    assert len(loads) == 1, "the second evaluation of the same baseline is not measured again"
    assert again["ppl"] == first["ppl"] and again["tokens"] == first["tokens"] and "cached" in again
    _eval(capfd, model, text, "--no-cache")
    assert len(loads) == 2
    _eval(capfd, model, text, "--windows", "3")  # another protocol
    assert len(loads) == 3
    text.write_text(text.read_text() + " w1")  # another text
    _eval(capfd, model, text)
    assert len(loads) == 4
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the model changed
    _eval(capfd, model, text)
    assert len(loads) == 5


@pytest.mark.unit
def test_hub_ids_and_missing_models_are_not_cached(tmp_path):
    texts = {"t": "w1 w2"}
    assert baseline_cache.key("org/model", None, None, texts, 32, 4) is None
    assert baseline_cache.key(str(tmp_path / "nope"), None, None, texts, 32, 4) is None
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    k = baseline_cache.key(str(tmp_path / "m"), None, None, texts, 32, 4)
    assert k and k != baseline_cache.key(str(tmp_path / "m"), None, str(tmp_path / "m"), texts, 32, 4)
    assert baseline_cache.get(k) is None
    baseline_cache.put(k, {"t": 2.5}, {"t": 31})
    assert baseline_cache.get(k)["ppl"] == {"t": 2.5}
