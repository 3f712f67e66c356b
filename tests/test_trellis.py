"""The bitshift trellis code (rvqllm.rvq.trellis): walks obey the shift rule, Viterbi finds the best walk
(the compiled kernel and the torch path alike, with and without weights), on a Gaussian source it beats
the RVQ core's best figure, and as a layer coder (rvqllm.rvq.trellis_layer) its error feedback lowers the
layer's output error."""

import itertools

import pytest
import torch

from rvqllm.rvq import trellis

pytestmark = pytest.mark.unit


def test_codewords_are_computed_and_near_unit_gaussian():
    v = trellis.codewords(torch.arange(1 << 16))
    assert abs(float(v.mean())) < 0.01 and abs(float(v.var()) - 1.0) < 0.01
    assert torch.equal(v[1234:1240], trellis.codewords(torch.arange(1234, 1240)))  # a function of the state alone
    assert len(torch.unique(v)) > 900  # many distinct levels, not a small table


def _brute_force(x: torch.Tensor, wt: torch.Tensor, bits: int, step: int) -> list[float]:
    """Least weighted squared error of each row of ``x`` over every walk: a free first state, then
    ``step`` new bits per step."""
    mask, best = (1 << bits) - 1, []
    for row, w in zip(x, wt, strict=True):
        costs = []
        for first in range(1 << bits):
            for steps in itertools.product(range(1 << step), repeat=x.shape[1] - 1):
                s, walk = first, [first]
                for b in steps:
                    s = ((s << step) | b) & mask
                    walk.append(s)
                costs.append(float((w * (row - trellis.decode(torch.tensor(walk))).pow(2)).sum()))
        best.append(min(costs))
    return best


def test_table_codewords_index_by_hash_and_follow_the_gaussian():
    lut = trellis.gaussian_lut(5)
    assert lut.shape == (32,) and torch.all(lut[1:] > lut[:-1])  # sorted quantiles
    assert abs(float(lut.pow(2).mean()) - 1.0) < 1e-6 and abs(float(lut.mean())) < 1e-6
    idx = trellis.lut_index(torch.arange(1 << 12), 5)
    assert int(idx.min()) == 0 and int(idx.max()) == 31
    counts = torch.bincount(idx, minlength=32)  # the hash spreads the states over the table
    assert int(counts.min()) > 64 and int(counts.max()) < 192  # 128 each on average
    h = (torch.arange(1 << 12) * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
    assert torch.equal(idx, h >> 27)
    with pytest.raises(ValueError, match="lut_bits"):
        trellis.lut_index(idx, 0)


def _held_out_mse(table: torch.Tensor, L: int, k: int, Q: int) -> float:
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(99))
    values = trellis.packed_values(table, L, k, Q)
    return float((values[trellis.viterbi(x, L, k, values=values)] - x).pow(2).mean())


@pytest.mark.parametrize(("k", "gain"), [(2, 0.995), (3, 0.92), (4, 0.7)])
def test_trained_table_lowers_the_held_out_distortion(k, gain):
    start, trained = trellis.gaussian_lut(5), trellis.trained_lut(12, k, 5, 8)
    assert torch.equal(trellis.trained_lut(12, k, 5, 0), start)
    assert _held_out_mse(trained, 12, k, 5) < gain * _held_out_mse(start, 12, k, 5)
    assert float(trained.abs().max()) > float(start.abs().max())  # the walks want wider outer codewords
    again = trellis.trained_lut(12, k, 5, 8)
    assert torch.equal(again, trained) and again is not trained  # deterministic; callers get their own copy
    trained.zero_()
    assert torch.equal(trellis.trained_lut(12, k, 5, 8), again)  # the cache is not the caller's tensor


@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_viterbi_walk_obeys_the_shift_rule_and_is_optimal(path):
    from rvqllm.kernels.cpu_build import load_library

    if path == "compiled" and load_library() is None:
        pytest.skip("no C++ compiler: the compiled Viterbi cannot be built (said loudly by load_library)")
    run = trellis.viterbi if path == "compiled" else trellis.viterbi_torch
    bits, step, length = 4, 2, 5
    x = torch.randn(3, length, generator=torch.Generator().manual_seed(0))
    states = run(x, bits, step)
    mask = (1 << bits) - 1
    assert torch.equal((states[:, :-1] << step) & mask, states[:, 1:] & ~((1 << step) - 1) & mask)
    found = (x - trellis.decode(states)).pow(2).sum(1)
    assert torch.allclose(found, torch.tensor(_brute_force(x, torch.ones_like(x), bits, step)), atol=1e-5)
    wt = torch.rand(3, length, generator=torch.Generator().manual_seed(1)) * 4 + 0.1  # per-step weights
    found = (wt * (x - trellis.decode(run(x, bits, step, weights=wt))).pow(2)).sum(1)
    assert torch.allclose(found, torch.tensor(_brute_force(x, wt, bits, step)), atol=1e-5)
    with pytest.raises(ValueError, match="step_bits"):
        run(x, state_bits=2, step_bits=2)


