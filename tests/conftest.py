"""Shared fixtures: tiny random-weight models (fast, many architectures) and the offline reference (slow)."""

from __future__ import annotations

import pytest
import torch


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session", autouse=True)
def _own_baseline_cache(tmp_path_factory):
    """Tests measure baselines themselves (never read a number cached on this machine before the run)."""
    import os

    old = os.environ.get("RVQLLM_BASELINE_CACHE")
    os.environ["RVQLLM_BASELINE_CACHE"] = str(tmp_path_factory.mktemp("baselines"))
    yield
    if old is None:
        os.environ.pop("RVQLLM_BASELINE_CACHE", None)
    else:
        os.environ["RVQLLM_BASELINE_CACHE"] = old


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def reference():
    """``(model_dir, texts)`` of the offline reference; built once per cache."""
    from rvqllm.reference import reference_model_dir, reference_texts

    return reference_model_dir(), reference_texts()


_CALIBRATION_STREAMS: dict[str, list] = {}


def _calibration_streams(tokenizer) -> list:
    """The default calibration texts tokenized once per test session and tokenizer (seconds each time otherwise)."""
    from rvqllm.data import load_text, token_streams
    from rvqllm.reference import CALIB_TEXTS

    key = tokenizer.name_or_path
    if key not in _CALIBRATION_STREAMS:
        _CALIBRATION_STREAMS[key] = token_streams([load_text(t, "calib") for t in CALIB_TEXTS], tokenizer)
    return _CALIBRATION_STREAMS[key]


def quantize_reference(preset: str, sequences: int = 16, seq_len: int = 256, **overrides):
    """The reference model quantized with a preset (``overrides``: config fields changed) on a small
    calibration set drawn from the default calibration texts: ``(model, tokenizer)``."""
    import rvqllm
    from rvqllm.data import calibration_windows
    from rvqllm.models import load_model

    model, tok = load_model("reference")
    cfg = rvqllm.RVQConfig.load(preset).replace(calib_sequences=sequences, calib_seq_len=seq_len, **overrides)
    calib = calibration_windows(_calibration_streams(tok), cfg.calib_sequences, cfg.calib_seq_len, cfg.seed)
    rvqllm.quantize(model, cfg, calib)
    return model, tok


@pytest.fixture(scope="session")
def reference_2bit(reference):
    """The reference model at the 2-bit preset, quantized once per test session (shared, do not modify).
    Two distillation epochs, not the preset's one: the preset makes one pass over 256 sequences, which on
    this quick calibration of 16 would be 8 Adam steps; 6 k-means iterations instead of 20 for CI time
    (its quantization alone took 285 s on 2 cores in session 23; ``tests/test_e2e.py`` has the figures)."""
    return quantize_reference("2bit", distill_epochs=2, kmeans_iters=6)
