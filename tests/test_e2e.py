"""The real reference model (SmolLM2-135M-Instruct) through real transformers: slow, run in CI.

Quick protocol variant: ppl on the first 8 windows x 512 tokens of each test text (4,088 predicted
tokens each: KJV-NT, Shakespeare and the out-of-domain Django docs), calibration 16 sequences x 256 tokens
from the default calibration texts (KJV-OT, Shakespeare, fortunes).
"""

import math

import pytest
import torch

import rvqllm
from rvqllm.data import load_text
from rvqllm.eval import evaluate
from rvqllm.models import load_model
from rvqllm.reference import EVAL_TEXTS
from tests.conftest import quantize_reference

pytestmark = pytest.mark.e2e

WINDOWS = 8
TEXTS = EVAL_TEXTS


@pytest.fixture(scope="module")
def texts(reference):
    return {name: load_text(name, "test") for name in TEXTS}


@pytest.fixture(scope="module")
def baseline_ppl(texts):
    model, tok = load_model("reference")
    return {k: r.ppl for k, r in evaluate(model, tok, texts, windows=WINDOWS).items()}


def test_4bit_close_to_baseline(texts, baseline_ppl, tmp_path):
    # CI time: half the 2-bit test's calibration, and greedy codes (beam 1; the preset's beam 8 is
    # covered by unit tests): 425 CPU s at one thread, where the session-6 preset (no distillation) took
    # 616 with beam 8 and 387 greedy
    model, tok = quantize_reference("4bit", sequences=8, beam_width=1)
    out = rvqllm.save(model, tmp_path / "q4", tok)
    loaded = rvqllm.load(out)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    ppl = {k: r.ppl for k, r in evaluate(loaded, tok, texts, windows=WINDOWS).items()}
    # A regression bound, not the goal: the 4-bit preset measures x1.06 (KJV) / x1.01 (Shakespeare) / x1.10
    # (django, out of domain) on ppl-512x64 with its full calibration (docs/RESULTS.md). On this test's
    # calibration (8 x 256 tokens of kjv+shakespeare+fortunes) and first 8 windows, greedy as here, it
    # measured 12.54 / 46.65 / 18.96 against 10.66 / 44.48 / 16.01 (x1.18 / x1.05 / x1.18; the
    # distillation, 8 steps on 8 sequences, did not lower the KL and was reverted: `bench_quality.py
    # --rows preset:FILE --calib-seqs 8 --calib-len 256 --windows 8`, FILE the preset plus
    # `beam_width: 1`); the session-6 preset with beam 8 measured x1.15 / x1.05 / x1.19, greedy without
    # fine-tuning x1.26 / x1.09 (KJV / Shakespeare).
    # The bounds sit ~10 % above those ratios (they were 1.35 on every text until session 7).
    bounds = {"kjv": 1.3, "shakespeare": 1.15, "django": 1.3}
    for name in TEXTS:
        assert ppl[name] < baseline_ppl[name] * bounds[name], (name, ppl[name], baseline_ppl[name])


def test_2bit_preset_quality_regression_bound(texts, baseline_ppl, reference_2bit):
    model, tok = reference_2bit
    ppl = {k: r.ppl for k, r in evaluate(model, tok, texts, windows=WINDOWS).items()}
    # The 2-bit preset on this quick protocol (16x256 calibration from kjv+shakespeare+fortunes, 8 windows)
    # measured 29.57 / 73.80 / 67.88 against the baseline's 10.66 / 44.48 / 16.01 (x2.77 / x1.66 / x4.24;
    # the first 8 KJV windows are hard for it). The bounds sit 10-15% above. They catch the preset without
    # its distillation (x3.02 / x1.72 with block fine-tuning instead), without error feedback (x4.98 /
    # x2.38) and the session-1 preset (x3.86 / x2.13); the django bound, an out-of-domain collapse such as
    # session 5's narrower calibration gave 2bit-fast (x10.5 on django, ppl-512x16; this preset under that
    # calibration was not measured on this protocol). docs/RESULTS.md has the ablation.
    bounds = {"kjv": 3.1, "shakespeare": 1.85, "django": 4.9}
    for name in TEXTS:
        assert math.isfinite(ppl[name])
        assert ppl[name] < baseline_ppl[name] * bounds[name], (name, ppl[name], baseline_ppl[name])
