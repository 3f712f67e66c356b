"""Placement: batch split, layer ownership, env parsing (unit) and the collectives on 2 gloo ranks (integration).

The 2-rank tests spawn two CPU processes joined over 127.0.0.1 on a free port. One spawn runs every
scenario (module fixture) so the suite pays the process start-up once; every join has a deadline and
the process group a short timeout, so a dead rank fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from rvqllm.errors import RVQError
from rvqllm.nn import QuantizedLinear, TrellisLinear
from rvqllm.placement import (
    Placement,
    oom_errors,
    peak_device_mib,
    placement_from_env,
    reset_peak_device,
    resolve_device,
    shutdown,
)
from rvqllm.rvq import quantize_weight

CPU = torch.device("cpu")
JOIN_DEADLINE_S = 60.0  # per spawn: start-up of two interpreters plus the scenarios (a few seconds)
GROUP_TIMEOUT = timedelta(seconds=20)


# ---- unit: pure logic ---------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_my_batches_partitions_every_index_once(world):
    for n in range(10):
        parts = [Placement(CPU, rank=r, world=world).my_batches(n) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))  # contiguous, in rank order, each once
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)
        assert parts == [Placement(CPU, rank=r, world=world).my_batches(n) for r in range(world)]


@pytest.mark.unit
def test_my_batches_rejects_negative():
    with pytest.raises(ValueError):
        Placement(CPU).my_batches(-1)


SIZES = {  # a llama-like block: q/k/v share an input, gate/up share another
    "b.q": 64 * 64, "b.k": 64 * 16, "b.v": 64 * 16, "b.o": 64 * 64,
    "b.gate": 64 * 96, "b.up": 64 * 96, "b.down": 96 * 64,
}
GROUPS = [["b.q", "b.k", "b.v"], ["b.gate", "b.up"]]


@pytest.mark.unit
@pytest.mark.parametrize("world", [1, 2, 3, 4, 9])
def test_assign_keeps_groups_is_deterministic_and_balances(world):
    owners = Placement(CPU, rank=0, world=world).assign(GROUPS, SIZES)
    assert set(owners) == set(SIZES) and all(0 <= r < world for r in owners.values())
    for group in GROUPS:
        assert len({owners[n] for n in group}) == 1
    # every rank, and any order of the inputs, computes the same answer
    for rank in range(world):
        shuffled_sizes = dict(reversed(list(SIZES.items())))
        shuffled_groups = [list(reversed(g)) for g in reversed(GROUPS)]
        assert Placement(CPU, rank=rank, world=world).assign(shuffled_groups, shuffled_sizes) == owners
    loads = [sum(SIZES[n] for n, r in owners.items() if r == k) for k in range(world)]
    units = [sum(SIZES[n] for n in g) for g in GROUPS] + [SIZES["b.o"], SIZES["b.down"]]
    if world <= len(units):
        assert max(loads) - min(loads) <= max(units)  # LPT: no rank exceeds another by more than one unit
    else:
        assert sorted(loads, reverse=True)[: len(units)] == sorted(units, reverse=True)  # one unit each


@pytest.mark.unit
def test_assign_exact_lpt_and_tie_break_by_name():
    p = Placement(CPU, rank=0, world=2)
    # units, largest first: gate+up 12288 -> r0; down 6144 and q+k+v 6144 tie, "b.down" < "b.k": down -> r1,
    # then q/k/v -> r1 (6144 < 12288); o 4096: both ranks at 12288, the lowest rank wins -> r0
    owners = p.assign(GROUPS, SIZES)
    assert owners == {"b.gate": 0, "b.up": 0, "b.q": 1, "b.k": 1, "b.v": 1, "b.down": 1, "b.o": 0}
    assert p.assign([], {"x": 5, "a": 5}) == {"a": 0, "x": 1}  # equal sizes: by name


@pytest.mark.unit
def test_assign_rejects_bad_groups():
    p = Placement(CPU, rank=0, world=2)
    with pytest.raises(ValueError, match="two groups"):
        p.assign([["b.q", "b.k"], ["b.k", "b.v"]], SIZES)
    with pytest.raises(ValueError, match="no size"):
        p.assign([["b.q", "nope"]], SIZES)


@pytest.mark.unit
def test_placement_validates_rank():
    with pytest.raises(ValueError):
        Placement(CPU, rank=2, world=2)
    assert Placement("cpu").device == CPU and Placement(CPU).is_main and not Placement(CPU, 1, 2).is_main


def _layer(seed: int, *, bias_dtype: torch.dtype | None, rotate: bool = False) -> QuantizedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 10, generator=g)  # in=10: padded to 12 by vector_dim 4
    bias = torch.randn(12, generator=g).to(bias_dtype) if bias_dtype is not None else None
    q = quantize_weight(w, None, vector_dim=4, stages=2, bits=4, kmeans_iters=3, rotate=rotate, seed=seed)
    return QuantizedLinear.from_rvq(q, 4, bias)


def _trellis_layer(seed: int) -> TrellisLinear:
    from rvqllm.rvq import trellis
    from rvqllm.rvq.trellis_layer import quantize_weight_trellis

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 10, generator=g)
    table = trellis.gaussian_lut(5).half().float()
    q = quantize_weight_trellis(w, torch.eye(10), state_bits=8, pad_to=1, values=trellis.packed_values(table, 8, 2, 5))
    return TrellisLinear.from_trellis(q, table, 5, torch.randn(12, generator=g))


@pytest.mark.unit
def test_single_rank_collectives_are_no_ops():
    p = Placement(CPU)
    h = torch.eye(3, dtype=torch.float64)
    hessians, tokens = {"a": h, "b": h}, {"a": 7, "b": 7}
    p.reduce_hessians(hessians, tokens, {"a": 0, "b": 0})
    assert hessians == {"a": h, "b": h} and tokens == {"a": 7, "b": 7}
    layer = _layer(0, bias_dtype=None)
    assert p.broadcast_layer(layer, None, 0) is layer
    assert p.broadcast_layer(layer, layer.spec(), 0) is layer
    with pytest.raises(ValueError, match="does not describe"):
        p.broadcast_layer(layer, {**layer.spec(), "stages": 3}, 0)
    with pytest.raises(ValueError, match="must pass its layer"):
        p.broadcast_layer(None, None, 0)
    t = torch.ones(2)
    assert p.all_reduce_sum(t) is t and torch.equal(t, torch.ones(2))
    assert p.all_reduce_float(2.5) == 2.5
    param = nn.Parameter(torch.ones(2))
    p.all_reduce_grads([param])
    assert param.grad is None
    p.barrier()
    assert p.my_batches(3) == [0, 1, 2]


@pytest.mark.unit
def test_device_memory_helpers_on_cpu():
    assert peak_device_mib(CPU) is None and peak_device_mib("cpu") is None
    reset_peak_device("cpu")
    errors = oom_errors()
    assert torch.OutOfMemoryError in errors and len(set(errors)) == len(errors)
    try:
        raise torch.OutOfMemoryError("CUDA out of memory")
    except oom_errors() as err:
        assert "memory" in str(err)


# ---- unit: environment -------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


TWO_RANKS = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.unit
def test_env_single_process_without_torchrun_vars(no_cuda):
    p = placement_from_env("auto", env={})
    assert (p.device, p.rank, p.world, p.owns_group, p.is_main) == (CPU, 0, 1, False, True)
    assert placement_from_env("cpu", env={"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}).world == 1
    shutdown(p)  # nothing to tear down


@pytest.mark.unit
def test_env_cuda_without_cuda(no_cuda):
    for device in ("cuda", "cuda:0"):
        with pytest.raises(RVQError) as err:
            placement_from_env(device, env={})
        msg = _one_line(err)
        assert msg.startswith("CUDA is not available on this machine: ") and msg.endswith("pass --device cpu")


@pytest.mark.unit
def test_env_cuda_index_with_several_ranks():
    with pytest.raises(RVQError) as err:
        placement_from_env("cuda:1", env=TWO_RANKS)
    msg = _one_line(err)
    assert "LOCAL_RANK" in msg and "pass --device cuda" in msg


@pytest.mark.unit
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:", "tpu:0", "", "CPU0"])
def test_env_garbage_device(device):
    with pytest.raises(RVQError) as err:
        placement_from_env(device, env={})
    msg = _one_line(err)
    assert "'auto', 'cpu', 'cuda' or 'cuda:N'" in msg


@pytest.mark.unit
@pytest.mark.parametrize(("env", "needle"), [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "LOCAL_RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "MASTER_ADDR/MASTER_PORT"),
    ({**TWO_RANKS, "MASTER_PORT": "99999"}, "MASTER_PORT=99999"),
])
def test_env_bad_torchrun_values(env, needle):
    with pytest.raises(RVQError) as err:
        placement_from_env("cpu", env=env)
    assert needle in _one_line(err)


@pytest.mark.unit
def test_resolve_device_cpu_and_auto(no_cuda):
    assert resolve_device("cpu", world=4, local_rank=3) == CPU
    assert resolve_device("auto", world=4, local_rank=3) == CPU


@pytest.mark.unit
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resolve_device_cuda_follows_local_rank():
    assert resolve_device("cuda", world=2, local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:0", world=1) == torch.device("cuda", 0)
    with pytest.raises(RVQError):
        resolve_device("cuda", world=2, local_rank=torch.cuda.device_count())


@pytest.mark.unit
def test_join_times_out_when_the_other_rank_never_comes():
    port = _free_port()
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    t0 = time.monotonic()
    with pytest.raises(RVQError) as err:
        placement_from_env("cpu", env=env, timeout=timedelta(seconds=2))
    assert "could not join" in _one_line(err)
    assert time.monotonic() - t0 < 30
    assert not torch.distributed.is_initialized()


# ---- integration: two gloo ranks ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, scenario, world: int, port: int, out_dir: str) -> None:
    """One rank: join the group through :func:`placement_from_env`, run ``scenario``, save its result."""
    torch.set_num_threads(1)
    env = {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    placement = placement_from_env("cpu", env=env, timeout=GROUP_TIMEOUT)
    try:
        assert placement.owns_group and placement.rank == rank and placement.world == world
        result = scenario(placement)
    finally:
        shutdown(placement)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _spawn(scenario, out_dir: Path, world: int = 2) -> list:
    """Run ``scenario(placement)`` on ``world`` ranks; their results, by rank. Fails (never hangs) when a
    rank dies or the deadline passes."""
    port = _free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(_entry, args=(scenario, world, port, str(out_dir)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + JOIN_DEADLINE_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            for proc in ctx.processes:
                proc.join(5)
            pytest.fail(f"the {world} ranks did not finish within {JOIN_DEADLINE_S:.0f}s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _base_hessian(name: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    return x @ x.T


def _rank1_dies(p: Placement) -> dict:
    """Rank 1 leaves before a collective; rank 0's collective must fail, not hang."""
    if p.rank == 1:
        return {}
    t0 = time.monotonic()
    try:
        p.all_reduce_float(1.0)
        p.barrier()
    except Exception as err:  # gloo reports a dead peer as one of several error types
        return {"raised": type(err).__name__, "seconds": time.monotonic() - t0}
    return {"raised": None, "seconds": time.monotonic() - t0}


