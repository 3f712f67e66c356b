"""The real reference model (SmolLM2-135M-Instruct) through real transformers: slow, run in CI.

Quick protocol variant: ppl on the first 4 windows x 512 tokens of each test text (2,044 predicted
tokens each: KJV-NT, Shakespeare and Wikipedia, the held-out Django docs and the out-of-domain news and
Usenet posts), calibration 16 sequences x 256 tokens from the default calibration texts (KJV-OT,
Shakespeare, fortunes, Python code, Wikipedia). Until session 24 the first 8 windows (twice the evaluation
time); the bounds were re-measured on 4 with the same models (figures on both in each test).
"""

import math

import pytest
import torch

import rvqllm
from rvqllm.data import load_text
from rvqllm.eval import perplexity, tokenize_windows
from rvqllm.models import load_model, load_tokenizer, resolve_tokenizer
from rvqllm.reference import EVAL_TEXTS
from tests.conftest import quantize_reference

pytestmark = pytest.mark.e2e

WINDOWS = 4
TEXTS = EVAL_TEXTS


@pytest.fixture(scope="module")
def texts(reference):
    """``{name: [WINDOWS, 512] token ids}``: each test text's first windows, tokenized once for every evaluation
    (what ``rvqllm.eval.evaluate`` does per call)."""
    tok = load_tokenizer(*resolve_tokenizer("reference"))
    return {name: tokenize_windows(load_text(name, "test"), tok, 512, WINDOWS) for name in TEXTS}


def _ppl(model, texts) -> dict[str, float]:
    return {name: perplexity(model, ids).ppl for name, ids in texts.items()}


@pytest.fixture(scope="module")
def baseline_ppl(texts):
    model, _ = load_model("reference")
    return _ppl(model, texts)


@pytest.fixture(scope="module")
def reference_2bit_ppl(texts, reference_2bit):
    """The ``2bit`` fixture's perplexities, measured once for the tests that bound it and compare with it."""
    return _ppl(reference_2bit[0], texts)


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
    ppl = _ppl(loaded, texts)
    # A regression bound, not the goal: the 4-bit preset's full-protocol figures are in docs/RESULTS.md. On
    # this test's calibration (8 x 256 tokens of kjv+shakespeare+fortunes+code+wiki) and first 4 windows, greedy
    # and with 6 k-means iterations as here, it measured 12.89 / 42.93 / 16.88 / 28.09 / 36.25 / 42.23 against the
    # baseline's 10.76 / 39.91 / 15.34 / 23.88 / 30.89 / 37.23 (x1.20 / x1.08 / x1.10 / x1.18 / x1.17 / x1.14 for
    # KJV / Shakespeare / django / wiki / news / usenet; on the first 8 windows x1.20 / x1.07 / x1.13 / x1.15 /
    # x1.18 / x1.11; session 24, the same calls in a throwaway script). The bounds sit 8 % above (they were 1.35
    # on every text until session 7; the earlier figures are in git history and docs/RESULTS.md).
    bounds = {"kjv": 1.3, "shakespeare": 1.16, "django": 1.19, "wiki": 1.27, "news": 1.27, "usenet": 1.23}
    for name in TEXTS:
        assert ppl[name] < baseline_ppl[name] * bounds[name], (name, ppl[name], baseline_ppl[name])


def test_2bit_preset_quality_regression_bound(baseline_ppl, reference_2bit_ppl):
    ppl = reference_2bit_ppl
    # The 2-bit preset on this quick protocol (16x256 calibration from kjv+shakespeare+fortunes+code+wiki; two
    # distillation epochs over the 16 sequences, as the preset had until session 16: its one pass, meant for 256
    # sequences, measured worse on all but KJV here with half the steps; 6 k-means iterations since session 23;
    # conftest.reference_2bit). Since session 32 the preset gives each layer vectors of 6, 8 or 9 weights by measured
    # sensitivity (bpw_budget auto): 30.31 / 67.79 / 36.02 / 56.43 / 89.89 / 79.60 on the first 4 windows (x2.82 /
    # x1.70 / x2.35 / x2.36 / x2.91 / x2.14 of the baseline's 10.76 / 39.91 / 15.34 / 23.88 / 30.89 / 37.23 for KJV /
    # Shakespeare / django / wiki / news / usenet; the fixture's calls in a throwaway script, one thread). The
    # uniform d-8 preset before it measured 30.17 / 76.30 / 39.29 / 67.07 / 91.23 / 90.31 (session 26): the new one is
    # 0.5 % worse on KJV and 1.5-16 % better on the rest. The bounds sit 8 % above (they were 8-10 % above the uniform
    # preset). Without its distillation, without error feedback or as the session-1 preset it measured far worse
    # (docs/RESULTS.md has the ablation).
    # The test suite's own run (two threads) measured 30.42 / 66.84 / 33.86 / 62.00 on the first four texts (Wikipedia
    # x2.60: the thread count moves this quick protocol by up to 10 %). Session 33 measures the sensitivity from each
    # sequence's own gradient (a plan 24 layers away on the full calibration): the fixture's calls at two threads in a
    # throwaway script gave 30.27 / 68.91 / 33.88 / 60.73 / 86.87 / 84.05 (x2.81 / x1.73 / x2.21 / x2.54 / x2.81 /
    # x2.26). The bounds sit 8 % above the highest of these runs on each text.
    bounds = {"kjv": 3.05, "shakespeare": 1.87, "django": 2.54, "wiki": 2.8, "news": 3.15, "usenet": 2.44}
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
    ppl = _ppl(loaded, texts)
    rvq = reference_2bit_ppl
    # Session 24 (the same calls in a throwaway script) measured 26.48 / 63.38 / 31.07 / 56.25 / 78.53 / 76.17 on
    # the first 4 windows (x2.46 / x1.59 / x2.03 / x2.36 / x2.54 / x2.05 of the baseline's 10.76 / 39.91 / 15.34 /
    # 23.88 / 30.89 / 37.23 for KJV / Shakespeare / django / wiki / news / usenet; x2.56 / x1.55 / x2.08 / x2.36 /
    # x2.55 / x2.04 on the first 8), 0.81 to 0.93 of the uniform 2bit fixture's (geometric mean 0.86). Session 32:
    # 26.00 / 63.50 / 30.00 / 54.05 / 76.50 / 77.86, 0.83 to 0.98 of the sensitivity-allocated 2bit fixture's
    # (geometric mean 0.90; Usenet 0.978). The bounds sit ~10 % above; the trellis must not lose to 2bit on any
    # text and must beat it by 6 % on the geometric mean over the texts (8 % against the uniform 2bit before).
    bounds = {"kjv": 2.71, "shakespeare": 1.75, "django": 2.23, "wiki": 2.59, "news": 2.8, "usenet": 2.25}
    for name in TEXTS:
        assert math.isfinite(ppl[name])
        assert ppl[name] < baseline_ppl[name] * bounds[name], (name, ppl[name], baseline_ppl[name])
        assert ppl[name] < rvq[name], (name, ppl[name], rvq[name])
    gain = math.exp(sum(math.log(ppl[name] / rvq[name]) for name in TEXTS) / len(TEXTS))
    assert gain < 0.94, (gain, ppl, rvq)