def test_compiled_viterbi_matches_the_torch_path_on_long_walks():
    from rvqllm.kernels.cpu_build import load_library

    if load_library() is None:
        pytest.skip("no C++ compiler: the compiled Viterbi cannot be built (said loudly by load_library)")
    g = torch.Generator().manual_seed(2)
    x, wt = torch.randn(5, 300, generator=g), torch.rand(5, 300, generator=g) + 0.5
    for bits, step in ((10, 2), (9, 3), (8, 1)):
        a, b = trellis.viterbi(x, bits, step, 0.9, wt), trellis.viterbi_torch(x, bits, step, 0.9, wt)
        mask = (1 << bits) - 1
        assert torch.equal((a[:, :-1] << step) & mask, a[:, 1:] & ~((1 << step) - 1) & mask)
        cost_a = (wt * (x - trellis.decode(a, 0.9)).pow(2)).sum(1)
        cost_b = (wt * (x - trellis.decode(b, 0.9)).pow(2)).sum(1)
        assert torch.allclose(cost_a, cost_b, rtol=1e-5), (bits, step)


def _layer(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight and the Hessian of strongly correlated inputs (a few directions dominate)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * (torch.rand(out, 1, generator=g) + 0.5)
    mix = torch.randn(inp, inp, generator=g) * torch.logspace(0, -2, inp)[None, :]
    x = torch.randn(4 * inp, inp, generator=g) @ mix.T
    return w, (x.T @ x).double()


def _rel_error(w: torch.Tensor, h: torch.Tensor, recon: torch.Tensor) -> float:
    e = (recon - w).double()
    return float(torch.trace(e @ h @ e.T) / torch.trace(w.double() @ h @ w.double().T))


def test_trellis_layer_coder_feedback_lowers_the_output_error():
    from rvqllm.rvq.trellis_layer import quantize_weight_trellis

    w, h = _layer(48, 60, 3)  # 60 columns: padded to 64, rotated in one Hadamard block
    q = quantize_weight_trellis(w, h, state_bits=8, step_bits=2, damp=0.01)
    assert q.states.shape == (64, 48) and q.dequantize().shape == w.shape
    mask = 255
    assert torch.equal((q.states[:, :-1] << 2) & mask, q.states[:, 1:] & ~3 & mask)  # one walk per column
    assert q.code_bits() == 64 * (8 + 47 * 2) and q.bits() == q.code_bits() + 16 * 48 + 8 * 64
    fed = _rel_error(w, h, q.dequantize())
    # the diagonal of the same Hessian: U is diagonal, so no error reaches the later columns
    alone = _rel_error(w, h, quantize_weight_trellis(w, torch.diag(h.diagonal()), state_bits=8, damp=0.01)
                       .dequantize())
    assert fed < 0.5 * alone, (fed, alone)  # measured 0.030 against 0.111
    assert fed < 0.05


def test_gaussian_distortion_and_rate():
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(5))
    _, recon = trellis.quantize(x, state_bits=12, step_bits=2, rows_per_chunk=4)
    mse = float((x - recon).pow(2).mean())
    # measured 0.080 on this draw; the RVQ core's best is 0.087 held out (docs/RESULTS.md), the bound 0.0625
    assert 0.0625 < mse < 0.085
    assert trellis.rate(256, 12, 2) == (12 + 255 * 2) / 256
    with pytest.raises(ValueError, match="step_bits"):
        trellis.viterbi(x, state_bits=2, step_bits=2)


def test_bench_coders_packed_bpw_on_hand_made_specs():
    """scripts/bench_coders.py's packed-walk bit count (what docs/RESULTS.md "Session 20" reports as bpw)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_coders.py"
    spec = importlib.util.spec_from_file_location("bench_coders", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    specs = {"a": {"out_features": 4, "in_features": 8, "hadamard_block": 8},
             "b": {"out_features": 2, "in_features": 4}}
    # per column L bits then 2 per later row; 16 per row scale; 8 per rotation sign (rotated layers only)
    walks = 8 * (12 + 3 * 2) + 4 * (12 + 1 * 2)
    rest = 16 * (4 + 2) + 8 * 8
    shared = bench.packed_bpw(specs, 12, 2, None)  # the 4,096-entry table stored once
    assert shared["weights"] == 40 and shared["bpw"] == (walks + rest + 16 * 4096) / 40
    per_layer = bench.packed_bpw(specs, 12, 2, 5)  # a 32-entry table in every layer
    assert per_layer["bpw"] == (walks + rest + 2 * 16 * 32) / 40
    assert bench.parse_trellis("12:lut5") == (12, 5) and bench.parse_trellis("14") == (14, None)