def _scenarios(p: Placement) -> dict:
    """Everything the 2-rank tests check, in one process group (same call order on both ranks)."""
    out: dict = {"rank": p.rank, "is_main": p.is_main, "batches": p.my_batches(5)}

    # reduce_hessians: q/k/v share one tensor, gate/up another; rank r contributes (r + 1) * base and
    # 10 * (r + 1) tokens. "b.extra" exists on rank 0 only (rank 1 never ran it): rank 1 adds zeros.
    shared_attn, shared_mlp = _base_hessian("attn", 6) * (p.rank + 1), _base_hessian("mlp", 6) * (p.rank + 1)
    hessians = {"b.q": shared_attn, "b.k": shared_attn, "b.v": shared_attn, "b.gate": shared_mlp,
                "b.up": shared_mlp, "b.o": _base_hessian("b.o", 6) * (p.rank + 1),
                "b.down": _base_hessian("b.down", 9) * (p.rank + 1)}
    tokens = dict.fromkeys(hessians, 10 * (p.rank + 1))
    if p.rank == 0:
        hessians["b.extra"] = _base_hessian("b.extra", 4)
        tokens["b.extra"] = 3
    sizes = {**SIZES, "b.extra": 16}
    owners = p.assign(GROUPS, sizes)
    p.reduce_hessians(hessians, tokens, owners)
    out["owners"] = owners
    out["hessians"] = {n: h.clone() for n, h in hessians.items()}
    out["aliases"] = {n: [m for m in hessians if hessians[m] is hessians[n]] for n in hessians}
    out["tokens"] = dict(tokens)

    # broadcast_layer: rank 0 sends a plain layer; rank 1 a rotated one with a bfloat16 bias
    plain = p.broadcast_layer(_layer(1, bias_dtype=None) if p.rank == 0 else None, None, src=0)
    rotated = p.broadcast_layer(_layer(2, bias_dtype=torch.bfloat16, rotate=True) if p.rank == 1 else None,
                                None, src=1)
    trellis = p.broadcast_layer(_trellis_layer(3) if p.rank == 1 else None, None, src=1)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(5))
    for key, layer in (("plain", plain), ("rotated", rotated), ("trellis", trellis)):
        out[key] = {"spec": layer.spec(), "buffers": {n: b.clone() for n, b in layer.named_buffers()},
                    "forward": layer(x)}

    # all_reduce_grads: a None grad counts as zero; two dtypes
    a = nn.Parameter(torch.zeros(2, 3))
    b = nn.Parameter(torch.zeros(4))
    c = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    a.grad = torch.full((2, 3), float(p.rank + 1))
    if p.rank == 1:
        b.grad = torch.arange(4.0)
    c.grad = torch.tensor([1.0, 2.0], dtype=torch.float64) * (p.rank + 1)
    p.all_reduce_grads([a, b, c])
    out["grads"] = [a.grad.clone(), b.grad.clone(), c.grad.clone()]

    # the distillation's steps per epoch: the most micro-batches any rank has (rank 0: 2 + 2, rank 1: 1)
    from rvqllm.finetune import _steps_per_epoch

    mine = [torch.zeros(4, 8), torch.zeros(3, 8)] if p.rank == 0 else [torch.zeros(2, 8)]
    out["steps_per_epoch"] = _steps_per_epoch(mine, 2, p)

    t = torch.tensor([1.0, 2.0]) * (p.rank + 1)
    out["sum_is_same"] = p.all_reduce_sum(t) is t
    out["sum"] = t
    out["float"] = p.all_reduce_float(0.25 * (p.rank + 1))
    p.barrier()
    out["dead_peer"] = _rank1_dies(p)  # last: the group is unusable afterwards
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    t0 = time.monotonic()
    results = _spawn(_scenarios, tmp_path_factory.mktemp("ranks"))
    return results, time.monotonic() - t0


