"""The real reference model (SmolLM2-135M-Instruct) through real transformers: slow, run in CI.

Quick protocol variant: ppl on the first 8 windows x 512 tokens of each test text (4,088 predicted
tokens each: KJV-NT, Shakespeare and Wikipedia, the held-out Django docs and the out-of-domain news and
Usenet posts), calibration 16 sequences x 256 tokens from the default calibration texts (KJV-OT,
Shakespeare, fortunes, Python code, Wikipedia).
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


@pytest.fixture(scope="module")
def reference_2bit_ppl(texts, reference_2bit):
    """The ``2bit`` fixture's perplexities, measured once for the tests that bound it and compare with it."""
    model, tok = reference_2bit
    return {k: r.ppl for k, r in evaluate(model, tok, texts, windows=WINDOWS).items()}


def test_4bit_close_to_baseline(texts, baseline_ppl, tmp_path):
    # CI time: half the 2-bit test's calibration, greedy codes (beam 1; the preset's beam 8 is covered by
    # unit tests) and 6 k-means iterations instead of 20 (session 23: coding 130 s instead of 202 on 2 cores,
    # the whole quantization 236 s; the k-means is most of a 4-dim layer's coding)
    model, tok = quantize_reference("4bit", sequences=8, beam_width=1, kmeans_iters=6)
    out = rvqllm.save(model, tmp_path / "q4", tok)
    loaded = rvqllm.load(out)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    ppl = {k: r.ppl for k, r in evaluate(loaded, tok, texts, windows=WINDOWS).items()}
    # A regression bound, not the goal: the 4-bit preset's full-protocol figures are in docs/RESULTS.md. On
    # this test's calibration (8 x 256 tokens of kjv+shakespeare+fortunes+code+wiki) and first 8 windows,
    # greedy and with 6 k-means iterations as here, it measured 12.85 / 47.42 / 18.03 / 28.17 / 38.53 / 43.89
    # (x1.21 / x1.07 / x1.13 / x1.15 / x1.17 / x1.11; session 23, the same calls in a throwaway script); with
    # the preset's 20 iterations 12.64 / 47.36 / 18.17 / 27.79 / 38.26 / 44.29 against 10.66 / 44.48 /
    # 16.01 / 24.60 / 33.06 / 39.39 (x1.19 / x1.07 / x1.14 / x1.13 / x1.16 / x1.12 for KJV / Shakespeare /
    # django / wiki / news / usenet; session 16, one distillation pass, the same calls in a throwaway
    # script); session 15's preset (two passes) x1.22 / x1.05 / x1.13 / x1.15 / x1.16 / x1.11; session 14's
    # rate of 1e-3: x1.21 / x1.06 / x1.13 / x1.15 / x1.16 / x1.12. Session 12's
    # four-text calibration: x1.21 / x1.07 / x1.13 / x1.17 / x1.17; session 7's three texts: x1.18 / x1.05 /
    # x1.18; the session-6 preset with beam 8 x1.15 / x1.05 / x1.19, greedy without fine-tuning x1.26 /
    # x1.09 (KJV / Shakespeare). The bounds sit 7-11 % above session 23's figures (they were 1.35 on every
    # text until session 7).
    bounds = {"kjv": 1.3, "shakespeare": 1.15, "django": 1.25, "wiki": 1.25, "news": 1.25, "usenet": 1.23}
    for name in TEXTS:
        assert ppl[name] < baseline_ppl[name] * bounds[name], (name, ppl[name], baseline_ppl[name])


