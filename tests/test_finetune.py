"""Block fine-tuning (rvqllm.finetune): it lowers the block's output error and the result is what is stored."""

import json
import warnings

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
    inputs, targets, kwargs = MemoryActivations(), MemoryActivations(), {}
    for j, inp in enumerate(capture_block_inputs(model, block, ids)):
        inputs.put(j, inp.hidden)
        with torch.no_grad():
            out = block(inp.hidden, **inp.kwargs)
        targets.put(j, out[0] if isinstance(out, tuple) else out)
        kwargs[j] = inp.kwargs
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
        for j, kw in kwargs.items():
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


def test_an_undone_tuning_is_retried_at_a_third_of_the_rate_from_the_same_values():
    block, inputs, targets, kwargs = _block_with_targets()
    start = {k: v.clone() for k, v in block.state_dict().items()}
    stats: dict = {}
    before, after = finetune_block(block, inputs, targets, kwargs, epochs=3, lr=0.9, retries=4, stats=stats)
    assert stats["tuned"] and after < before, (stats, before, after)
    assert stats["attempts"] > 1 and stats["lr"] == pytest.approx(0.9 / 3 ** (stats["attempts"] - 1))
    # the kept attempt started from the values the block had: a fresh block tuned at that rate alone ends
    # in the same state, bit for bit
    twin, *_ = _block_with_targets()
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in start.items())
    once: dict = {}
    assert finetune_block(twin, inputs, targets, kwargs, epochs=3, lr=stats["lr"], stats=once) == (before, after)
    assert once == {"attempts": 1, "lr": stats["lr"], "tuned": True}
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in block.state_dict().items())
    # without retries the diverging rate is undone and nothing else is tried
    none: dict = {}
    fresh, *_ = _block_with_targets()
    assert finetune_block(fresh, inputs, targets, kwargs, epochs=3, lr=0.9, stats=none) == (before, before)
    assert none == {"attempts": 1, "lr": 0.9, "tuned": False}


@pytest.mark.parametrize("lr", [1e-2, 0.9])  # kept, and reverted (diverges)
def test_finetuning_writes_the_kept_blocks_outputs(lr):
    block, inputs, targets, kwargs = _block_with_targets()
    outputs = MemoryActivations()
    before, after = finetune_block(block, inputs, targets, kwargs, epochs=3, lr=lr, outputs=outputs)
    assert (after < before) == (lr < 0.5), (before, after)
    with torch.no_grad():
        for j, kw in kwargs.items():
            out = block(inputs.get(j), **kw)
            assert torch.equal(outputs.get(j), out[0] if isinstance(out, tuple) else out)