@pytest.mark.integration
def test_two_ranks_basics(two_ranks):
    (r0, r1), seconds = two_ranks
    assert seconds < 30
    assert (r0["rank"], r0["is_main"], r1["rank"], r1["is_main"]) == (0, True, 1, False)
    assert (r0["batches"], r1["batches"]) == ([0, 1, 2], [3, 4])


@pytest.mark.integration
def test_every_rank_counts_the_same_distillation_steps(two_ranks):
    """``distill_lr_tail`` schedules by the total step count: every rank must see the largest one, or the
    ranks would step the same parameters at different rates."""
    (r0, r1), _ = two_ranks
    assert r0["steps_per_epoch"] == r1["steps_per_epoch"] == 4


@pytest.mark.integration
def test_reduce_hessians_sums_onto_the_owner_once(two_ranks):
    (r0, r1), _ = two_ranks
    owners = r0["owners"]
    assert owners == r1["owners"]
    assert set(r0["hessians"]) | set(r1["hessians"]) == set(owners)
    assert not set(r0["hessians"]) & set(r1["hessians"])  # non-owners dropped theirs
    assert {0, 1} == set(owners.values())
    expected = {n: _base_hessian("attn", 6) * 3 for n in ("b.q", "b.k", "b.v")}
    expected |= {n: _base_hessian("mlp", 6) * 3 for n in ("b.gate", "b.up")}
    expected |= {n: _base_hessian(n, k) * 3 for n, k in (("b.o", 6), ("b.down", 9))}
    expected["b.extra"] = _base_hessian("b.extra", 4)  # rank 1 contributed zeros
    for res in (r0, r1):
        for name, h in res["hessians"].items():
            assert owners[name] == res["rank"]
            # a shared tensor reduced once per name would carry extra copies of rank 1's part
            torch.testing.assert_close(h, expected[name], rtol=1e-12, atol=1e-9)
        assert res["tokens"] == {**dict.fromkeys(expected, 30), "b.extra": 3}
    owner_attn = r0 if owners["b.q"] == 0 else r1
    assert owner_attn["aliases"]["b.q"] == ["b.q", "b.k", "b.v"]  # still one shared tensor


