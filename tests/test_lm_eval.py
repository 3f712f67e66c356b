"""lm-eval through its Python API: the shipped offline task, on the compressed reference model and its baseline."""

from __future__ import annotations

import json

import pytest
import torch

from rvqllm.errors import RVQError
from rvqllm.eval.lm_eval_bridge import NEXT_VERSE, TASKS_DIR, build_next_verse_docs, run_tasks, shipped_tasks


@pytest.mark.integration
def test_shipped_task_data_is_built_from_the_reference_text(reference):
    _, texts = reference
    shipped = [json.loads(line) for line in (TASKS_DIR / NEXT_VERSE / f"{NEXT_VERSE}.jsonl").read_text().splitlines()]
    assert shipped == build_next_verse_docs(texts["kjv"]["test"].read_text())
    assert len(shipped) == 64 and NEXT_VERSE in shipped_tasks()


@pytest.mark.unit
def test_next_verse_docs_are_well_formed():
    lines = [f"verse {i} " + " ".join(f"w{i}_{k}" for k in range(14)) for i in range(800)]
    docs = build_next_verse_docs("\n".join(lines), n_docs=16)
    assert docs == build_next_verse_docs("\n".join(lines), n_docs=16)  # deterministic
    for d in docs:
        assert len(d["choices"]) == len(set(d["choices"])) == 4
        i = int(d["context"].split("\n")[1].split()[1])  # the verse the head was cut from
        assert d["choices"][d["label"]].split()[-1] == f"w{i}_13"  # the answer is that verse's tail
        assert d["context"].split("\n")[0].startswith(f"verse {i - 1} ")
    assert {d["label"] for d in docs} != {docs[0]["label"]}  # the answer position varies
    with pytest.raises(RVQError, match="too few"):
        build_next_verse_docs("a b c\n" * 100)


@pytest.mark.integration
def test_unknown_task_is_named():
    model = torch.nn.Linear(1, 1)
    with pytest.raises(RVQError, match=r"does not know task\(s\) \['no_such_task_xyz'\]"):
        run_tasks(model, None, ["no_such_task_xyz"])


@pytest.mark.e2e
def test_local_task_on_compressed_reference_and_baseline(reference_2bit):
    from rvqllm.models import load_model

    baseline, tok = load_model("reference")
    base = run_tasks(baseline, tok, [NEXT_VERSE], limit=8)[NEXT_VERSE]
    model, _ = reference_2bit
    quant = run_tasks(model, tok, [NEXT_VERSE], limit=8)[NEXT_VERSE]
    for r in (base, quant):
        assert r["sample_len"] == 8 and set(r) >= {"acc", "acc_norm"}
        assert all(v in {k / 8 for k in range(9)} for k, v in r.items() if k != "sample_len")
    assert base["acc"] >= 0.5  # the fp16 model is well above chance (0.25) on this task
