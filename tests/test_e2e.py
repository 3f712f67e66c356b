"""The real reference model (SmolLM2-135M-Instruct) through real transformers: slow, run in CI.

Quick protocol variant: ppl on the first 8 windows x 512 tokens of each test text (4,088 predicted
tokens each), calibration 16 sequences x 256 tokens from the calibration splits.
"""

import math

import pytest
import torch

import rvqllm
from rvqllm.data import load_text
from rvqllm.eval import evaluate
from rvqllm.models import load_model
from tests.conftest import quantize_reference

pytestmark = pytest.mark.e2e

WINDOWS = 8
TEXTS = ("kjv", "shakespeare")


@pytest.fixture(scope="module")
def texts(reference):
    return {name: load_text(name, "test") for name in TEXTS}


@pytest.fixture(scope="module")
def baseline_ppl(texts):
    model, tok = load_model("reference")
    return {k: r.ppl for k, r in evaluate(model, tok, texts, windows=WINDOWS).items()}


def test_4bit_close_to_baseline(texts, baseline_ppl, tmp_path):
    model, tok = quantize_reference("4bit")
    out = rvqllm.save(model, tmp_path / "q4", tok)
    loaded = rvqllm.load(out)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    ppl = {k: r.ppl for k, r in evaluate(loaded, tok, texts, windows=WINDOWS).items()}
    # A regression bound, not the goal: the issue asks for "within a few percent"; the 4-bit preset
    # measures x1.13 (KJV) / x1.06 (Shakespeare) on ppl-512x64 (docs/RESULTS.md), and the first
    # 8 windows are harder on it (an earlier, greedy-coded run measured x1.26 / x1.09 there). Closing
    # that gap is the quality work still open (block fine-tuning).
    for name in TEXTS:
        assert ppl[name] < baseline_ppl[name] * 1.35, (name, ppl[name], baseline_ppl[name])


def test_2bit_finite_and_far_better_than_chance(texts, baseline_ppl, reference_2bit):
    model, tok = reference_2bit
    ppl = {k: r.ppl for k, r in evaluate(model, tok, texts, windows=WINDOWS).items()}
    vocab = model.config.vocab_size
    for name in TEXTS:
        assert math.isfinite(ppl[name])
        # an untrained model scores ~vocab size (49,152); the 2-bit model must be far from that
        assert ppl[name] < vocab / 50, (name, ppl[name])