@pytest.mark.integration
def test_broadcast_layer_is_byte_identical(two_ranks):
    (r0, r1), _ = two_ranks
    for key, src in (("plain", 0), ("rotated", 1), ("trellis", 1)):
        sent, received = (r0, r1)[src][key], (r1, r0)[src][key]
        assert sent["spec"] == received["spec"]
        assert sent["buffers"].keys() == received["buffers"].keys()
        for name, b in sent["buffers"].items():
            got = received["buffers"][name]
            assert (got.dtype, got.shape) == (b.dtype, b.shape), name
            assert torch.equal(got.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name
        assert torch.equal(sent["forward"], received["forward"])
    assert r0["rotated"]["buffers"]["bias"].dtype == torch.bfloat16
    assert "signs" in r0["rotated"]["buffers"] and "bias" not in r0["plain"]["buffers"]
    assert r1["plain"]["buffers"]["codes"].dtype == torch.uint8
    assert r0["trellis"]["spec"]["trellis_state_bits"] == 8  # rebuilt as a TrellisLinear on the receiving rank


@pytest.mark.integration
def test_all_reduce_sums(two_ranks):
    (r0, r1), _ = two_ranks
    for res in (r0, r1):
        a, b, c = res["grads"]
        assert torch.equal(a, torch.full((2, 3), 3.0))
        assert torch.equal(b, torch.arange(4.0))
        assert c.dtype == torch.float64 and torch.equal(c, torch.tensor([3.0, 6.0], dtype=torch.float64))
        assert res["sum_is_same"] and torch.equal(res["sum"], torch.tensor([3.0, 6.0]))
        assert res["float"] == 0.75


@pytest.mark.integration
def test_a_dead_rank_fails_the_collective_instead_of_hanging(two_ranks):
    (r0, _), _ = two_ranks
    assert r0["dead_peer"]["raised"] is not None
    assert r0["dead_peer"]["seconds"] < GROUP_TIMEOUT.total_seconds() + 5