def test_finetuning_on_some_batches_tunes_as_on_those_alone_and_outputs_all():
    """``tuned_batches``: the tuning is exactly the one on those batches alone (targets of the others are
    never read), and every batch's output comes from the tuned block."""
    block, inputs, targets, kwargs = _block_with_targets(batches=3)
    alone = {k: v.clone() for k, v in block.state_dict().items()}
    twin, _, _, _ = _block_with_targets(batches=3)
    twin.load_state_dict(alone)
    some = MemoryActivations()
    for j in (0, 2):
        some.put(j, targets.get(j))
    outputs = MemoryActivations()
    got = finetune_block(block, inputs, some, kwargs, epochs=2, lr=1e-2, outputs=outputs, tuned_batches=[0, 2])
    want = finetune_block(twin, inputs, targets, {j: kwargs[j] for j in (0, 2)}, epochs=2, lr=1e-2)
    assert got == want and got[1] < got[0]
    for (k, a), (k2, b) in zip(block.state_dict().items(), twin.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    with torch.no_grad():
        for j, kw in kwargs.items():
            out = block(inputs.get(j), **kw)
            assert torch.equal(outputs.get(j), out[0] if isinstance(out, tuple) else out), j


@pytest.mark.parametrize("target", ["block", "model"])
@pytest.mark.parametrize("n", [0, 3, 20])
def test_finetune_sequences_tunes_on_a_prefix_of_the_calibration(calib_ids, monkeypatch, n, target):
    """``finetune_sequences``: block fine-tuning uses the batches holding the first ``n`` sequences (whole
    batches), the Hessians and the next blocks' inputs every batch; 0, or ``n`` past the calibration: all."""
    import rvqllm.pipeline as P

    seen, real = [], P.finetune_block

    def spy(block, inputs, targets, kwargs, **kw):
        seen.append((sorted(kwargs), kw["tuned_batches"]))
        return real(block, inputs, targets, kwargs, **kw)

    monkeypatch.setattr(P, "finetune_block", spy)
    cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3, finetune_epochs=1,
                           calib_batch_size=2, finetune_sequences=n, finetune_target=target)
    report = rvqllm.quantize(tiny_llama(), cfg, calib_ids)
    everything = list(range(calib_ids.shape[0] // 2))
    assert seen == [(everything, everything if n in (0, 20) else [0, 1])] * 2
    assert all(b["error_after"] <= b["error_before"] for b in report.blocks.values())


def test_finetuning_in_bfloat16_lowers_the_error_like_float32():
    """``autocast=torch.bfloat16``: the steps multiply in bf16, the kept values and the reported errors are
    float32 measurements (the same as a fresh evaluation), and the gain is about float32's."""
    from rvqllm.finetune import _relative_error

    block, inputs, targets, kwargs = _block_with_targets()
    twin, _, _, _ = _block_with_targets()
    twin.load_state_dict(block.state_dict())
    before, after = finetune_block(block, inputs, targets, kwargs, epochs=20, lr=1e-2, autocast=torch.bfloat16)
    before32, after32 = finetune_block(twin, inputs, targets, kwargs, epochs=20, lr=1e-2)
    assert before == before32 and after < 0.8 * before
    assert after == pytest.approx(after32, rel=0.1) and after != after32  # bf16 steps: not the same path
    assert after == pytest.approx(_relative_error(block, inputs, targets, kwargs), rel=1e-6)
    assert all(p.dtype == torch.float32 for p in block.parameters())


def test_bfloat16_tuning_where_it_is_emulated_says_so_once(monkeypatch):
    import rvqllm.finetune as F

    monkeypatch.setattr(F, "native_bf16", lambda device: False)
    monkeypatch.setattr("rvqllm.kernels.cpu_build._warned", set())
    block, inputs, targets, kwargs = _block_with_targets()
    with pytest.warns(UserWarning, match="no native torch.bfloat16 arithmetic.*tune_dtype: float32") as seen:
        finetune_block(block, inputs, targets, kwargs, epochs=2, lr=1e-2, autocast=torch.bfloat16)
    assert sum("bfloat16" in str(w.message) for w in seen) == 1


def test_tune_dtype_reaches_the_tuning(calib_ids, monkeypatch):
    import rvqllm.pipeline as P

    seen, real_ft, real_d = [], P.finetune_block, P.distill_model

    def ft(*a, **kw):
        seen.append(("block", kw["autocast"]))
        return real_ft(*a, **kw)

    def distil(*a, **kw):
        seen.append(("model", kw["autocast"]))
        return real_d(*a, **kw)

    monkeypatch.setattr(P, "finetune_block", ft)
    monkeypatch.setattr(P, "distill_model", distil)
    for dtype, native, want in (("bfloat16", True, torch.bfloat16), ("float32", True, None),
                                ("auto", True, torch.bfloat16), ("auto", False, None)):
        seen.clear()
        monkeypatch.setattr(P, "native_bf16", lambda device, native=native: native)
        monkeypatch.setattr("rvqllm.kernels.cpu_build._warned", set())
        cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3, finetune_epochs=1, distill_epochs=1,
                               calib_batch_size=4, tune_dtype=dtype)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            rvqllm.quantize(tiny_llama(), cfg, calib_ids)
        assert seen == [("block", want), ("block", want), ("model", want)]
        fell_back = [w for w in said if "tune_dtype auto" in str(w.message)]
        assert len(fell_back) == (dtype == "auto" and not native), fell_back  # once per run, not per block
    with pytest.raises(rvqllm.RVQError, match="tune_dtype='fp16' is unknown"):
        rvqllm.RVQConfig(tune_dtype="fp16")


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
    assert all(b["finetune_attempts"] == 1 and b["finetune_lr"] == cfg.finetune_lr for b in report.blocks.values())
    assert [b["finetune_kept"] for b in report.blocks.values()] == [b["error_after"] < b["error_before"]
                                                                  for b in report.blocks.values()]
    out = rvqllm.save(model, tmp_path / "q")
    loaded = rvqllm.load(out)
    ids = calib_ids[:2]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("target", ["block", "model", "distil a prefix", "tune a prefix"])
def test_resume_with_finetuning_is_bit_identical(calib_ids, tmp_path, target):
    if target == "distil a prefix":  # the float model followed on the distilled batches only, on disk
        cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=4, distill_epochs=1, distill_sequences=3,
                               calib_batch_size=2, kmeans_iters=3)
    elif target == "tune a prefix":  # ... on the fine-tuned ones and the distilled ones (not the same)
        cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=4, distill_epochs=1, distill_sequences=2,
                               finetune_epochs=1, finetune_target="model", finetune_sequences=5,
                               calib_batch_size=2, kmeans_iters=3)
    else:
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
    assert _relative_error(qblocks[1], store_in, store_fp, {0: inp.kwargs}) == pytest.approx(
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
    with torch.no_grad():  # what the model now computes is what it reports (stored precision), on the
        kl = float(_topk_kl(model(input_ids=batches[0]).logits, teacher[0]))  # first EVAL_SEQUENCES (4) sequences
    assert kl == pytest.approx(after, rel=1e-5)
    loaded = rvqllm.load(rvqllm.save(model, tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(loaded(calib_ids[:2]).logits, model(calib_ids[:2]).logits)


def test_layers_sharing_one_codebook_tensor_are_tuned_as_one(calib_ids):
    """Codebooks shared by several layers (one tensor behind every layer's buffer): distillation gives
    them one parameter, so the shared codebook moves once, with every layer's gradient, and every layer
    still holds that one tensor afterwards (not a per-layer copy tuned apart); the KL still falls."""
    from rvqllm.finetune import distill_model, teacher_topk

    float_model = tiny_llama()
    batches = [calib_ids[:4], calib_ids[4:]]
    teacher = teacher_topk(float_model, batches, k=16)
    model = tiny_llama()
    rvqllm.quantize(model, rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3), calib_ids)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    shared = layers[0].codebooks.clone()
    for m in layers:
        m.codebooks = shared
    start = shared.clone()
    from rvqllm.finetune import _share_codebooks, _TrainableRVQ

    own = QuantizedLinear.from_rvq(quantize_weight(torch.randn(8, 16), None, vector_dim=8, stages=1, bits=3), 3, None)
    wrappers = {m: _TrainableRVQ(m) for m in [*layers, own]}
    _share_codebooks(wrappers)
    assert len({id(wrappers[m].codebooks) for m in layers}) == 1  # one parameter for the shared tensor
    assert wrappers[own].codebooks is not wrappers[layers[0]].codebooks
    before, after = distill_model(model, list(model.model.layers), batches, teacher, epochs=10, lr=3e-3,
                                  micro_batch=2, storage_dtype=torch.float16)
    assert after < before, (before, after)
    assert all(m.codebooks is shared for m in layers)
    assert not torch.equal(shared, start)  # tuned, in the one tensor


def test_codes_move_during_distillation_and_the_model_is_what_is_saved(calib_ids, tmp_path):
    from rvqllm.finetune import _topk_kl, distill_model, teacher_topk

    float_model = tiny_llama()
    batches = [calib_ids[:4], calib_ids[4:]]
    teacher = teacher_topk(float_model, batches, k=16)
    results = {}
    for fraction in (0.0, 0.05):
        model = tiny_llama()
        rvqllm.quantize(model, rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3), calib_ids)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        coded = {n: m.codes.clone() for n, m in layers.items()}
        stats: dict = {}
        before, after = distill_model(model, list(model.model.layers), batches, teacher, epochs=10, lr=3e-3,
                                      micro_batch=2, storage_dtype=torch.float16, code_fraction=fraction,
                                      code_every=2, code_lr=0.1, stats=stats)
        changed = sum(int((m.codes != coded[n]).any(-1).sum()) for n, m in layers.items())
        groups = sum(c[..., 0].numel() for c in coded.values())
        results[fraction] = (before, after, changed / groups, stats)
        with torch.no_grad():
            kl = float(_topk_kl(model(input_ids=batches[0]).logits, teacher[0]))
        assert kl == pytest.approx(after, rel=1e-5)  # the kept state (codes included) is what is measured
        loaded = rvqllm.load(rvqllm.save(model, tmp_path / f"q{fraction}"))
        with torch.no_grad():
            assert torch.equal(loaded(calib_ids[:2]).logits, model(calib_ids[:2]).logits)
    frozen, moving = results[0.0], results[0.05]
    assert frozen[2] == 0 and frozen[3] == {}
    # 10 epochs x 4 steps (8 sequences, 2 per step), an update every 2: 20 of at most 5% of the groups each
    assert moving[3]["code_updates"] == 20 and 0 < moving[3]["recoded"] <= 20 * 0.05 * sum(
        m.codes[..., 0].numel() for m in model.modules() if isinstance(m, QuantizedLinear))
    assert moving[2] == pytest.approx(moving[3]["codes_changed"]) and moving[2] > 0
    assert len(moving[3]["loss_per_epoch"]) == 10 and moving[3]["loss_per_epoch"][-1] < moving[0]
    assert moving[1] < 0.9 * frozen[1]  # on this toy, moving codes lower the KL well below frozen ones


def test_recode_moves_a_group_to_the_code_nearest_its_shadow():
    from rvqllm.finetune import _TrainableRVQ

    torch.manual_seed(0)
    q = quantize_weight(torch.randn(4, 16), None, vector_dim=4, stages=2, bits=3, seed=0)
    layer = QuantizedLinear.from_rvq(q, 3, None)
    w = _TrainableRVQ(layer, shadow=True)
    codes = layer.codes.clone()
    with torch.no_grad():
        target = w.codebooks[0, 5] + w.codebooks[1, 2]  # exactly a code's vector
        w.shadow[3] = target  # group 3 = row 0, group 3
        w.shadow[6] += 1e-4  # a small move elsewhere: farther groups go first
    assert w.recode(1 / 16, None) == 1  # one group of 16: the one that moved most
    assert layer.codes[0, 3].tolist() == [5, 2]
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[0, 3] = False
    assert torch.equal(layer.codes[mask], codes[mask])
    assert w.recode(1 / 16, None) == 0  # already nearest: nothing changes


def test_topk_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    from rvqllm.finetune import _topk_kl

    logits = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(0))
    teacher = torch.log_softmax(logits, -1).topk(8, dim=-1)
    assert float(_topk_kl(logits, tuple(teacher))) == pytest.approx(0.0, abs=1e-6)
    assert float(_topk_kl(logits.flip(-1), tuple(teacher))) > 0.1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pipeline_distillation_reports_and_keeps_improvement(calib_ids, dtype):
    model = tiny_llama()
    cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3, distill_epochs=3, distill_lr=3e-3,
                           calib_batch_size=4, tune_dtype=dtype)
    report = rvqllm.quantize(model, cfg, calib_ids)
    assert report.distill["kl_after"] < report.distill["kl_before"]


