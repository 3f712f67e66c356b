"""Mixed precision (rvqllm.mixed): the budget holds, and bits go where the loss is most sensitive."""

import json

import pytest
import torch

import rvqllm
from rvqllm.arch import find_blocks, find_linears
from rvqllm.calibration import capture_block_inputs
from rvqllm.errors import RVQError
from rvqllm.mixed import allocate, blockwise_sensitivity, fisher_sensitivity
from rvqllm.resume import MemoryActivations
from rvqllm.size import summarize
from rvqllm.source import MemorySource
from tests.conftest import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.unit

LOW = {"vector_dim": 8, "stages": 1, "bits": 8}
HIGH = {"vector_dim": 8, "stages": 2, "bits": 8}


def _bpw(plan, shapes):
    specs = {n: {"out_features": o, "in_features": i, **plan[n]} for n, (o, i) in shapes.items()}
    return summarize(specs)["bpw"]


def test_allocation_respects_the_budget_and_favours_sensitive_layers():
    shapes = {f"l{i}": (512, 512) for i in range(6)}
    sens = {f"l{i}": float(10 ** i) for i in range(6)}
    low_bpw = _bpw(dict.fromkeys(shapes, LOW), shapes)
    high_bpw = _bpw(dict.fromkeys(shapes, HIGH), shapes)
    budget = (low_bpw + high_bpw) / 2
    plan = allocate(shapes, sens, [HIGH, LOW], budget)
    assert _bpw(plan, shapes) <= budget
    upgraded = [n for n in shapes if plan[n] == HIGH]
    assert upgraded == ["l3", "l4", "l5"]  # half the layers fit: the three most sensitive
    assert allocate(shapes, sens, [LOW, HIGH], high_bpw + 1) == dict.fromkeys(shapes, HIGH)


def test_budget_below_the_cheapest_candidate_is_a_clear_error():
    shapes = {"a": (64, 64)}
    with pytest.raises(RVQError, match="bpw_budget=0.5 is below"):
        allocate(shapes, {"a": 1.0}, [LOW], 0.5)


def test_fisher_sensitivity_is_zero_exactly_where_the_loss_cannot_see_the_layer():
    model = tiny_llama()
    prefix, blocks = find_blocks(model)
    layers = {n: m for i, b in enumerate(blocks) for n, m in find_linears(b, f"{prefix}.{i}", ["lm_head"]).items()}
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = fisher_sensitivity(model, layers, [ids])
    assert all(v > 0 for v in base.values())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # a block whose attention output is cut (o_proj = 0): its q/k/v cannot affect the loss at all
    cut = f"{prefix}.1.self_attn"
    with torch.no_grad():
        layers[f"{cut}.o_proj"].weight.zero_()
    after = fisher_sensitivity(model, layers, [ids])
    dead = {f"{cut}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert all(after[n] == 0 for n in dead), {n: after[n] for n in dead}
    assert all(after[n] > 0 for n in after if n not in dead)


def _seeded(make):
    """A tiny model built under seed 0, its in-memory block source and its quantizable linears by name."""
    torch.manual_seed(0)
    model = make()
    source = MemorySource(model)
    layers = {n: m for i, b in enumerate(source.blocks)
              for n, m in find_linears(b, f"{source.prefix}.{i}", ["lm_head"]).items()}
    return model, source, layers


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_blockwise_sensitivity_equals_the_whole_model_measurement(make):
    """One block in memory at a time (forward storing each block's input, the model's own head and loss for
    the top gradient, then the blocks again in reverse) gives the whole-model Fisher sensitivity of every
    layer, whatever the backward's micro-batch (3 does not divide the batch of 4). GPT-2's Conv1D stores its
    weight transposed: the sum is the same either way."""
    model, source, layers = _seeded(make)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    want = fisher_sensitivity(model, layers, [ids])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    (inp,) = capture_block_inputs(model, source.blocks[0], [ids])
    for micro in (1, 3, 4):
        got = blockwise_sensitivity(model, source, ids, inp.hidden, inp.kwargs, torch.device("cpu"), ["lm_head"],
                                    MemoryActivations(), micro)
        assert list(got) == list(want)
        for n in want:
            assert got[n] == pytest.approx(want[n], rel=1e-4), (micro, n)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_sensitivity_squares_each_sequences_gradient_not_the_batch_mean():
    """The Fisher is the empirical one, summed over sequences: the block-by-block measurement of a batch is the
    sum of its sequences' measured one by one, and is not the square of the batch's mean gradient (the
    estimate before session 33, smaller and noisier)."""
    model, source, layers = _seeded(tiny_llama)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))

    def blockwise(x):
        (inp,) = capture_block_inputs(model, source.blocks[0], [x])
        return blockwise_sensitivity(model, source, x, inp.hidden, inp.kwargs, torch.device("cpu"), ["lm_head"],
                                     MemoryActivations(), 2)

    whole = blockwise(ids)
    parts = [blockwise(ids[i : i + 1]) for i in range(3)]
    for n in whole:
        assert whole[n] == pytest.approx(sum(p[n] for p in parts), rel=1e-4), n
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    mean_sq = {n: float((m.weight.grad * m.weight.detach()).pow(2).sum()) for n, m in layers.items()}
    model.zero_grad(set_to_none=True)
    # the squared mean gradient is (1/batch^2)|sum of gradients|^2, below the per-sequence sum for every layer here
    assert all(mean_sq[n] < whole[n] for n in whole), {n: (mean_sq[n], whole[n]) for n in whole}


