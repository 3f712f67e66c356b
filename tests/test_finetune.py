"""Block fine-tuning (rvqllm.finetune): it lowers the block's output error and the result is what is stored."""

import pytest
import torch

import rvqllm
from rvqllm.arch import find_blocks
from rvqllm.calibration import capture_block_inputs
from rvqllm.finetune import finetune_block
from rvqllm.nn import QuantizedLinear
from rvqllm.resume import MemoryActivations
from rvqllm.rvq import quantize_weight
from tests.conftest import tiny_llama

pytestmark = pytest.mark.unit


def _block_with_targets(batches: int = 2, batch: int = 4):
    """Tiny llama block 0, its float outputs on real inputs, then its linears coded crudely (greedy RVQ)."""
    model = tiny_llama()
    _, blocks = find_blocks(model)
    block = blocks[0]
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 128, (batch, 24), generator=gen) for _ in range(batches)]
    inputs, targets, kwargs = MemoryActivations(), MemoryActivations(), []
    for j, inp in enumerate(capture_block_inputs(model, block, ids)):
        inputs.put(j, inp.hidden)
        with torch.no_grad():
            out = block(inp.hidden, **inp.kwargs)
        targets.put(j, out[0] if isinstance(out, tuple) else out)
        kwargs.append(inp.kwargs)
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = quantize_weight(child.weight, None, vector_dim=8, stages=1, bits=3, seed=0)
                setattr(parent, name, QuantizedLinear.from_rvq(q, 3, child.bias))
    return block, inputs, targets, kwargs


def test_finetuning_lowers_the_block_output_error():
    block, inputs, targets, kwargs = _block_with_targets()
    codes = {n: m.codes.clone() for n, m in block.named_modules() if isinstance(m, QuantizedLinear)}
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    before, after = finetune_block(block, inputs, targets, kwargs, epochs=20, lr=1e-2, micro_batch=2,
                                   storage_dtype=torch.float16)
    assert after < 0.8 * before, (before, after)
    # the codes are untouched; what the block now computes is its stored (fp16) values, re-measured
    for n, m in block.named_modules():
        if isinstance(m, QuantizedLinear):
            assert torch.equal(m.codes, codes[n])
            assert m.codebooks.dtype == torch.float16 and m.scales.dtype == torch.float16
    for n, p in block.named_parameters():
        assert torch.equal(p, p.half().float()), "float params are rounded to the storage dtype"
        assert p.requires_grad == flags[n]
    assert not any(type(m).__name__ == "_TrainableRVQ" for m in block.modules())
    num = den = 0.0
    with torch.no_grad():
        for j, kw in enumerate(kwargs):
            out = block(inputs.get(j), **kw)
            out = out[0] if isinstance(out, tuple) else out
            num += float((out - targets.get(j)).pow(2).sum())
            den += float(targets.get(j).pow(2).sum())
    assert num / den == pytest.approx(after, rel=1e-4)


def test_finetuning_never_makes_the_block_worse():
    block, inputs, targets, kwargs = _block_with_targets()
    state = {k: v.clone() for k, v in block.state_dict().items()}
    # an absurd learning rate diverges: the block must keep its pre-tuning values
    before, after = finetune_block(block, inputs, targets, kwargs, epochs=3, lr=0.9)
    assert after == before
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("lr", [1e-2, 0.9])  # kept, and reverted (diverges)
def test_finetuning_writes_the_kept_blocks_outputs(lr):
    block, inputs, targets, kwargs = _block_with_targets()
    outputs = MemoryActivations()
    before, after = finetune_block(block, inputs, targets, kwargs, epochs=3, lr=lr, outputs=outputs)
    assert (after < before) == (lr < 0.5), (before, after)
    with torch.no_grad():
        for j, kw in enumerate(kwargs):
            out = block(inputs.get(j), **kw)
            assert torch.equal(outputs.get(j), out[0] if isinstance(out, tuple) else out)