def test_distill_rate_follows_the_code_bits_per_weight():
    """``distill_lr: auto``: 1e-3 at 2 bits per weight, a factor sqrt(10) less per extra bit, held to 1..8 bits."""
    from rvqllm.finetune import code_bits_per_weight, distill_rate

    assert distill_rate(2.0) == pytest.approx(1e-3)
    assert distill_rate(3.0) == pytest.approx(1e-3 / 10 ** 0.5)
    assert distill_rate(4.0) == pytest.approx(1e-4)
    assert distill_rate(0.25) == distill_rate(1.0) and distill_rate(16.0) == distill_rate(8.0)
    specs = {"a": {"in_features": 64, "out_features": 32, "vector_dim": 8, "stages": 2, "bits": 8},  # 2 bits
             "b": {"in_features": 64, "out_features": 96, "vector_dim": 4, "stages": 2, "bits": 8}}  # 4 bits
    assert code_bits_per_weight(specs) == pytest.approx((2 * 32 + 4 * 96) / 128)


@pytest.mark.parametrize(("lr", "want"), [("auto", 1e-3 * 10 ** 0.5), (3e-3, 3e-3)])
def test_pipeline_distillation_uses_the_configured_or_derived_rate(calib_ids, monkeypatch, lr, want):
    """The rate reaches the distillation: the config's number, or for "auto" the rule at the code's bits per
    weight (1 stage x 3 bits / 8 weights = 0.375, held to 1 bit); the report records it."""
    import rvqllm.pipeline as P

    seen, real = {}, P.distill_model

    def spy(*args, **kw):
        seen["lr"] = kw["lr"]
        return real(*args, **kw)

    monkeypatch.setattr(P, "distill_model", spy)
    cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3, distill_epochs=1, distill_lr=lr,
                           calib_batch_size=4)
    report = rvqllm.quantize(tiny_llama(), cfg, calib_ids)
    assert seen["lr"] == pytest.approx(want) and report.distill["lr"] == pytest.approx(want)


