"""Reports: markdown + JSON + PNG plot + model card, through `rvqllm report` on tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import rvqllm
from rvqllm.cli import main
from rvqllm.eval.report import format_table, model_card, plot, write_json

ROWS = [
    {"model": "base (fp16 baseline)", "bpw": 16.0, "bytes": 2**21, "ppl": {"a": 10.0, "b": 20.0}, "baseline": True,
     "tasks": {"t": {"acc": 0.5, "sample_len": 8.0}}},
    {"model": "out/q2", "bpw": 2.1, "bytes": 2**19, "ppl": {"a": 15.0, "b": 30.0}, "tasks": {"t": {"acc": 0.25}}},
    {"model": "out/q4", "bpw": 4.1, "bytes": 2**20, "ppl": {"a": 11.0, "b": None}},
]


@pytest.mark.unit
def test_table_has_ratios_and_task_columns():
    table = format_table(ROWS, ["a", "b"]).splitlines()
    assert table[0] == ("| model | bpw (block linears) | size on disk | ppl a | × base a | ppl b | × base b | t acc |")
    assert table[2] == "| base (fp16 baseline) | 16.000 | 2.0 MiB | 10.000 | 1.000 (ln 0.000) | 20.000 | 1.000 (ln 0.000) | 0.500 |"
    assert table[3] == "| out/q2 | 2.100 | 0.5 MiB | 15.000 | 1.500 (ln 0.405) | 30.000 | 1.500 (ln 0.405) | 0.250 |"
    assert table[4] == "| out/q4 | 4.100 | 1.0 MiB | 11.000 | 1.100 (ln 0.095) | — | — | — |"


@pytest.mark.unit
def test_table_without_a_baseline_has_no_ratios():
    """``rvqllm eval CKPT`` without ``--baseline``: no row to compare with, so no "x base" columns (they
    once compared the first checkpoint with itself, 1.000 everywhere)."""
    table = format_table(ROWS[1:], ["a", "b"]).splitlines()
    assert table[0] == "| model | bpw (block linears) | size on disk | ppl a | ppl b | t acc |"
    assert table[2] == "| out/q2 | 2.100 | 0.5 MiB | 15.000 | 30.000 | 0.250 |"
    assert table[3] == "| out/q4 | 4.100 | 1.0 MiB | 11.000 | — | — |"


@pytest.mark.unit
def test_json_and_png(tmp_path):
    data = json.loads(write_json(ROWS, tmp_path / "r.json", protocol="ppl-16x2").read_text())
    assert data["rows"] == ROWS and data["protocol"] == "ppl-16x2"
    png = plot(ROWS, ["a", "b"], tmp_path / "r.png")
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 10_000


def _tiny_checkpoints(tmp_path, reference):
    """A tiny random Llama with the reference tokenizer (fp16 baseline folder) and two rvq checkpoints."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir, texts = reference
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64, tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    calib = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(1))
    folders = []
    for name, stages in (("q1", 1), ("q2", 2)):
        m = LlamaForCausalLM.from_pretrained(tmp_path / "base")
        cfg_q = rvqllm.RVQConfig(vector_dim=8, stages=stages, bits=6, kmeans_iters=2, error_feedback=False,
                                 calib_batch_size=4)
        rvqllm.quantize(m, cfg_q, calib)
        folders.append(rvqllm.save(m, tmp_path / name, tok))
    text = tmp_path / "t.txt"
    text.write_text(texts["kjv"]["test"].read_text()[:20_000])
    return tmp_path / "base", folders, text


@pytest.mark.integration
def test_cli_report_writes_table_json_png_and_cards(tmp_path, reference, capsys):
    base, folders, text = _tiny_checkpoints(tmp_path, reference)
    out = tmp_path / "rep"
    rc = main(["report", *map(str, folders), "--baseline", str(base), "--text", str(text), "--context", "32",
               "--windows", "2", "--out-dir", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    rows = data["rows"]
    assert [r["model"] for r in rows] == [f"{base} (fp16 baseline)", *map(str, folders)]
    assert rows[0]["bpw"] == 16.0 and rows[1]["bpw"] < rows[2]["bpw"] < 16
    for r in rows:  # the figures are the ones `rvqllm eval` measures
        assert r["tokens"]["t"] == 2 * 31 and r["ppl"]["t"] > 1
    assert "| " + str(folders[0]) + " |" in (out / "report.md").read_text()
    assert "| " + str(folders[0]) + " |" in printed
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    card = (folders[1] / "README.md").read_text()
    assert f"{rows[2]['bpw']:.3f} bpw" in card and "stages`: 2" in card
    assert f"{rows[2]['ppl']['t']:.3f}" in card and f"{rows[0]['ppl']['t']:.3f}" in card
    # the model card is also what model_card() makes from the same row
    assert card == model_card(folders[1], rows[2], rows[0], data["protocol"], data["command"])


@pytest.mark.integration
def test_cli_report_json_mode_prints_one_object(tmp_path, reference, capsys):
    base, folders, text = _tiny_checkpoints(tmp_path, reference)
    rc = main(["report", str(folders[0]), "--baseline", str(base), "--text", str(text), "--context", "32",
               "--windows", "2", "--out-dir", str(tmp_path / "rep"), "--json", "--no-card"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["rows"]) == 2 and result["model_cards"] == []
    assert not (folders[0] / "README.md").exists()


@pytest.mark.unit
def test_cli_report_refuses_a_non_checkpoint(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out-dir", str(tmp_path / "r")]) == 2
    assert "is not an rvqllm checkpoint folder" in capsys.readouterr().err
