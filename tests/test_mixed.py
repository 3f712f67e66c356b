"""Mixed precision (rvqllm.mixed): the budget holds, and bits go where the loss is most sensitive."""

import pytest
import torch

import rvqllm
from rvqllm.arch import find_blocks, find_linears
from rvqllm.errors import RVQError
from rvqllm.mixed import allocate, fisher_sensitivity
from rvqllm.size import summarize
from tests.conftest import tiny_llama

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


def test_pipeline_with_a_budget_mixes_shapes_and_round_trips(calib_ids, tmp_path):
    model = tiny_llama()
    low, high = {**LOW, "bits": 4}, {**HIGH, "bits": 4}  # 16-entry codebooks: the tiny layers can afford both
    prefix, blocks = find_blocks(model)
    shapes = {n: tuple(m.weight.shape) for i, b in enumerate(blocks)
              for n, m in find_linears(b, f"{prefix}.{i}", ["lm_head"]).items()}
    budget = (_bpw(dict.fromkeys(shapes, low), shapes) + _bpw(dict.fromkeys(shapes, high), shapes)) / 2
    cfg = rvqllm.RVQConfig(bpw_budget=budget, mixed_candidates=[low, high], kmeans_iters=3)
    rvqllm.quantize(model, cfg, calib_ids)
    specs = model.rvq_layers
    used = {(s["vector_dim"], s["stages"], s["bits"]) for s in specs.values()}
    assert used == {(8, 1, 4), (8, 2, 4)}
    assert summarize(specs)["bpw"] <= budget
    loaded = rvqllm.load(rvqllm.save(model, tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(loaded(calib_ids[:2]).logits, model(calib_ids[:2]).logits)


def test_budget_without_candidates_is_refused():
    with pytest.raises(RVQError, match="mixed_candidates"):
        rvqllm.RVQConfig(bpw_budget=2.0)