@pytest.mark.parametrize("n", [0, 3, 8, 20])
def test_distill_sequences_distils_on_a_prefix_of_the_calibration(calib_ids, monkeypatch, n):
    """``distill_sequences``: the Hessians see every calibration sequence, the distillation (and its teacher)
    only the first ``n`` (a batch cut where ``n`` ends inside it); 0, or ``n`` past the calibration: all."""
    import rvqllm.pipeline as P

    seen, real = {}, P.distill_model

    def spy(model, blocks, batches, teacher, **kw):
        seen["batches"] = [b.clone() for b in batches]
        seen["teacher"] = [t[0].shape[0] for t in teacher]
        return real(model, blocks, batches, teacher, **kw)

    monkeypatch.setattr(P, "distill_model", spy)
    cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3, distill_epochs=1, distill_lr=3e-3,
                           calib_batch_size=2, distill_sequences=n)
    rvqllm.quantize(tiny_llama(), cfg, calib_ids)
    used = torch.cat(seen["batches"])
    want = calib_ids if n in (0, 8, 20) else calib_ids[:n]
    assert torch.equal(used, want)
    assert seen["teacher"] == [b.shape[0] for b in seen["batches"]]


# ----------------------------------------------------------------- chunked distillation (memory bounded by chunks)
def _tiny(arch: str):
    import transformers as T

    dense = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    configs = {
        "llama": lambda: T.LlamaConfig(**dense, tie_word_embeddings=True),
        # a small cap, so that the soft-capping changes these tiny models' logits
        "gemma2": lambda: T.Gemma2Config(**dense, head_dim=16, sliding_window=32, final_logit_softcapping=0.5),
        "gemma3": lambda: T.Gemma3TextConfig(**dense, head_dim=16, sliding_window=32, final_logit_softcapping=0.5),
        "cohere": lambda: T.CohereConfig(**dense, logit_scale=0.3),
        "granite": lambda: T.GraniteConfig(**dense, logits_scaling=4.0),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
        "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=32),
    }
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(configs[arch]()).eval()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "cohere", "granite", "gpt2", "opt"])
def test_lm_head_fn_gives_the_models_logits_exactly(arch, calib_ids):
    from rvqllm.finetune import check_lm_head_fn, lm_head_fn

    model = _tiny(arch)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=calib_ids[:2], use_cache=False).last_hidden_state
        want = model(input_ids=calib_ids[:2]).logits
        assert torch.equal(lm_head_fn(model)(hidden), want)
        # the families with something after the LM head do need it (the test would not see a missing step)
        raw = model.get_output_embeddings()(hidden)
        assert torch.equal(raw, want) == (arch in ("llama", "gpt2", "opt"))
    check_lm_head_fn(model, calib_ids[:1, :8])


