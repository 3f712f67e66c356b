"""Text sources: reference texts, local txt/jsonl/parquet files and data folders (through `datasets`), with the
same token options (sequences, length, seed) for calibration and evaluation."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rvqllm.data import calibration_tokens, load_text, source_label, token_batches
from rvqllm.errors import RVQError

pytestmark = pytest.mark.unit

LINES = [f"line {i} of the sample text, with a few words." for i in range(300)]


class CharTokenizer:
    """One token per character (enough to test windowing without a real vocabulary)."""

    bos_token_id = None
    name_or_path = "chars"

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return {"input_ids": [ord(c) % 256 for c in text]}


def _write_all(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(LINES))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(LINES)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in LINES))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": LINES}), tmp_path / "a.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(pa.table({"text": LINES[:150]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"text": LINES[150:]}), folder / "part-1.parquet")
    return folder


def test_every_local_format_gives_the_same_text(tmp_path):
    folder = _write_all(tmp_path)
    want = "\n\n".join(LINES)
    assert load_text(str(tmp_path / "a.txt")) == want
    assert load_text(str(tmp_path / "a.jsonl")) == want
    assert load_text(str(tmp_path / "b.jsonl"), text_column="body") == want
    assert load_text(str(tmp_path / "a.parquet")) == want
    assert load_text(str(folder)) == want
    assert source_label(str(tmp_path / "a.parquet")) == "a" and source_label("reference:kjv") == "kjv"
    assert source_label("wikitext:wikitext-2-raw-v1:test") == "wikitext-wikitext-2-raw-v1"


def test_errors_name_the_problem(tmp_path):
    _write_all(tmp_path)
    with pytest.raises(RVQError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(RVQError, match=r"a.jsonl:1 is not a JSON object with a 'body' field"):
        load_text(str(tmp_path / "a.jsonl"), text_column="body")
    with pytest.raises(RVQError, match=r"has no 'body' column \(columns: \['text'\]\)"):
        load_text(str(tmp_path / "a.parquet"), text_column="body")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RVQError, match="folder without"):
        load_text(str(tmp_path / "empty"))


def test_reference_splits_differ(reference):
    assert load_text("kjv", "test")[:200] != load_text("kjv", "calib")[:200]
    assert load_text("reference:shakespeare", "calib") == load_text("shakespeare", "train")


def test_reference_texts_keep_the_held_out_texts_out_of_the_calibration(reference):
    from transformers import AutoTokenizer

    from rvqllm.reference import CALIB_TEXTS, EVAL_TEXTS, HELD_OUT_TEXTS, TEXTS, reference_model_dir

    assert set(HELD_OUT_TEXTS) <= set(EVAL_TEXTS) and not set(HELD_OUT_TEXTS) & set(CALIB_TEXTS)
    assert set(CALIB_TEXTS) | set(EVAL_TEXTS) <= set(TEXTS)
    texts = {(n, s): load_text(n, s) for n in TEXTS for s in ("test", "calib")}
    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    for name in EVAL_TEXTS:  # the whole ppl-512x64 protocol fits in every evaluation text
        assert len(tok(texts[name, "test"][:600_000], add_special_tokens=False)["input_ids"]) > 64 * 512, name
    for name in CALIB_TEXTS:
        assert len(texts[name, "calib"]) > 400_000, name
    # test and calibration splits never share text
    for name in TEXTS:
        test, calib = texts[name, "test"], texts[name, "calib"]
        assert test[:5000] not in calib and calib[:5000] not in test, name
    topics = texts["django", "test"]
    assert "Django" in topics and ".. code-block::" in topics  # reStructuredText sources, markup kept
    fortunes = texts["fortunes", "test"] + texts["fortunes", "calib"]
    assert "\n%\n" not in fortunes  # separators became blank lines
    # the only technical text calibrated on is source code: the computing fortunes are left out, django
    # (documentation) is not calibrated on
    assert fortunes.count("Linux") < 20 and "sys_call_table" not in fortunes
    for name in set(CALIB_TEXTS) - {"code"}:
        assert ".. code-block::" not in texts[name, "calib"]
    code = texts["code", "calib"]  # Python modules: code, comments, docstrings (a little reST in them)
    assert code.count("\ndef ") + code.count("    def ") > 1000 and "import numpy" in code
    assert code.count(".. code-block::") < 5 and "class TestLdaModel" in texts["code", "test"]
    # the encyclopaedic prose: no wiki markup left, no article about computing; news one story per line
    wiki = texts["wiki", "test"] + texts["wiki", "calib"]
    assert "Anarchism is a political philosophy" in wiki and "<ref" not in wiki
    assert "American Standard Code for Information Interchange" not in wiki
    assert wiki.count("[[") < 5 and wiki.count("{{") < 10  # a file caption with [brackets], formulas
    assert len(texts["news", "test"].splitlines()) == 300 and "bushfire" in texts["news", "test"]
    # Usenet posts: bodies only (no headers, quotes, attributions or signatures); the test split holds the
    # whole protocol, so it can join the evaluation texts
    usenet = texts["usenet", "test"] + texts["usenet", "calib"]
    assert "Space Station" in usenet and "atheis" in usenet
    assert not re.search(r"(?m)^(Message-ID|Path|Newsgroups|Subject):|^>|^In article|writes:$|^-- ?$", usenet)
    assert len(tok(texts["usenet", "test"], add_special_tokens=False)["input_ids"]) > 64 * 512


def test_same_options_for_calibration_and_evaluation():
    tok = CharTokenizer()
    text = "\n".join(LINES)
    calib = token_batches([text], tok, 6, 40, seed=3, purpose="calib")
    assert calib.shape == (6, 40) and calib.dtype == torch.long
    assert torch.equal(calib, calibration_tokens([text], tok, 6, 40, seed=3))
    assert torch.equal(calib, token_batches([text], tok, 6, 40, seed=3))  # seeded: same again
    assert not torch.equal(calib, token_batches([text], tok, 6, 40, seed=4))
    ev = token_batches([text], tok, 6, 40, seed=99, purpose="eval")
    assert torch.equal(ev.reshape(-1), torch.tensor(tok(text)["input_ids"][:240]))  # contiguous, seed unused
    with pytest.raises(RVQError, match="too few"):
        token_batches(["short text " * 5], tok, 50, 40)
    with pytest.raises(RVQError, match="one text at a time"):
        token_batches([text, text], tok, 2, 40, purpose="eval")


def test_sampled_tokens_are_the_models_own_text_seeded(reference):
    """Calibration text sampled from the model itself (a tiny random model and the real tokenizer): the
    shape asked for, seeded, a non-special first token within the model's vocabulary, and sampled rather
    than greedy continuations."""
    from transformers import AutoTokenizer

    from rvqllm.data import sampled_tokens
    from tests.conftest import tiny_llama

    tok = AutoTokenizer.from_pretrained(reference[0])
    model = tiny_llama()
    a = sampled_tokens(model, tok, 5, 12, seed=0, batch=2)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert torch.equal(a, sampled_tokens(model, tok, 5, 12, seed=0, batch=2))
    assert not torch.equal(a, sampled_tokens(model, tok, 5, 12, seed=1, batch=2))
    assert not set(a[:, 0].tolist()) & set(tok.all_special_ids)
    assert int(a.max()) < 128  # within the model's vocabulary (the tokenizer's is larger)
    with torch.no_grad():
        greedy = model(a).logits[:, :-1].argmax(-1)
    assert not torch.equal(greedy, a[:, 1:])  # sampled, not greedy
    with pytest.raises(RVQError, match="seq_len >= 2"):
        sampled_tokens(model, tok, 1, 1)


def test_wikitext_becomes_plain_prose():
    from rvqllm.reference import _strip_wikitext

    wiki = ("{{Infobox|name={{lang|x}}}}'''Aardvark''' is a [[mammal]] of [[Africa|African]] soil.<ref>cite</ref>\n"
            "[[File:A.jpg|thumb|An [[aardvark]] at night]]\n== Diet ==\n* It eats [[ant]]s.<!-- hidden -->\n"
            "{| class=wikitable\n| cell\n|}\nSee [https://example.org the site] &amp; more.[[Category:Mammals]]\n\n\n\nEnd.")
    assert _strip_wikitext(wiki) == "Aardvark is a mammal of African soil.\n\nDiet\nIt eats ants.\n\nSee the site & more.\n\nEnd."