@pytest.mark.parametrize("wanted, batch, sizes", [(3, 2, [2, 1]), (8, 4, [4, 4]), (100, 4, None)])
def test_the_sensitivity_pass_measures_the_first_sensitivity_sequences(calib_ids, monkeypatch, wanted, batch, sizes):
    """`sensitivity_sequences` calibration sequences (all when there are fewer) go through the pass, one
    calibration batch at a time, and the plan comes from the sum of the batches' sensitivities."""
    from rvqllm import pipeline

    seen = []
    real = pipeline.blockwise_sensitivity

    def recording(model, source, ids, *args):
        seen.append(ids.clone())
        return real(model, source, ids, *args)

    monkeypatch.setattr(pipeline, "blockwise_sensitivity", recording)
    shapes = _shapes(tiny_llama())
    budget = (_bpw(dict.fromkeys(shapes, LOW), shapes) + _bpw(dict.fromkeys(shapes, HIGH), shapes)) / 2
    cfg = rvqllm.RVQConfig(bpw_budget=budget, mixed_candidates=[LOW, HIGH], kmeans_iters=2, calib_batch_size=batch,
                           sensitivity_sequences=wanted)
    rvqllm.quantize(tiny_llama(), cfg, calib_ids)
    n = min(wanted, calib_ids.shape[0])
    assert [t.shape[0] for t in seen] == (sizes or [batch] * (n // batch) + ([n % batch] if n % batch else []))
    assert torch.equal(torch.cat(seen), calib_ids[:n])


def test_sensitivity_sequences_must_be_a_positive_integer():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(RVQError, match="sensitivity_sequences"):
            rvqllm.RVQConfig(sensitivity_sequences=bad)


def test_a_resumed_budget_run_reads_its_plan_instead_of_measuring_again(calib_ids, tmp_path, monkeypatch):
    """The plan is chosen once, kept in the run folder, and a resumed run uses it as kept: killed in block 1,
    resumed with the measurement made to fail, the model equals an uninterrupted run's."""
    from rvqllm import pipeline

    low, high = {**LOW, "bits": 4}, {**HIGH, "bits": 4}
    ref = tiny_llama()
    shapes = _shapes(ref)
    budget = (_bpw(dict.fromkeys(shapes, low), shapes) + _bpw(dict.fromkeys(shapes, high), shapes)) / 2
    cfg = rvqllm.RVQConfig(bpw_budget=budget, mixed_candidates=[low, high], kmeans_iters=2)
    rvqllm.quantize(ref, cfg, calib_ids)
    run = tmp_path / "run"

    class Kill(BaseException):
        pass

    def die_in_block_1(name, done, total):
        if name.startswith("model.layers.1."):
            raise Kill

    with pytest.raises(Kill):
        rvqllm.quantize(tiny_llama(), cfg, calib_ids, die_in_block_1, run_dir=run)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("sens")) == []  # the scratch store is gone
    plan = json.loads((run / "plan.json").read_text())
    assert plan == {n: {k: ref.rvq_layers[n][k] for k in ("vector_dim", "stages", "bits")} for n in shapes}
    assert {v["stages"] for v in plan.values()} == {1, 2}

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(pipeline, "blockwise_sensitivity", no_measuring)
    resumed = tiny_llama()
    rvqllm.quantize(resumed, cfg, calib_ids, run_dir=run, resume=True)
    for (n, a), (m, b) in zip(ref.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b), n
    (run / "plan.json").write_text("{}")
    with pytest.raises(RVQError, match="plan.json is damaged"):
        rvqllm.quantize(tiny_llama(), cfg, calib_ids, run_dir=run, resume=True)


def _shapes(model) -> dict[str, tuple[int, int]]:
    prefix, blocks = find_blocks(model)
    return {n: tuple(m.weight.shape) for i, b in enumerate(blocks)
            for n, m in find_linears(b, f"{prefix}.{i}", ["lm_head"]).items()}


def test_pipeline_with_a_budget_mixes_shapes_and_round_trips(calib_ids, tmp_path):
    model = tiny_llama()
    low, high = {**LOW, "bits": 4}, {**HIGH, "bits": 4}  # 16-entry codebooks: the tiny layers can afford both
    prefix, blocks = find_blocks(model)
    shapes = {n: tuple(m.weight.shape) for i, b in enumerate(blocks)
              for n, m in find_linears(b, f"{prefix}.{i}", ["lm_head"]).items()}
    budget = (_bpw(dict.fromkeys(shapes, low), shapes) + _bpw(dict.fromkeys(shapes, high), shapes)) / 2
    cfg = rvqllm.RVQConfig(bpw_budget=budget, mixed_candidates=[low, high], kmeans_iters=3)
    report = rvqllm.quantize(model, cfg, calib_ids)
    specs = model.rvq_layers
    used = {(s["vector_dim"], s["stages"], s["bits"]) for s in specs.values()}
    assert used == {(8, 1, 4), (8, 2, 4)}
    assert report.mixed["shapes"] == {f"d8 s{k} b4": sum(s["stages"] == k for s in specs.values()) for k in (1, 2)}
    assert report.mixed["seconds"] > 0
    assert summarize(specs)["bpw"] <= budget
    loaded = rvqllm.load(rvqllm.save(model, tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(loaded(calib_ids[:2]).logits, model(calib_ids[:2]).logits)


def test_budget_without_candidates_is_refused():
    with pytest.raises(RVQError, match="mixed_candidates"):
        rvqllm.RVQConfig(bpw_budget=2.0)



# ------------------------------------------------------------------------------------------ layer_shapes
def test_layer_shapes_code_each_layer_at_its_shape_and_round_trip(calib_ids, tmp_path):
    """Fixed shapes by layer name (``layer_shapes``, no sensitivity pass): each layer is coded, stored and
    sized at the shape its name asks for, and the checkpoint decodes to the same logits."""
    model = tiny_llama()  # widths 64 (attention, gate/up inputs) and 96 (down_proj's)
    cfg = rvqllm.RVQConfig(bits=4, kmeans_iters=2, rotate=True,
                           layer_shapes={".k_proj": {"vector_dim": 4}, ".down_proj": {"vector_dim": 6, "stages": 1}})
    rvqllm.quantize(model, cfg, calib_ids)
    specs = model.rvq_layers
    assert len(specs) == 14
    for name, spec in specs.items():
        want = {"k_proj": (4, 2, 4), "down_proj": (6, 1, 4)}.get(name.rsplit(".", 1)[1], (8, 2, 4))
        assert (spec["vector_dim"], spec["stages"], spec["bits"]) == want, name
    uniform = {n: {**s, "vector_dim": 8, "stages": 2} for n, s in specs.items()}
    assert summarize(specs)["bpw"] != summarize(uniform)["bpw"]  # the size counts each layer's own shape
    loaded = rvqllm.load(rvqllm.save(model, tmp_path / "q"))
    assert {n: (s["vector_dim"], s["stages"]) for n, s in loaded.rvq_layers.items()} == \
        {n: (s["vector_dim"], s["stages"]) for n, s in specs.items()}
    with torch.no_grad():
        assert torch.equal(loaded(calib_ids[:2]).logits, model(calib_ids[:2]).logits)


def test_a_layer_shapes_key_no_layer_has_is_said_once(calib_ids):
    """A rule written for another architecture's names (GPT-2 has no ``k_proj``) changes nothing and is said
    once, naming the key and one of the model's layer names; the run goes on at the config's shape."""
    from rvqllm.kernels import cpu_build

    cpu_build._warned.discard("layer-shapes-['.k_proj']")
    model = tiny_gpt2()
    cfg = rvqllm.RVQConfig(bits=4, kmeans_iters=2, layer_shapes={".k_proj": {"vector_dim": 4}, "mlp.c_fc": {"stages": 1}})
    with pytest.warns(UserWarning, match=r"no layer of this model has '.k_proj' in its name \(e.g. transformer.h.0"):
        rvqllm.quantize(model, cfg, calib_ids)
    stages = {n.split(".", 3)[3]: s["stages"] for n, s in model.rvq_layers.items() if n.startswith("transformer.h.0.")}
    assert stages == {"attn.c_attn": 2, "attn.c_proj": 2, "mlp.c_fc": 1, "mlp.c_proj": 2}


def test_a_layer_shapes_vector_dim_that_fits_none_of_its_layers_is_refused(calib_ids):
    """Each vector_dim is checked against the widths of the layers that take it (``down_proj`` reads 96
    wide): 7 divides none of them and is refused before any coding, naming the widths and a fit."""
    model = tiny_llama()
    cfg = rvqllm.RVQConfig(bits=4, layer_shapes={".down_proj": {"vector_dim": 7}})
    with pytest.raises(RVQError, match=r"vector_dim=7 divides no layer's input width \(widths \[96\]\)"):
        rvqllm.quantize(model, cfg, calib_ids)
    assert not hasattr(model, "rvq_layers") or not model.rvq_layers


def test_the_disk_estimate_counts_each_layers_own_shape():
    """``rvqllm.size.estimate_run_bytes`` (the CLI's free-disk check) sizes a layer at its layer_shapes shape."""
    from rvqllm.size import estimate_run_bytes

    layers = {"b.0.self_attn.k_proj": (256, 512), "b.0.mlp.up_proj": (1024, 512)}
    base = rvqllm.RVQConfig()
    more = base.replace(layer_shapes={"up_proj": {"stages": 4}})
    same = base.replace(layer_shapes={"up_proj": {"stages": 2}})
    a, b, c = (estimate_run_bytes(layers, 0, x, tokens=64, hidden=512)["checkpoint"] for x in (base, more, same))
    assert c == a
    assert b - a == 1024 * 512 * 2 // 8 + 2 * 256 * 8 * 2  # two more 8-bit codes per 8 weights + two fp16 codebooks


def test_the_disk_estimate_counts_the_sensitivity_pass_of_a_budget():
    """With ``bpw_budget`` the run folder first keeps every block's input for one calibration batch (the
    streamed sensitivity pass): 80 blocks x 4,096 tokens x 512 wide in float32, 640 MiB, where the walk itself
    peaks at two blocks' inputs of all 16,384 tokens, 64 MiB."""
    from rvqllm.size import estimate_run_bytes

    layers = {"b.0.mlp.up_proj": (1024, 512)}
    plain = rvqllm.RVQConfig(calib_batch_size=8, calib_seq_len=512)
    budget = plain.replace(bpw_budget=2.2, mixed_candidates=[HIGH])
    a, b = (estimate_run_bytes(layers, 0, c, tokens=16_384, hidden=512, blocks=80)["run"] for c in (plain, budget))
    assert a == 2 * 16_384 * 512 * 4
    assert b == (80 * 4096 + 16_384) * 512 * 4


def test_an_auto_budget_with_vector_dims_that_pad_stays_at_the_uniform_size(calib_ids, tmp_path):
    """``bpw_budget: auto`` on power-of-two widths (64 and 128, like 4096 and 14336: 6 and 9 divide neither):
    layers zero-pad to a multiple of their vector length, the padded codes count against the budget, and the
    whole stays within what the config's own d 8 costs on every layer; the checkpoint round-trips."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=64)).eval()
    cands = [{"vector_dim": d, "stages": 2, "bits": 4} for d in (6, 8, 9)]
    cfg = rvqllm.RVQConfig(vector_dim=8, stages=2, bits=4, rotate=True, bpw_budget="auto", mixed_candidates=cands,
                           kmeans_iters=2)
    shapes = _shapes(model)
    uniform = _bpw(dict.fromkeys(shapes, {**cands[1], "hadamard_block": 1}), shapes)
    rvqllm.quantize(model, cfg, calib_ids)
    specs = model.rvq_layers
    assert summarize(specs)["bpw"] <= uniform
    assert {s["vector_dim"] for s in specs.values()} - {8}  # some layer took a vector length that pads
    loaded = rvqllm.load(rvqllm.save(model, tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(loaded(calib_ids[:2]).logits, model(calib_ids[:2]).logits)


@pytest.mark.parametrize("value", ["automatic", 0, -1.0, True])
def test_a_bad_budget_is_one_line(value):
    with pytest.raises(RVQError, match="must be a positive number of bits per weight, 'auto'"):
        rvqllm.RVQConfig(bpw_budget=value, mixed_candidates=[HIGH])