def test_check_lm_head_fn_refuses_a_head_that_misses_a_step(calib_ids):
    from rvqllm.finetune import check_lm_head_fn

    model = _tiny("gemma2")
    with pytest.raises(rvqllm.RVQError, match="distill_epochs=0"):
        check_lm_head_fn(model, calib_ids[:1, :8], model.get_output_embeddings())  # no soft-capping


def test_teacher_topk_in_chunks_equals_the_full_logits_topk(calib_ids):
    from rvqllm.finetune import teacher_topk, teacher_topk_from_hidden

    model = tiny_llama()
    batches = [calib_ids[:3], calib_ids[3:]]
    full = []
    with torch.no_grad():
        for ids in batches:
            full.append(torch.log_softmax(model(input_ids=ids).logits.float(), -1).topk(16, dim=-1))
    for chunk in (5, 32, 10_000):  # smaller than a sequence, one sequence, everything at once
        for (logp, idx), (f_logp, f_idx) in zip(teacher_topk(model, batches, k=16, chunk_tokens=chunk), full,
                                                strict=True):
            assert logp.dtype == torch.float32 and idx.dtype == torch.int64 and logp.shape == f_logp.shape
            assert torch.equal(idx, f_idx)
            torch.testing.assert_close(logp, f_logp, rtol=1e-6, atol=1e-6)
    hidden = torch.randn(2, 7, 64)
    head = model.get_output_embeddings()
    logp, idx = teacher_topk_from_hidden(hidden, head, k=4, chunk_tokens=3)
    want = torch.log_softmax(head(hidden).float(), -1).topk(4, dim=-1)
    assert torch.equal(idx, want.indices)
    torch.testing.assert_close(logp, want.values, rtol=1e-6, atol=1e-6)


def test_chunked_kl_and_its_gradient_equal_the_full_logits_ones(calib_ids):
    from rvqllm.finetune import _distill_kl, _topk_kl, lm_head_fn, teacher_topk

    ids = calib_ids[:3]  # 3 x 32 tokens in chunks of 5: chunks straddle sequences, the last one is short
    teacher = teacher_topk(_tiny("gemma2"), [ids], k=16)[0]  # soft-capped logits: the head is a function
    student = _tiny("gemma2")  # the same model with perturbed blocks
    with torch.no_grad():
        for p in student.model.layers.parameters():
            p.add_(0.2 * torch.randn_like(p))
    params = list(student.model.layers.parameters())

    head_calls = []

    def head(hidden):
        head_calls.append(hidden.shape[0])
        return lm_head_fn(student)(hidden)

    def loss_and_grads(chunk):
        student.zero_grad(set_to_none=True)
        head_calls.clear()
        if chunk is None:
            loss = _topk_kl(student(input_ids=ids).logits, teacher)
        else:
            loss = _distill_kl(student.get_decoder(), head, ids, *teacher, chunk)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    full, full_grads = loss_and_grads(None)
    assert float(full) > 1e-3
    for chunk in (5, 10_000):
        loss, grads = loss_and_grads(chunk)
        # every chunk's head forward, then again in backward every chunk's but the last one's
        chunks = [min(chunk, 96 - a) for a in range(0, 96, chunk)]
        assert head_calls == chunks + chunks[-2::-1], head_calls
        torch.testing.assert_close(loss, full, rtol=1e-5, atol=0)
        for g, fg in zip(grads, full_grads, strict=True):
            assert float(fg.abs().max()) > 0
            torch.testing.assert_close(g, fg, rtol=1e-4, atol=1e-5 * float(fg.abs().max()))
        with torch.no_grad():  # the evaluation path: no autograd, same chunks
            torch.testing.assert_close(
                _distill_kl(student.get_decoder(), lm_head_fn(student), ids, *teacher, chunk), full, rtol=1e-5, atol=0)