def test_2bit_preset_quality_regression_bound(baseline_ppl, reference_2bit_ppl):
    ppl = reference_2bit_ppl
    # The 2-bit preset on this quick protocol (16x256 calibration from kjv+shakespeare+fortunes+code+wiki,
    # 8 windows; two distillation epochs over the 16 sequences, as the preset had until session 16: its
    # one pass, meant for 256 sequences, measured x3.31 / x1.96 / x2.97 / x3.03 / x3.35 / x2.44 here in
    # session 16, worse on all but KJV with half the steps; 6 k-means iterations since session 23;
    # conftest.reference_2bit) measured 32.22 / 73.98 / 41.36 / 67.83 / 101.39 / 88.74 (x3.02 / x1.66 /
    # x2.58 / x2.76 / x3.07 / x2.25; session 23, the same calls in a throwaway script); with 20 iterations 35.20 /
    # 80.32 / 43.81 / 65.66 / 99.11 / 88.67 against the baseline's 10.66 /
    # 44.48 / 16.01 / 24.60 / 33.06 / 39.39 (x3.30 / x1.81 / x2.74 / x2.67 / x3.00 / x2.25 for KJV /
    # Shakespeare / django / wiki / news / usenet; session 14, the same calls in a throwaway script; the
    # first 8 KJV windows are hard for it, and its 3-4 KJV sequences of 16 are few). The bounds sit 9-10 %
    # above session 23's figures. Session 12's four-text calibration measured x3.10 / x1.74 / x2.49 / x3.37 / x3.44 (the KJV
    # and django bounds were 3.4 and 2.8 then, wiki and news 3.7 and 3.8); before code joined the
    # calibration x2.77 / x1.66 / x4.24 (KJV / Shakespeare / django), and under that calibration the
    # preset without its distillation gave x3.02 / x1.72, without error feedback x4.98 / x2.38, the
    # session-1 preset x3.86 / x2.13 (docs/RESULTS.md has the ablation).
    bounds = {"kjv": 3.3, "shakespeare": 1.83, "django": 2.85, "wiki": 3.0, "news": 3.35, "usenet": 2.48}
    for name in TEXTS:
        assert math.isfinite(ppl[name])
        assert ppl[name] < baseline_ppl[name] * bounds[name], (name, ppl[name], baseline_ppl[name])


def test_trellis_coder_quality_regression_bound(texts, baseline_ppl, reference_2bit_ppl):
    """``coder: trellis`` on the real model, through the whole product path (packed walks, the CPU
    trellis kernels, save and load), against the ``2bit`` preset on the same quick protocol."""
    import tempfile

    # configs/experiments/2bit-trellis.yaml with the quick protocol's 16x256 calibration and its one
    # distillation epoch (the 2bit fixture has two), 10-bit states instead of 12 for CI time (the Viterbi costs
    # 2**L): quantized in 169 s on 2 cores (session 23; two epochs took 215).
    model, tok = quantize_reference("configs/experiments/2bit-trellis.yaml", trellis_state_bits=10)
    with tempfile.TemporaryDirectory() as tmp:
        folder = rvqllm.save(model, f"{tmp}/ckpt", tok)
        loaded = rvqllm.load(folder)
    ppl = {k: r.ppl for k, r in evaluate(loaded, tok, texts, windows=WINDOWS).items()}
    rvq = reference_2bit_ppl
    # Session 23 (one distillation epoch, the same calls in a throwaway script) measured 27.27 / 68.94 / 33.29 /
    # 58.14 / 84.36 / 80.56 (x2.56 / x1.55 / x2.08 / x2.36 / x2.55 / x2.05 of the baseline's 10.66 / 44.48 / 16.01 /
    # 24.60 / 33.06 / 39.39 for KJV / Shakespeare / django / wiki / news / usenet), 0.81 to 0.93 of the 2bit
    # fixture's session-23 figures (32.22 / 73.98 / 41.36 / 67.83 / 101.39 / 88.74; geometric mean 0.86); session
    # 21, with two epochs: 26.04 / 67.00 / 31.91 / 56.54 / 82.64 / 77.37. The bounds sit ~10 % above session 23's
    # ratios; the trellis must beat 2bit on every text (by 2 %) and by 8 % on the geometric mean over the texts.
    bounds = {"kjv": 2.8, "shakespeare": 1.7, "django": 2.3, "wiki": 2.6, "news": 2.8, "usenet": 2.25}
    for name in TEXTS:
        assert math.isfinite(ppl[name])
        assert ppl[name] < baseline_ppl[name] * bounds[name], (name, ppl[name], baseline_ppl[name])
        assert ppl[name] < 0.98 * rvq[name], (name, ppl[name], rvq[name])
    gain = math.exp(sum(math.log(ppl[name] / rvq[name]) for name in TEXTS) / len(TEXTS))
    assert gain < 0.92, (gain, ppl, rvq)