def test_micro_batches_cut_batched_arguments_and_share_broadcast_ones():
    from rvqllm.finetune import _micro_batches

    x, tgt = torch.randn(5, 7, 3), torch.randn(5, 7, 3)
    kw = {"mask": torch.ones(5, 1, 7, 7), "pos": (torch.ones(1, 7, 2), torch.zeros(1, 7, 2)), "flag": True}
    parts = list(_micro_batches(x, tgt, kw, 2))
    assert [p[0].shape[0] for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert [p[2]["mask"].shape[0] for p in parts] == [2, 2, 1]
    assert all(p[2]["pos"][0].shape[0] == 1 and p[2]["flag"] is True for p in parts)


def test_pipeline_with_finetuning_saves_what_it_computes(calib_ids, tmp_path):
    model = tiny_llama()
    cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=4, finetune_epochs=2, calib_batch_size=4,
                           kmeans_iters=3)
    report = rvqllm.quantize(model, cfg, calib_ids)
    assert set(report.blocks) == {0, 1}
    assert all(b["error_after"] <= b["error_before"] for b in report.blocks.values())
    out = rvqllm.save(model, tmp_path / "q")
    loaded = rvqllm.load(out)
    ids = calib_ids[:2]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("target", ["block", "model"])
def test_resume_with_finetuning_is_bit_identical(calib_ids, tmp_path, target):
    cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=4, finetune_epochs=2, calib_batch_size=4,
                           kmeans_iters=3, finetune_target=target)
    whole = tiny_llama()
    rvqllm.quantize(whole, cfg, calib_ids)

    class Stop(Exception):
        pass

    def stop_after_block_0(name, done, total):
        if "layers.1." in name:
            raise Stop

    first = tiny_llama()
    with pytest.raises(Stop):
        rvqllm.quantize(first, cfg, calib_ids, stop_after_block_0, run_dir=tmp_path / "run")
    resumed = tiny_llama()
    rvqllm.quantize(resumed, cfg, calib_ids, run_dir=tmp_path / "run", resume=True)
    for (k, a), (k2, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_model_target_aims_at_the_float_models_activations(calib_ids):
    """With finetune_target="model", block 1's target is the float model's block-1 output (what the float
    model computes from the float block 0), not the float block 1 applied to the quantized block 0's output."""
    from rvqllm.finetune import _relative_error

    float_model = tiny_llama()
    _, fblocks = find_blocks(float_model)
    cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, finetune_epochs=1, calib_batch_size=8,
                           kmeans_iters=3, finetune_target="model")
    model = tiny_llama()
    report = rvqllm.quantize(model, cfg, calib_ids)
    qblocks = model.model.layers
    (inp,) = capture_block_inputs(float_model, fblocks[0], [calib_ids])
    with torch.no_grad():
        fp1 = fblocks[1](fblocks[0](inp.hidden, **inp.kwargs), **inp.kwargs)
        q0 = qblocks[0](inp.hidden, **inp.kwargs)
    store_in, store_fp = MemoryActivations(), MemoryActivations()
    store_in.put(0, q0)
    store_fp.put(0, fp1)
    # the quantized block 1 (after tuning) on the quantized inputs, measured against the float model's activations
    assert _relative_error(qblocks[1], store_in, store_fp, [inp.kwargs]) == pytest.approx(
        report.blocks[1]["error_after"], rel=1e-5)


def test_distillation_lowers_the_kl_to_the_float_model(calib_ids, tmp_path):
    from rvqllm.finetune import _topk_kl, distill_model, teacher_topk

    float_model = tiny_llama()
    batches = [calib_ids[:4], calib_ids[4:]]
    teacher = teacher_topk(float_model, batches, k=16)
    model = tiny_llama()
    rvqllm.quantize(model, rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3), calib_ids)
    blocks = list(model.model.layers)
    before, after = distill_model(model, blocks, batches, teacher, epochs=10, lr=3e-3, micro_batch=2,
                                  storage_dtype=torch.float16)
    assert after < 0.8 * before, (before, after)
    with torch.no_grad():  # what the model now computes is what it reports (stored precision)
        kl = sum(float(_topk_kl(model(input_ids=b).logits, t)) for b, t in zip(batches, teacher, strict=True)) / 2
    assert kl == pytest.approx(after, rel=1e-5)
    loaded = rvqllm.load(rvqllm.save(model, tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(loaded(calib_ids[:2]).logits, model(calib_ids[:2]).logits)


def test_topk_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    from rvqllm.finetune import _topk_kl

    logits = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(0))
    teacher = torch.log_softmax(logits, -1).topk(8, dim=-1)
    assert float(_topk_kl(logits, tuple(teacher))) == pytest.approx(0.0, abs=1e-6)
    assert float(_topk_kl(logits.flip(-1), tuple(teacher))) > 0.1


def test_pipeline_distillation_reports_and_keeps_improvement(calib_ids):
    model = tiny_llama()
    cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3, distill_epochs=3, distill_lr=3e-3,
                           calib_batch_size=4)
    report = rvqllm.quantize(model, cfg, calib_ids)
    assert report.distill["kl_after"] < report.distill["kl_before"]