def test_distillation_in_chunks_matches_one_chunk_and_freezes_the_rest(calib_ids):
    from rvqllm.finetune import distill_model, teacher_topk

    batches = [calib_ids[:4], calib_ids[4:]]
    teacher = teacher_topk(tiny_llama(), batches, k=16)
    results = []
    for chunk in (5, 10_000):
        model = tiny_llama()
        rvqllm.quantize(model, rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3), calib_ids)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        results.append(distill_model(model, list(model.model.layers), batches, teacher, epochs=2, lr=3e-3,
                                     chunk_tokens=chunk))
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert model.lm_head.weight.grad is None, "the (tied) LM head gets no gradient"
    (b5, a5), (b1, a1) = results
    assert b5 == pytest.approx(b1, rel=1e-5) and a5 == pytest.approx(a1, rel=1e-3)
    assert a5 < b5


def test_distillation_recomputing_blocks_in_backward_tunes_the_same(calib_ids, monkeypatch):
    """Big models recompute each block in backward (bounded memory); small ones keep the activations: both
    give the same tuned model (up to float reassociation)."""
    import rvqllm.finetune as F

    batches = [calib_ids[:4], calib_ids[4:]]
    teacher = F.teacher_topk(tiny_llama(), batches, k=16)
    tuned, calls = [], []
    real = F._recomputed_in_backward
    monkeypatch.setattr(F, "_recomputed_in_backward", lambda blocks: calls.append(1) or real(blocks))
    for threshold in (0, 1 << 62):  # every model is "big" / none is
        monkeypatch.setattr(F, "RECOMPUTE_ABOVE_BYTES", threshold)
        model = tiny_llama()
        rvqllm.quantize(model, rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3), calib_ids)
        F.distill_model(model, list(model.model.layers), batches, teacher, epochs=2, lr=3e-3)
        tuned.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert calls == [1], "recomputed exactly when the decoded weights pass the threshold"
    for name, t in tuned[0].items():
        torch.testing.assert_close(tuned[1][name], t, rtol=1e-4, atol=1e-6)


def test_chunk_tokens_must_be_a_positive_integer(calib_ids):
    from rvqllm.finetune import distill_model, teacher_topk

    with pytest.raises(rvqllm.RVQError, match="distill_chunk_tokens"):
        rvqllm.RVQConfig(distill_chunk_tokens=0)
    assert rvqllm.RVQConfig().distill_chunk_tokens == 1024
    model = tiny_llama()
    with pytest.raises(rvqllm.RVQError, match="chunk_tokens"):
        teacher_topk(model, [calib_ids], chunk_tokens=0)
    with pytest.raises(rvqllm.RVQError, match="chunk_tokens"):
        distill_model(model, list(model.model.layers), [calib_ids], [], epochs=1, lr=1e-3, chunk_tokens=2.5)



def test_tuning_and_distillation_pieces_follow_the_tensors_device():
    """On the ``meta`` device (no data, but an op mixing it with a CPU tensor raises, as CUDA would) the
    trainable layer, the teacher's top-k and the chunked, checkpointed KL with its backward all stay on
    the device of their inputs, and a CPU teacher is moved there."""
    from rvqllm.finetune import _kl_sum, _TrainableRVQ, teacher_topk_from_hidden

    meta = torch.device("meta")
    q = quantize_weight(torch.randn(12, 16), None, vector_dim=8, stages=2, bits=3, seed=0)
    layer = QuantizedLinear.from_rvq(q, 3, torch.zeros(12)).to(meta)
    trainable = _TrainableRVQ(layer)
    assert all(t.device == meta for t in (*trainable.parameters(), *trainable.buffers()))
    trainable(torch.randn(2, 5, 16, device=meta)).sum().backward()
    assert trainable.codebooks.grad.device == meta and trainable.log_gain.grad.device == meta

    head = torch.nn.Linear(16, 50, bias=False, device=meta)
    hidden = torch.randn(2, 5, 16, device=meta, requires_grad=True)
    logp, idx = teacher_topk_from_hidden(hidden, head, k=4, chunk_tokens=3)
    assert logp.device == meta and idx.device == meta and logp.shape == (2, 5, 4) and idx.dtype == torch.int64
    t_logp = torch.log_softmax(torch.randn(2, 5, 50), -1).topk(4, dim=-1)  # on the CPU, as teacher_topk stores it
    loss = _kl_sum(hidden, head, t_logp.values, t_logp.indices, chunk_tokens=3)
    loss.backward()
    assert loss.device == meta and hidden.grad.device == meta

