"""The round-to-nearest floor (rvqllm.baselines): exact on representable grids, counted as PEERS.md counts."""

import pytest
import torch

from rvqllm.baselines import rtn_bits, rtn_quantize_, rtn_roundtrip
from tests.conftest import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.unit


def test_values_on_the_grid_are_exact_and_error_is_half_a_step():
    torch.manual_seed(0)
    grid = torch.randint(0, 4, (6, 256)).float() * 0.5 - 1.0  # 2-bit levels -1, -0.5, 0, 0.5 (exact in fp16)
    grid[:, 0], grid[:, 1] = -1.0, 0.5  # every group spans the whole grid
    grid[:, 128], grid[:, 129] = -1.0, 0.5
    assert torch.equal(rtn_roundtrip(grid, 2, 128), grid)
    w = torch.randn(8, 300)  # 300 = 2 full groups + a short one
    rec = rtn_roundtrip(w, 3, 128)
    assert rec.shape == w.shape
    for g0, g1 in ((0, 128), (128, 256), (256, 300)):
        step = (w[:, g0:g1].amax(1) - w[:, g0:g1].amin(1)) / 7
        assert ((rec[:, g0:g1] - w[:, g0:g1]).abs() <= step[:, None] * 0.5 + 2e-3).all()
        assert all(row.unique().numel() <= 8 for row in rec[:, g0:g1])  # 3 bits: at most 8 levels a group


def test_constant_group_is_kept():
    w = torch.full((2, 128), 0.25)
    assert torch.equal(rtn_roundtrip(w, 2), w)


def test_bits_count_partial_groups_like_peers():
    # 576-wide rows need 5 groups of 128: 2-bit costs 2 + 5*32/576 bits per weight
    assert rtn_bits(576, 576, 2) / (576 * 576) == pytest.approx(2 + 5 * 32 / 576)
    assert rtn_bits(576, 1536, 3) / (576 * 1536) == pytest.approx(3.25)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_rtn_quantize_touches_block_linears_only(build):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = rtn_quantize_(model, 4, 32)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert info["layers"] > 0 and changed
    assert all(".weight" in k and ("layers." in k or ".h." in k) for k in changed), changed
    assert info["bpw"] == pytest.approx(4 + 32 / 32)
