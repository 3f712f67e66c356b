"""Every common architecture, as a tiny random-weight model built from its config: quantize, save,
load with ``AutoModelForCausalLM.from_pretrained``, same logits as before saving."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rvqllm
from rvqllm.arch import SplitExperts, find_blocks
from rvqllm.errors import RVQError
from rvqllm.nn import QuantizedLinear

pytestmark = pytest.mark.integration

CFG = rvqllm.RVQConfig(vector_dim=8, stages=2, bits=4, kmeans_iters=2, calib_batch_size=4, error_feedback=False)
V = 128  # vocabulary of every tiny model
DENSE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)


def _config(arch: str):
    import transformers as T

    if arch == "llama":
        return T.LlamaConfig(**DENSE)
    if arch == "mistral":
        return T.MistralConfig(**DENSE, sliding_window=32)
    if arch == "qwen2":
        return T.Qwen2Config(**DENSE)
    if arch == "qwen3":
        return T.Qwen3Config(**DENSE, head_dim=16)
    if arch == "gemma2":
        return T.Gemma2Config(**DENSE, head_dim=16, sliding_window=32)
    if arch == "gemma3":
        return T.Gemma3TextConfig(**DENSE, head_dim=16, sliding_window=32)
    if arch == "phi3":
        return T.Phi3Config(**DENSE, pad_token_id=0)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64)
    if arch == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                           max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=1)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=V, max_position_embeddings=64)
    if arch == "mixtral":
        return T.MixtralConfig(**DENSE, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(**DENSE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, decoder_sparse_step=1)
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(**DENSE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                decoder_sparse_step=1)
    raise AssertionError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "opt", "gpt_neox",
         "mixtral", "qwen2_moe", "qwen3_moe"]
MOE = {"mixtral": 4, "qwen2_moe": 4, "qwen3_moe": 4}


def _build(arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(arch)).eval()


def _float_linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_through_from_pretrained(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _build(arch)
    prefix, blocks = find_blocks(model)
    calib = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    report = rvqllm.quantize(model, CFG, calib)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == set(report.layers) and quantized
    # every linear layer inside the blocks is quantized, except MoE routers
    for n, m in model.named_modules():
        if n.startswith(prefix + ".") and isinstance(m, nn.Linear):
            assert n.rsplit(".", 1)[-1] in ("gate", "router", "shared_expert_gate"), n
    if arch in MOE:
        split = [m for m in model.modules() if isinstance(m, SplitExperts)]
        assert len(split) == len(blocks)
        for m in split:  # every expert's two projections
            assert len(m.gate_up_proj) == len(m.down_proj) == MOE[arch]
            assert all(isinstance(x, QuantizedLinear) for x in [*m.gate_up_proj, *m.down_proj])
    with torch.no_grad():
        before = model(ids).logits
    assert torch.isfinite(before).all()
    out = rvqllm.save(model, tmp_path / "ckpt")

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)} == quantized
    with torch.no_grad():
        after = loaded(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_unsupported_model_names_what_was_not_understood():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(8, 4)
            self.mixer = nn.Parameter(torch.zeros(4, 4))

    with pytest.raises(RVQError, match="Toy: found no list of decoder blocks"):
        find_blocks(Toy())


def test_unknown_fused_experts_layout_is_named():
    from rvqllm.arch import find_linears

    class WeirdExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = nn.Parameter(torch.zeros(4, 8, 16))
            self.act_fn = nn.SiLU()

    block = nn.Module()
    block.proj = nn.Linear(16, 16)
    block.experts = WeirdExperts()
    with pytest.raises(RVQError, match=r"WeirdExperts holds 3-D parameters \['w_in'\].*module experts"):
        find_linears(block, "layers.0", [])


@pytest.mark.unit
def test_split_experts_compute_what_the_fused_experts_compute():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(0)
    fused = MixtralExperts(MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4))
    nn.init.normal_(fused.gate_up_proj)
    nn.init.normal_(fused.down_proj)
    split = SplitExperts.from_fused(fused)
    x = torch.randn(10, 16)
    idx = torch.randint(0, 4, (10, 2))
    w = torch.rand(10, 2)
    torch.testing.assert_close(split(x, idx, w), fused(x, idx, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(split.down_proj[3].weight, fused.down_proj[3])