_MEMORY_CASE = r"""
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from rvqllm.finetune import distill_model, teacher_topk
from rvqllm.nn import QuantizedLinear
from rvqllm.rvq import quantize_weight

vocab, seqs, seq_len, chunk = (int(a) for a in sys.argv[1:5])
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=seq_len, tie_word_embeddings=True)
teacher_model, student = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
for parent in list(student.model.layers.modules()):
    for name, child in list(parent.named_children()):
        if isinstance(child, torch.nn.Linear):
            q = quantize_weight(child.weight, None, vector_dim=8, stages=1, bits=3, seed=0)
            setattr(parent, name, QuantizedLinear.from_rvq(q, 3, child.bias))
batches = [torch.randint(0, vocab, (seqs, seq_len), generator=torch.Generator().manual_seed(1))]

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
except OSError:
    print(json.dumps(None))
    sys.exit(0)
base = status("VmRSS")
teacher = teacher_topk(teacher_model, batches, k=64, chunk_tokens=chunk)
distill_model(student, list(student.model.layers), batches, teacher, epochs=1, lr=1e-3, micro_batch=seqs,
              chunk_tokens=chunk)
print(json.dumps(status("VmHWM") - base))
"""


@pytest.mark.integration
def test_distillation_memory_is_bounded_by_the_chunk_not_by_vocab_times_tokens():
    """A 200k vocabulary and 512 tokens per Adam step: the full logits of one step would be 391 MiB (and
    the former code held ~3 copies: 1.2 GB peak above the models). With 16-token chunks the teacher pass and
    the distillation together must stay under half of one such copy (measured: ~80 MiB)."""
    import json
    import os
    import subprocess
    import sys

    vocab, seqs, seq_len, chunk = 200_000, 8, 64, 16
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _MEMORY_CASE, str(vocab), str(seqs), str(seq_len), str(chunk)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak = json.loads(run.stdout.strip().splitlines()[-1])
    if peak is None:
        pytest.skip("no /proc/self/clear_refs: cannot reset the peak resident size here")
    full_logits = seqs * seq_len * vocab * 4
    assert peak < full_logits / 2, (f"peak {peak / 2**20:.0f} MiB above the models, "
                                    f"{peak / (chunk * vocab * 4):.1f} chunk-sized copies")


def test_distillation_teacher_is_checked_against_the_models_own_logits(calib_ids, monkeypatch):
    """The teacher comes from the last block's outputs through the model's own post-block code and the
    head of :func:`lm_head_fn`; a head that misses a step (here Gemma 2's soft-capping) is refused with one
    line before any tuning, and the right one passes (the model distils)."""
    import rvqllm.pipeline as pipeline

    cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=4, beam_width=1, kmeans_iters=2, calib_batch_size=4,
                           distill_epochs=1)
    rvqllm.quantize(_tiny("gemma2"), cfg, calib_ids)
    monkeypatch.setattr(pipeline, "lm_head_fn", lambda model: model.get_output_embeddings())
    with pytest.raises(rvqllm.RVQError, match="distill_epochs=0"):
        rvqllm.quantize(_tiny("gemma2"), cfg, calib_ids)


class _Kill(BaseException):
    """Stands in for a kill inside the process."""


