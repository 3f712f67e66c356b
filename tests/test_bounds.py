"""rvqllm/bounds.py: the sizes a config declares answer to the files before anything is built."""

from __future__ import annotations

import pytest
import torch

from rvqllm.bounds import build_skeleton, check_declared_counts
from rvqllm.errors import RVQError

pytestmark = pytest.mark.unit

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=64)


def test_counts_of_layers_and_experts_must_fit_the_tensors():
    check_declared_counts({"num_hidden_layers": 2, "max_window_layers": 28, "num_experts_per_tok": 8,
                           "quantization_config": {"layers": {"a": {"hadamard_block": 64, "num_layers": 99}}}},
                          20, "m", "fix")
    for config in ({"num_hidden_layers": 21}, {"text_config": {"n_layer": 10**9}}, {"moe_num_experts": 64},
                   {"sub": [{"num_local_experts": 99}]}):
        with pytest.raises(RVQError, match="more than the 20 tensors its weights hold: the config does not"):
            check_declared_counts(config, 20, "m", "fix")


def test_a_model_larger_than_its_files_stops_building_early():
    from transformers import LlamaConfig

    config = LlamaConfig(**{**SMALL, "num_hidden_layers": 200_000})  # the count check bypassed: the build guard
    with pytest.raises(RVQError, match=r"more than 10,080 modules and tensors, far more than the 10 tensors"):
        build_skeleton(config, n_tensors=10, n_bytes=10**6, label="m", fix="fix")


def test_computed_buffers_must_fit_the_files_and_the_check_sees_an_all_meta_model():
    from transformers import LlamaConfig

    with pytest.raises(RVQError, match="bytes of computed buffers"):
        build_skeleton(LlamaConfig(**{**SMALL, "head_dim": 2**26}), n_tensors=30, n_bytes=10**6, label="m", fix="fix")
    seen = []
    model = build_skeleton(LlamaConfig(**SMALL), n_tensors=30, n_bytes=10**6, label="m", fix="fix",
                           check=lambda meta: seen.append(all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])))
    assert seen == [True]
    assert all(p.is_meta for p in model.parameters())
    assert not model.model.rotary_emb.inv_freq.is_meta and torch.isfinite(model.model.rotary_emb.inv_freq).all()
