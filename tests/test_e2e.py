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
    # conftest.reference_2bit) measured 29.76 / 68.27 / 38.59 / 68.10 / 93.17 / 87.01 on the first 4 windows
    # (x2.77 / x1.71 / x2.52 / x2.85 / x3.02 / x2.34 of the baseline's 10.76 / 39.91 / 15.34 / 23.88 / 30.89 /
    # 37.23 for KJV / Shakespeare / django / wiki / news / usenet), x3.02 / x1.66 / x2.58 / x2.76 / x3.07 / x2.25
    # on the first 8 (session 24, the same calls in a throwaway script; the 7th and 8th KJV windows are hard for
    # it). Session 26's coder (new k-means++ draws, float rounding) measured 30.17 / 76.30 / 39.29 / 67.07 / 91.23 /
    # 90.31 (x2.80 / x1.91 / x2.56 / x2.81 / x2.95 / x2.43; a throwaway script making the fixture's calls): the same
    # within 4 % but Shakespeare, +12 % on this quick calibration of 16 x 256 tokens, where the full protocol's run of
    # the preset on the same code moved it +1.9 % (mean ln 0.615 against 0.627 before; docs/RESULTS.md "Session
    # 26"). The bounds sit 8-10 % above the higher of the two runs. Without its distillation, without error feedback
    # or as the session-1 preset it measured far worse (docs/RESULTS.md has the ablation).
    bounds = {"kjv": 3.04, "shakespeare": 2.08, "django": 2.77, "wiki": 3.13, "news": 3.32, "usenet": 2.65}
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
    # x2.55 / x2.04 on the first 8), 0.81 to 0.93 of the 2bit fixture's (geometric mean 0.86, the same on 8
    # windows). The bounds sit ~10 % above; the trellis must beat 2bit on every text (by 2 %) and by 8 % on the
    # geometric mean over the texts.
    bounds = {"kjv": 2.71, "shakespeare": 1.75, "django": 2.23, "wiki": 2.59, "news": 2.8, "usenet": 2.25}
    for name in TEXTS:
        assert math.isfinite(ppl[name])
        assert ppl[name] < baseline_ppl[name] * bounds[name], (name, ppl[name], baseline_ppl[name])
        assert ppl[name] < 0.98 * rvq[name], (name, ppl[name], rvq[name])
    gain = math.exp(sum(math.log(ppl[name] / rvq[name]) for name in TEXTS) / len(TEXTS))
    assert gain < 0.92, (gain, ppl, rvq)
