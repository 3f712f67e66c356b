"""Every common architecture, as a tiny random-weight model built from its config: quantize, save,
load with ``AutoModelForCausalLM.from_pretrained`` and with ``rvqllm.load``, same logits as before saving.

Covered: dense decoders (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo2, Granite, StarCoder2, Cohere,
StableLM, Phi-2), fused or packed projections (GPT-2 Conv1D, GPT-BigCode ``c_attn``, Falcon and Bloom
``query_key_value``, GPT-J, GPT-NeoX, OPT), multi-head latent attention (DeepSeek-V2/V3), MoE with fused
experts (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3 with shared experts and dense first layers, OLMoE,
GraniteMoE, GLM-4-MoE, HunYuan-MoE, GPT-OSS's transposed, biased, interleaved experts) and hybrid
blocks with convolutions (Qwen3-Next, LFM2), Mamba (Mamba, Falcon-Mamba) and its hybrids (Granite 4.0-H,
Jamba: their Mamba code reads ``dt_proj.weight`` as a matrix, which a quantized layer decodes). DBRX's
experts layout is refused with a named error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rvqllm
from rvqllm.arch import ROUTER_NAMES, SplitExperts, find_blocks
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
    if arch == "olmo2":
        return T.Olmo2Config(**DENSE)
    if arch == "granite":
        return T.GraniteConfig(**DENSE, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0,
                               attention_multiplier=0.25)
    if arch == "starcoder2":
        return T.Starcoder2Config(**DENSE, sliding_window=32)
    if arch == "cohere":
        return T.CohereConfig(**DENSE, pad_token_id=0)
    if arch == "stablelm":
        return T.StableLmConfig(**DENSE, pad_token_id=0)
    if arch == "phi":
        return T.PhiConfig(**DENSE, pad_token_id=0)
    if arch == "falcon":  # Falcon-7B: multi-query, parallel attention, fused query_key_value
        return T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V)
    if arch == "falcon_new":  # Falcon-40B/180B: grouped KV heads, two layernorms
        return T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                              new_decoder_architecture=True, num_kv_heads=2)
    if arch == "gpt_bigcode":
        return T.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    if arch == "bloom":
        return T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=V)
    if arch == "gptj":
        return T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64, rotary_dim=8,
                            bos_token_id=0, eos_token_id=0)
    if arch in ("deepseek_v3", "deepseek_v2"):  # MLA + MoE with a shared expert; block 0 dense
        cls, q_lora_rank = (T.DeepseekV3Config, 32) if arch == "deepseek_v3" else (T.DeepseekV2Config, None)
        return cls(**{**DENSE, "num_key_value_heads": 4}, kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_rope_head_dim=8,
                   qk_nope_head_dim=8, v_head_dim=16, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                   num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1)
    if arch == "glm4_moe":
        return T.Glm4MoeConfig(**DENSE, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                               num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1)
    if arch == "olmoe":
        return T.OlmoeConfig(**DENSE, num_experts=4, num_experts_per_tok=2)
    if arch == "granitemoe":
        return T.GraniteMoeConfig(**DENSE, num_local_experts=4, num_experts_per_tok=2)
    if arch == "hunyuan_v1_moe":  # router linear nested one level down: mlp.gate.wg
        return T.HunYuanMoEV1Config(**DENSE, head_dim=16, num_experts=4, moe_topk=2, moe_intermediate_size=32,
                                    num_shared_expert=1)
    if arch == "gpt_oss":  # experts transposed [E, in, out], with biases, gate/up interleaved, clamped SwiGLU
        return T.GptOssConfig(**DENSE, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=32)
    if arch == "qwen3_next":  # gated-DeltaNet blocks with a conv1d kernel + MoE
        return T.Qwen3NextConfig(**DENSE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=48, linear_num_value_heads=4, linear_num_key_heads=2,
                                 linear_key_head_dim=16, linear_value_head_dim=16,
                                 layer_types=["linear_attention", "full_attention"])
    if arch == "granitemoehybrid":  # Granite 4.0-H: Mamba2 + attention blocks with MoE; its config holds Infinity
        return T.GraniteMoeHybridConfig(**DENSE, layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_head=16,
                                        mamba_d_state=16, mamba_n_groups=1, mamba_expand=2, num_local_experts=4,
                                        num_experts_per_tok=2, shared_intermediate_size=32)
    if arch == "jamba":  # Mamba + attention blocks, MoE every other block; its Mamba reads dt_proj.weight
        return T.JambaConfig(**DENSE, num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                             expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4,
                             mamba_expand=2, mamba_dt_rank=8)
    if arch in ("mamba", "falcon_mamba"):  # attention-free; the PyTorch path reads dt_proj.weight too
        kind = T.MambaConfig if arch == "mamba" else T.FalconMambaConfig
        return kind(hidden_size=64, num_hidden_layers=2, vocab_size=V, state_size=8, expand=2, time_step_rank=8)
    if arch == "lfm2":  # short-convolution blocks
        return T.Lfm2Config(**DENSE, layer_types=["conv", "full_attention"])
    raise AssertionError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "opt", "gpt_neox",
         "mixtral", "qwen2_moe", "qwen3_moe",
         "olmo2", "granite", "starcoder2", "cohere", "stablelm", "phi", "falcon", "falcon_new", "gpt_bigcode", "bloom",
         "gptj", "deepseek_v3", "deepseek_v2", "glm4_moe", "olmoe", "granitemoe", "hunyuan_v1_moe", "gpt_oss",
         "qwen3_next", "lfm2", "granitemoehybrid", "jamba", "mamba", "falcon_mamba"]
#: MoE families: (experts per MoE block, number of MoE blocks out of the 2)
MOE = {"mixtral": (4, 2), "qwen2_moe": (4, 2), "qwen3_moe": (4, 2), "deepseek_v3": (4, 1), "deepseek_v2": (4, 1),
       "glm4_moe": (4, 1), "olmoe": (4, 2), "granitemoe": (4, 2), "hunyuan_v1_moe": (4, 2), "gpt_oss": (4, 2),
       "qwen3_next": (4, 2), "granitemoehybrid": (4, 2), "jamba": (4, 1)}
#: Layers that must be among the quantized ones (name suffixes): the unusual projections of a family.
EXPECTED = {
    "deepseek_v3": ["layers.0.self_attn.q_a_proj", "layers.0.self_attn.q_b_proj", "layers.0.self_attn.kv_a_proj_with_mqa",
                    "layers.0.self_attn.kv_b_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_proj",
                    "layers.1.mlp.shared_experts.down_proj", "layers.1.mlp.experts.gate_up_proj.3"],
    "deepseek_v2": ["layers.1.self_attn.q_proj", "layers.1.self_attn.kv_a_proj_with_mqa", "layers.1.self_attn.kv_b_proj",
                    "layers.1.mlp.shared_experts.up_proj"],
    "falcon": ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "falcon_new": ["self_attention.query_key_value"],
    "bloom": ["self_attention.query_key_value", "mlp.dense_4h_to_h"],
    "gpt_bigcode": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "gptj": ["attn.q_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"],
    "phi": ["self_attn.dense", "mlp.fc1"],
    "olmo2": ["self_attn.q_proj", "mlp.down_proj"],
    "granite": ["self_attn.q_proj", "mlp.down_proj"],
    "starcoder2": ["self_attn.q_proj", "mlp.c_fc"],
    "hunyuan_v1_moe": ["layers.0.mlp.shared_mlp.down_proj"],
    "gpt_oss": ["layers.0.mlp.experts.gate_up_proj.0", "layers.1.mlp.experts.down_proj.3"],
    "qwen3_next": ["layers.0.linear_attn.in_proj_qkvz", "layers.0.linear_attn.out_proj", "layers.1.self_attn.q_proj"],
    "granitemoehybrid": ["layers.0.mamba.in_proj", "layers.0.mamba.out_proj", "layers.1.self_attn.q_proj",
                         "layers.1.shared_mlp.input_linear", "layers.1.block_sparse_moe.experts.down_proj.3"],
    "lfm2": ["layers.0.conv.in_proj", "layers.0.conv.out_proj", "layers.1.self_attn.q_proj"],
    "jamba": ["layers.0.mamba.in_proj", "layers.0.mamba.x_proj", "layers.0.mamba.dt_proj", "layers.0.mamba.out_proj",
              "layers.1.self_attn.q_proj", "layers.1.feed_forward.experts.down_proj.3"],
    "mamba": ["layers.0.mixer.in_proj", "layers.0.mixer.x_proj", "layers.0.mixer.dt_proj", "layers.1.mixer.out_proj"],
    "falcon_mamba": ["layers.0.mixer.dt_proj", "layers.1.mixer.out_proj"],
}


def _build(arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch)).eval()
    # Norm weights, biases and router correction biases start constant (1 or 0): make them random, so
    # that the round trip shows they are stored and read back (and into the right place).
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point() and t.dim() <= 1:
                t.add_(0.1 * torch.randn(t.shape, dtype=t.dtype))
    return model


def _is_router(name: str) -> bool:
    return any(part in ROUTER_NAMES for part in name.split("."))


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
    # every linear layer inside the blocks is quantized, except MoE routers; no 3-D weight is left
    for n, m in model.named_modules():
        if n.startswith(prefix + ".") and isinstance(m, nn.Linear):
            assert _is_router(n), n
    for n, p in model.named_parameters():
        assert p.dim() < 3 or n.endswith("conv1d.weight") or n.endswith("conv.weight"), n
    missing = [s for s in EXPECTED.get(arch, []) if not any(q.endswith(s) for q in quantized)]
    assert not missing, missing
    split = [m for m in model.modules() if isinstance(m, SplitExperts)]
    experts, moe_blocks = MOE.get(arch, (0, 0))
    assert len(split) == moe_blocks
    for m in split:  # every expert's two projections
        assert len(m.in_proj) == len(m.down_proj) == experts
        assert all(isinstance(x, QuantizedLinear) for x in [*m.in_proj, *m.down_proj])
    with torch.no_grad():
        before = model(ids).logits
    assert torch.isfinite(before).all()
    out = rvqllm.save(model, tmp_path / "ckpt")

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)} == quantized
    with torch.no_grad():
        after = loaded(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)

    ours = rvqllm.load(out)
    assert {n for n, m in ours.named_modules() if isinstance(m, QuantizedLinear)} == quantized
    assert ours.config._is_quantized and loaded.config._is_quantized  # model code calls, not reads, its linears
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, before, rtol=0, atol=1e-5)
    # every tensor (codes, norms, biases, routers and their correction biases, conv kernels) came back
    state = model.state_dict()
    for other in (loaded, ours):
        got = other.state_dict()
        assert got.keys() == state.keys()
        for k, t in state.items():
            assert torch.equal(got[k], t), k


@pytest.mark.parametrize("arch", ARCHS)
def test_blockwise_sensitivity_is_the_whole_models_on_every_architecture(arch):
    """Mixed precision's block-by-block sensitivity (the model's own head and loss behind stand-in blocks, then
    each block's backward from its kept input) equals the whole model's backward, family by family: final
    norms, soft-capping, logit scales, fused experts split into linears, recurrent mixers."""
    from rvqllm.arch import find_linears
    from rvqllm.calibration import capture_block_inputs
    from rvqllm.mixed import blockwise_sensitivity, fisher_sensitivity
    from rvqllm.resume import MemoryActivations
    from rvqllm.source import MemorySource

    model = _build(arch)
    source = MemorySource(model)
    layers = {n: m for i, b in enumerate(source.blocks) for n, m in find_linears(b, f"{source.prefix}.{i}", CFG.skip).items()}
    ids = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(3))
    want = fisher_sensitivity(model, layers, [ids])
    (inp,) = capture_block_inputs(model, source.blocks[0], [ids])
    got = blockwise_sensitivity(model, source, ids, inp.hidden, inp.kwargs, torch.device("cpu"), CFG.skip,
                                MemoryActivations(), 2)
    assert list(got) == list(want)
    top = max(want.values())
    assert top > 0
    for n in want:
        assert got[n] == pytest.approx(want[n], rel=1e-3, abs=1e-6 * top), n


@pytest.mark.parametrize("arch", ARCHS)
def test_distillation_runs_on_every_architecture(arch):
    """Whole-model distillation's teacher comes from the model's own head behind stand-in blocks; Falcon's and
    BLOOM's blocks return tuples, and their stand-ins must too (an IndexError deep in the model until session
    32). The distillation runs, checks its head against the model's logits, and its KL does not rise."""
    model = _build(arch)
    calib = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(1))
    report = rvqllm.quantize(model, CFG.replace(distill_epochs=1, distill_chunk_tokens=16), calib)
    assert report.distill["kl_after"] <= report.distill["kl_before"] + 1e-6, report.distill