@pytest.mark.parametrize("when", ["writing the distilled shards", "renaming them"])
def test_a_kill_during_the_distilled_commit_resumes_to_the_same_model(calib_ids, tmp_path, monkeypatch, when):
    """Distillation rewrites every block's shard at the end: all or nothing. Killed while the new shards are
    written (before the commit point), the resumed run distils again from the committed blocks and the
    teacher on disk; killed after it (while renaming), it finishes the renames and skips distillation.
    Either way the model equals an uninterrupted run's."""
    from rvqllm import resume

    cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=4, beam_width=1, kmeans_iters=2, calib_batch_size=4,
                           distill_epochs=1)
    whole = tiny_llama()
    rvqllm.quantize(whole, cfg, calib_ids)
    target = "write_json_atomic" if when.startswith("writing") else "_atomic_replace"
    real = getattr(resume, target)

    def killed(path, other):  # write_json_atomic(path, data) / _atomic_replace(tmp, final)
        if (isinstance(other, dict) and other.get("distilled")) or str(path).endswith(".distilled"):
            raise _Kill
        return real(path, other)

    monkeypatch.setattr(resume, target, killed)
    with pytest.raises(_Kill):
        rvqllm.quantize(tiny_llama(), cfg, calib_ids, run_dir=tmp_path / "run")
    monkeypatch.setattr(resume, target, real)
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress == {"blocks_done": 2, "distilled": when == "renaming them"}
    resumed = tiny_llama()
    report = rvqllm.quantize(resumed, cfg, calib_ids, run_dir=tmp_path / "run", resume=True)
    assert bool(report.distill) == (when.startswith("writing"))
    for (n, a), (m, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b), n


def _distill_rates(calib_ids, monkeypatch, epochs: int, **schedule) -> tuple[list[list[float]], float, float]:
    """Distil a 3-bit tiny model over 8 sequences (micro-batch 2: 4 steps per epoch) at 3e-3 with ``schedule``;
    the learning rates of each Adam step's parameter groups, read off the optimizer, and the KL before / after."""
    from rvqllm.finetune import distill_model, teacher_topk

    batches = [calib_ids[:4], calib_ids[4:]]
    teacher = teacher_topk(tiny_llama(), batches, k=16)
    model = tiny_llama()
    rvqllm.quantize(model, rvqllm.RVQConfig(vector_dim=8, stages=1, bits=3, kmeans_iters=3), calib_ids)
    seen, real_step = [], torch.optim.Adam.step

    def step(self, *a, **k):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    before, after = distill_model(model, list(model.model.layers), batches, teacher, epochs=epochs, lr=3e-3,
                                  micro_batch=2, **schedule)
    return seen, before, after


@pytest.mark.parametrize("epochs", [1, 3])
def test_lr_decay_keeps_the_first_epoch_and_then_decays_along_a_cosine(calib_ids, monkeypatch, epochs):
    """``lr_decay``: every Adam step of the first epoch at the full rate; the later epochs from the full
    rate down to near zero along ``0.5 (1 + cos(pi t / T))``; one epoch stays constant. The schedule is
    read off the optimizer at each step; the decayed run still lowers the KL."""
    import math

    seen, before, after = _distill_rates(calib_ids, monkeypatch, epochs, lr_decay=True)
    assert len(seen) == 4 * epochs
    assert all(lrs == [3e-3, 3e-3] for lrs in seen[:4])
    decay = [lrs[0] for lrs in seen[4:]]
    total = 4 * (epochs - 1)
    assert decay == pytest.approx([3e-3 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)])
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False)) and (not decay or decay[-1] < 3e-4)
    assert all(lrs[0] == lrs[1] for lrs in seen)  # every parameter group follows the same schedule
    assert after < before


@pytest.mark.parametrize(("epochs", "tail"), [(1, 1.0), (1, 0.5), (2, 0.25)])
def test_lr_tail_decays_the_last_share_of_all_steps(calib_ids, monkeypatch, epochs, tail):
    """``lr_tail``: the steps before the last ``tail`` share of all steps (across epochs) at the full rate,
    the tail from the full rate towards zero along ``0.5 (1 + cos(pi t / n))``, within one epoch too (which
    ``lr_decay`` cannot do). The rates are read off the optimizer at each step."""
    import math

    seen, before, after = _distill_rates(calib_ids, monkeypatch, epochs, lr_tail=tail)
    total = 4 * epochs
    flat = total - round(tail * total)
    assert len(seen) == total
    assert all(lrs == [3e-3, 3e-3] for lrs in seen[:flat])
    n = total - flat
    assert [lrs[0] for lrs in seen[flat:]] == pytest.approx(
        [3e-3 * 0.5 * (1 + math.cos(math.pi * t / n)) for t in range(n)])
    assert seen[-1][0] <= 3e-3 * 0.5  # really decayed by the last step
    assert all(lrs[0] == lrs[1] for lrs in seen)
    assert after < before


@pytest.mark.parametrize(("fields", "message"), [
    ({"distill_lr_tail": 1.5}, "distill_lr_tail=1.5 is out of range"),
    ({"distill_lr_tail": True}, "distill_lr_tail=True is out of range"),
    ({"distill_lr_tail": 0.3, "distill_lr_decay": True}, "two schedules: set one of them"),
])
def test_lr_tail_config_errors_name_the_fix(fields, message):
    with pytest.raises(rvqllm.RVQError, match=message):
        rvqllm.RVQConfig(**fields)