@pytest.mark.parametrize("arch", ARCHS)
def test_block_finetuning_in_micro_batches_runs_on_every_architecture(arch):
    """Block fine-tuning steps over one sequence at a time, so every block argument with a batch dimension is
    cut to it; BLOOM's ALiBi bias folds the batch with the heads (``[batch * heads, 1, seq]``) and failed to
    broadcast until session 32. Every block's error after tuning is no higher than before (what is not better
    is undone)."""
    model = _build(arch)
    calib = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(1))
    report = rvqllm.quantize(model, CFG.replace(finetune_epochs=1, finetune_batch=1), calib)
    for i, b in report.blocks.items():
        assert b["error_after"] <= b["error_before"], (i, b)


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
    with pytest.raises(RVQError, match=r"WeirdExperts holds 3-D parameters \['w_in'\].*module layers\.0\.experts"):
        find_linears(block, "layers.0", [])
    # the way out the message names: skip the module, the rest of the block is still quantized
    assert list(find_linears(block, "layers.0", ["experts"])) == ["layers.0.proj"]
    assert isinstance(block.experts, WeirdExperts)


def test_dbrx_experts_are_refused_by_name_and_skip_gets_past_them(tmp_path):
    """DBRX keeps its experts in 2-D ``w1/v1/w2 [E * I, H]`` parameters, a layout rvqllm does not split."""
    import dataclasses

    import transformers as T

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.DbrxConfig(
        d_model=64, n_heads=4, n_layers=2, vocab_size=V, max_seq_len=64,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2})).eval()
    calib = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(1))
    with pytest.raises(RVQError, match=r"^DbrxExperts \(module transformer\.blocks\.0\.ffn\.experts\) keeps its expert "
                                       r"weights in parameters \['mlp\.w1', 'mlp\.v1', 'mlp\.w2'\][^\n]*`skip`[^\n]*$"):
        rvqllm.quantize(model, CFG, calib)
    report = rvqllm.quantize(model, dataclasses.replace(CFG, skip=["lm_head", "experts"]), calib)
    assert sorted(report.layers) == [f"transformer.blocks.{i}.norm_attn_norm.attn.{n}"
                                     for i in range(2) for n in ("Wqkv", "out_proj")]
    assert isinstance(model.transformer.blocks[0].ffn.router.layer, nn.Linear)  # a router, kept
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        after = rvqllm.load(rvqllm.save(model, tmp_path / "ckpt"))(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_experts_whose_forward_is_not_the_layout_are_refused():
    """A split is checked against the fused module's own forward: experts that look like the known layout
    but compute something else are refused by name instead of being split wrong."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from rvqllm.arch import find_linears

    class InlineExperts(MixtralExperts):
        swap = False  # True: reads [up; gate] where the layout says [gate; up]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for t in range(hidden_states.shape[0]):
                for j, e in enumerate(top_k_index[t].tolist()):
                    gate, up = (self.gate_up_proj[e] @ hidden_states[t]).chunk(2)
                    if self.swap:
                        gate, up = up, gate
                    out[t] += top_k_weights[t, j] * (self.down_proj[e] @ (self.act_fn(gate) * up))
            return out

    def block(swap: bool) -> nn.Module:
        torch.manual_seed(0)
        b = nn.Module()
        b.experts = InlineExperts(MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4))
        nn.init.normal_(b.experts.gate_up_proj)
        nn.init.normal_(b.experts.down_proj)
        b.experts.swap = swap
        return b

    ok = block(swap=False)
    assert len(find_linears(ok, "l.0", [])) == 8 and isinstance(ok.experts, SplitExperts)
    with pytest.raises(RVQError, match=r"^InlineExperts's forward computes something else than its experts split "
                                       r"into linear layers \(module l\.0\.experts\)"):
        find_linears(block(swap=True), "l.0", [])


def _fused_experts(kind: str) -> nn.Module:
    import transformers as T

    if kind == "mixtral":  # [E, 2I, H] / [E, H, I], gate rows then up rows
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        return MixtralExperts(T.MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4))
    if kind == "gpt_oss":  # transposed [E, H, 2I] / [E, I, H], biases, interleaved, clamped SwiGLU
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        return GptOssExperts(T.GptOssConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, swiglu_limit=2.0))
    if kind == "nemotron_h":  # not gated: up_proj [E, I, H], relu2
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

        return NemotronHExperts(T.NemotronHConfig(hidden_size=16, moe_intermediate_size=24, n_routed_experts=4))
    raise AssertionError(kind)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss", "nemotron_h"])
def test_split_experts_compute_what_the_fused_experts_compute(kind):
    from rvqllm.arch import fused_experts_problem

    torch.manual_seed(0)
    fused = _fused_experts(kind)
    fused.config._experts_implementation = "eager"
    for p in fused.parameters():
        nn.init.normal_(p)
    assert fused_experts_problem(fused) is None
    split = SplitExperts.from_fused(fused)
    x = torch.randn(10, 16)
    idx = torch.randint(0, 4, (10, 2))
    w = torch.rand(10, 2)
    want = fused(x, idx, w)
    torch.testing.assert_close(split(x, idx, w), want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 1  # (not a trivially small output)
    down = fused.down_proj[3].T if kind == "gpt_oss" else fused.down_proj[3]
    assert torch.equal(split.down_proj[3].weight, down)
    assert (split.in_proj[0].bias is not None) == (kind == "gpt_oss")
