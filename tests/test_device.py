"""The RVQ math runs on the device of its inputs, and the CPU keeps its historical bits.

There is no GPU in CI, so the device checks use a simulated one: :class:`_Sim` tensors claim to live on
the ``meta`` device while holding real CPU data, and :class:`_SimMode` (a ``TorchDispatchMode``) runs every
aten op on that data, tracking where each tensor lives. It records what would break or stall on a real
accelerator:

* an op mixing a device tensor with a (non-scalar) host tensor -- a CUDA run would raise;
* a host-to-device copy of anything but random draws made on a CPU generator (a tensor built on the
  host and shipped over, e.g. a ``torch.zeros`` without ``device=``);
* device-to-host copies (``.cpu()``, ``.tolist()``) and host syncs (``.item()``, ``int()``, ``bool()``,
  ``nonzero``, ``torch.equal``, the error checks of ``linalg.inv`` / ``linalg.cholesky``).

Because the code sees a device other than the CPU, its non-CPU branches run too (on CPU data).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from rvqllm.calibration import HessianCollector
from rvqllm.rvq import kmeans, quantize_weight, rotation
from rvqllm.rvq.refit import refine_codebooks
from rvqllm.rvq.residual import encode_rvq, encode_rvq_chunked, encode_with_feedback, learn_codebooks
from rvqllm.rvq.rotation import random_signs, rotate_hessian

pytestmark = pytest.mark.unit

aten = torch.ops.aten
_DEV = torch.device("meta")  # what the simulated device calls itself


# ------------------------------------------------------------------------------------- the simulated device
class _Sim(torch.Tensor):
    """A tensor that reports ``device == meta`` but carries real CPU data in ``elem``."""

    elem: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=_DEV, requires_grad=False,
        )

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    def data_ptr(self) -> int:  # HessianCollector keys inputs by their data pointer
        return self.elem.data_ptr()

    def tolist(self):  # as on a GPU: a copy to the host (which the mode records), then the list
        return self.cpu().tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # outside a _SimMode (e.g. reading results)
        return _SimMode.run(func, args, kwargs or {}, None)


def to_sim(t: torch.Tensor) -> _Sim:
    return _Sim(t.detach().clone())


def from_sim(t):
    return t.elem if isinstance(t, _Sim) else t


class _SimMode(TorchDispatchMode):
    """Runs every op on CPU data while tracking host / device placement (see the module docstring)."""

    SYNC_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default,
                aten.nonzero.default, aten._linalg_check_errors.default, aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []  # ops that would raise on a real device
        self.shipped: list[str] = []  # host tensors (not random draws) copied to the device
        self.to_host: list[tuple[str, int]] = []  # device-to-host copies: (op, numel)
        self.syncs: list[str] = []  # host syncs (including the copies above)
        self.largest = 0  # the most elements of any tensor an op produced

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.run(func, args, kwargs or {}, self)

    @staticmethod
    def run(func, args, kwargs, log):
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        sims = [t for t in tensors if isinstance(t, _Sim)]
        hosts = [t for t in tensors if not isinstance(t, _Sim)]
        to_dev = kwargs.get("device") is not None and torch.device(kwargs["device"]) == _DEV
        name = str(func)
        if log is not None:
            if func in (aten._to_copy.default, aten.copy_.default) and (sims or to_dev) and hosts:
                src = args[1] if func is aten.copy_.default else args[0]
                if isinstance(src, _Sim):  # device -> host
                    log.to_host.append((name, src.numel()))
                    log.syncs.append(name)
                elif src.dim() > 0 and not _is_random(src):  # host -> device, not a random draw
                    log.shipped.append(f"{name} {tuple(src.shape)}")
            elif func is aten._to_copy.default and sims and kwargs.get("device") is not None and not to_dev:
                log.to_host.append((name, sims[0].numel()))
                log.syncs.append(name)
            elif sims and any(t.dim() > 0 for t in hosts):
                log.mixed.append(f"{name} {[tuple(t.shape) for t in hosts]}")
            if sims and (func in _SimMode.SYNC_OPS or (func is aten.index.Tensor and any(
                    isinstance(i, _Sim) and i.dtype == torch.bool for i in flat))):
                log.syncs.append(name)
        if to_dev:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        on_device = bool(sims) or to_dev
        if func is aten._to_copy.default and kwargs.get("device") is not None and not to_dev:
            on_device = False  # an explicit move to the host
        if func is aten.copy_.default and not isinstance(args[0], _Sim):
            on_device = False  # copied into a host tensor
        out = func(*tree_map(from_sim, args), **tree_map(from_sim, kwargs))
        if log is not None:
            log.largest = max([log.largest] + [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
        if func is aten._to_copy.default and out is from_sim(args[0]):
            out = out.clone()  # a move is a copy: do not alias the source's data
        if not on_device:
            if log is not None and isinstance(out, torch.Tensor):
                if kwargs.get("generator") is not None or (hosts and all(_is_random(t) for t in hosts)):
                    out._sim_random = True  # derived from CPU generator draws only: may go to the device
                    if func._schema.is_mutable:
                        args[0]._sim_random = True
            return out
        unwrapped = {id(from_sim(a)): a for a in flat if isinstance(a, _Sim)}

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) in unwrapped:  # an in-place op returns its (wrapped) input
                return unwrapped[id(t)]
            return _Sim(t)

        return tree_map(wrap, out)


def _is_random(t: torch.Tensor) -> bool:
    return getattr(t, "_sim_random", False)


@pytest.fixture(autouse=True)
def _forget_sim_hadamards():
    """The rotation caches its Hadamard matrix per device: do not keep simulated ones past a test."""
    yield
    for key in [k for k in rotation._CACHE if k[2] == _DEV]:
        del rotation._CACHE[key]


def _all_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, tuple | list):
        return [t for o in obj for t in _all_tensors(o)]
    return [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]


# ----------------------------------------------------------------------------------------------- problems
def _problem(dead=False, hdtype=torch.float64, out=24, inp=52):
    g = torch.Generator().manual_seed(123)
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)
    x = torch.randn(300, inp, generator=g) * torch.linspace(0.2, 3.0, inp)
    h = (x.T @ x).double()
    if dead:
        h[5, :] = 0
        h[:, 5] = 0
    return w, h.to(hdtype)


CONFIGS = [(f"rot{int(r)}-ef{int(e)}-beam{b}-ref{f}", "full", dict(rotate=r, error_feedback=e, beam=b, refits=f))
           for r, e, b, f in itertools.product((False, True), (False, True), (1, 4), (0, 1))]
CONFIGS += [
    ("nohess", "none", dict()),
    ("nohess-rot-beam4-ref1", "none", dict(rotate=True, beam=4, refits=1)),
    ("diag", "diag", dict()),
    ("diag-rot", "diag", dict(rotate=True)),
    ("dead-ef-beam4", "dead", dict(beam=4)),
    ("dead-ef-rot", "dead", dict(rotate=True)),
    ("fp32hess-ef", "fp32", dict()),
    ("unweighted", "full", dict(hessian_weighted=False, error_feedback=False)),
    ("d8-s3-b5-ef-rot", "full", dict(vector_dim=8, stages=3, bits=5, rotate=True, beam=2, refits=2)),
]


def _inputs(hess: str):
    w, h = _problem(dead=hess == "dead", hdtype=torch.float32 if hess == "fp32" else torch.float64)
    return w, {"none": None, "diag": h.diagonal().clone()}.get(hess, h)


def _quantize(w, h, **kw):
    args = dict(vector_dim=4, stages=2, bits=4, kmeans_iters=5, kmeans_points=16, seed=7)
    args.update(kw)
    return quantize_weight(w, h, **args)


def _digest(*tensors) -> str:
    """sha256 of the tensors' raw bytes (first 16 hex digits)."""
    return hashlib.sha256(b"".join(from_sim(t).contiguous().numpy().tobytes() for t in tensors)).hexdigest()[:16]


def _q_digest(q) -> str:
    """sha256 of an RVQWeight: each tensor's dtype, shape and bytes, then ``in_features/rotation_block``."""
    m = hashlib.sha256()
    for t in (q.codes, q.codebooks, q.scales) + ((q.signs,) if q.signs is not None else ()):
        t = from_sim(t).contiguous()
        m.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        m.update(t.numpy().tobytes())
    m.update(f"{q.in_features}/{q.rotation_block}".encode())
    return m.hexdigest()[:16]


# ------------------------------------------------------------------------------ (a) the CPU bits are kept
#: digests of the CPU results (torch 2.13.0+cpu, AVX512), first recorded before the math was made
#: device-generic; re-recorded in session 26, whose k-means++ draws one uniform per codeword (inverse CDF)
#: instead of racing exponentials and sums the weighted distances in one product: deliberate changes of
#: the bits. BLAS kernels round differently on other CPUs / torch builds, so elsewhere the comparison is skipped.
_RECORDED_ON = ("2.13.0+cpu", "AVX512")
_DIGESTS = {
    "rot0-ef0-beam1-ref0": "dba8a41df796b998",
    "rot0-ef0-beam1-ref1": "f2ed04c87930eb2d",
    "rot0-ef0-beam4-ref0": "dba8a41df796b998",
    "rot0-ef0-beam4-ref1": "0389063209b0f15c",
    "rot0-ef1-beam1-ref0": "dd1b1c641336141d",
    "rot0-ef1-beam1-ref1": "89865c191acebbfe",
    "rot0-ef1-beam4-ref0": "175d85bd683862f7",
    "rot0-ef1-beam4-ref1": "2631b112a88140dd",
    "rot1-ef0-beam1-ref0": "5fb9ad4567454810",
    "rot1-ef0-beam1-ref1": "52cf3c0a3738468a",
    "rot1-ef0-beam4-ref0": "5fb9ad4567454810",
    "rot1-ef0-beam4-ref1": "159a5df402b41049",
    "rot1-ef1-beam1-ref0": "c14b7bd6180c64ed",
    "rot1-ef1-beam1-ref1": "c6d020eac7b8bd23",
    "rot1-ef1-beam4-ref0": "75413f578800ec96",
    "rot1-ef1-beam4-ref1": "d24db21c26300d8a",
    "nohess": "c1302118cc0bf4fd",
    "nohess-rot-beam4-ref1": "d89d441164a021d4",
    "diag": "dba8a41df796b998",
    "diag-rot": "0cdb4ed28c6238d3",
    "dead-ef-beam4": "c60dc7fc97be6308",
    "dead-ef-rot": "0153dc6a78d33b60",
    "fp32hess-ef": "dd1b1c641336141d",
    "unweighted": "c1302118cc0bf4fd",
    "d8-s3-b5-ef-rot": "799176239676701b",
    # the pieces on their own (see _pieces)
    "km-degenerate": "4eb217dd5b2ab8d7",
    "km-degenerate-40": "05a9ced4bfcada55",
    "km-zero-weights": "06743ea6df45918c",
    "km-subsample": "37931acea7cad5ca",
    "learn-uniform-refit": "b8acddeabb962f55",
    "encode-beam5-wt": "e9ea657b9a4f52f7",
    "refine": "8f472a62202a334a",
    "rotate-hessian": "b5e56b33fea7a67b",
    "hessian-collector": "173319d5b9ec1896",
}


#: the same results on a second AVX-512 machine (one with avx512_fp16/bf16 too) whose float64 matmul rounds
#: the rotated Hessian differently: the code before session 6 (b54e921) gives exactly these there as well,
#: so they are the platform's, not a change of the math. Only two digests differed between the machines (this one and `d8-s3-b5-ef-rot`).
_ALTERNATES = {"rotate-hessian": {"72dcf2db0345a00c"}}
#: ... whose digest for these was not re-recorded in session 26 (no such machine was at hand): there they are skipped
_UNKNOWN_ON_ALTERNATE = {"d8-s3-b5-ef-rot"}


def _known(name: str, digest: str) -> bool:
    return digest == _DIGESTS[name] or digest in _ALTERNATES.get(name, set())


def _same_platform() -> bool:
    return (torch.__version__, torch.backends.cpu.get_cpu_capability()) == _RECORDED_ON


@functools.lru_cache(maxsize=1)
def _pieces() -> dict[str, str]:
    """Digests of k-means (incl. its degenerate seeding paths), re-fits, beam coding, rotation, Hessians."""
    g = torch.Generator().manual_seed(5)
    out = {}
    base = torch.randn(5, 4, generator=g)  # 5 distinct points, 16 codewords: seeding runs out at step 5
    x = base[torch.randint(0, 5, (400,), generator=g)]
    w = torch.rand(400, 4, generator=g)
    out["km-degenerate"] = _digest(*kmeans.weighted_kmeans(x, w, 16, 10, seed=3))
    base = torch.randn(40, 4, generator=g)  # 40 distinct points, 64 codewords: runs out in the 2nd batch
    x2 = base[torch.randint(0, 40, (3000,), generator=g)]
    w2 = torch.rand(3000, 4, generator=g) + 0.1
    out["km-degenerate-40"] = _digest(*kmeans.weighted_kmeans(x2, w2, 64, 10, seed=4))
    x = base[torch.randint(0, 5, (400,), generator=g)]
    w = torch.rand(400, 4, generator=g)
    out["km-zero-weights"] = _digest(*kmeans.weighted_kmeans(x, torch.zeros_like(w), 8, 5, seed=3))
    x = torch.randn(5000, 8, generator=g) ** 3
    w = torch.rand(5000, 8, generator=g)
    out["km-subsample"] = _digest(*kmeans.weighted_kmeans(x, w, 32, 15, seed=11, max_points=2000))
    cb = learn_codebooks(x, torch.ones_like(x), 3, 16, 5, seed=2, points_per_code=32, refits=2, beam=3)
    out["learn-uniform-refit"] = _digest(cb)
    out["encode-beam5-wt"] = _digest(encode_rvq(x, cb, beam=5, wt=w))
    out["refine"] = _digest(*refine_codebooks(x[:999], w[:999], cb, 2, beam=2))
    s = random_signs(96, 4)
    h = torch.randn(96, 96, generator=g, dtype=torch.float64)
    out["rotate-hessian"] = _digest(rotate_hessian(h @ h.T, s, 32))
    torch.manual_seed(0)
    lin, lin2 = nn.Linear(24, 8), nn.Linear(24, 8)
    with HessianCollector({"a": lin, "b": lin2}) as col:
        for _ in range(3):
            col.new_pass()
            xx = torch.randn(2, 7, 24, generator=g)
            lin(xx)
            lin2(xx * 2)
    out["hessian-collector"] = _digest(col.hessians["a"], col.hessians["b"])
    return out


@pytest.mark.skipif(not _same_platform(), reason=f"digests recorded on torch/CPU {_RECORDED_ON}")
@pytest.mark.parametrize("name,hess,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_cpu_bits_unchanged(name, hess, kw):
    if name in _UNKNOWN_ON_ALTERNATE and _pieces()["rotate-hessian"] in _ALTERNATES["rotate-hessian"]:
        pytest.skip(f"{name}: this platform's float64 products round the rotated Hessian differently, and its "
                    "digest was not re-recorded after session 26's k-means change")
    w, h = _inputs(hess)
    got = _q_digest(_quantize(w, h, **kw))
    assert _known(name, got), (got, _DIGESTS[name])


@pytest.mark.skipif(not _same_platform(), reason=f"digests recorded on torch/CPU {_RECORDED_ON}")
def test_cpu_bits_unchanged_pieces():
    got = _pieces()
    assert all(_known(k, v) for k, v in got.items()), {k: (v, _DIGESTS[k]) for k, v in got.items() if not _known(k, v)}


def _host_seeding(x, w, k, gen):
    """k-means++ one codeword at a time on the host: each D^2 draw one uniform against the running sums."""
    n = x.shape[0]
    m = min(n, max(64 * k, 4096))
    idx = torch.randperm(n, generator=gen)[:m]
    xs, ws = x[idx], w[idx]
    centers = torch.empty(k, x.shape[1])
    centers[0] = xs[int(torch.randint(m, (1,), generator=gen))]
    best = ((xs - centers[0]) ** 2 * ws).sum(1)
    for i in range(1, k):
        cum = best.cumsum(0)
        if cum[-1] <= 0:
            centers[i:] = xs[torch.randint(m, (k - i,), generator=gen)]
            break
        u = float(torch.rand(1, generator=gen))
        pick = min(int(torch.searchsorted(cum, torch.tensor([u]) * cum[-1], right=True)), m - 1)
        centers[i] = xs[pick]
        best = torch.minimum(best, ((xs - centers[i]) ** 2 * ws).sum(1))
    return centers


@pytest.mark.parametrize("distinct,k", [(None, 16), (None, 70), (5, 16), (40, 64), (0, 8)])
def test_seeding_draws_what_one_step_at_a_time_draws(distinct, k):
    """The batched device-side D^2 draws are the host loop's, pick for pick and generator state for state
    (on any torch/CPU: no recorded digests), through the batch boundaries and the run-out paths."""
    g = torch.Generator().manual_seed(k)
    if distinct is None:
        x = torch.randn(3000, 4, generator=g)
    else:
        x = torch.randn(max(distinct, 1), 4, generator=g)[torch.randint(0, max(distinct, 1), (3000,), generator=g)]
    w = torch.rand(3000, 4, generator=g) * (distinct != 0)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(kmeans._init_plus_plus(x, w, k, g1), _host_seeding(x, w, k, g2))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_seeding_draws_in_proportion_to_the_weighted_distance():
    """D^2 sampling: after the first center, each point is drawn with probability proportional to its
    weighted squared distance to it (zero-weight points and the center itself never). Four points at
    distances 0, 1, 4 and 9 (by weights) from a fixed first center, 4,000 seeds: frequencies within a few
    standard errors of 0, 1/14, 4/14, 9/14."""
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [5.0]])
    w = torch.tensor([[1.0], [1.0], [1.0], [1.0], [0.0]])  # the last point carries no weight
    counts = torch.zeros(5)
    trials = 4000
    for seed in range(trials):
        g = torch.Generator().manual_seed(seed)
        centers = kmeans._init_plus_plus(x, w, 2, g)
        if centers[0, 0] != 0.0:
            continue  # keep the draws whose first center is the point at 0
        counts[int((x[:, 0] == centers[1, 0]).nonzero())] += 1
    n = counts.sum()
    assert n > trials / 8  # the first center is uniform over the five points
    want = torch.tensor([0.0, 1.0, 4.0, 9.0, 0.0]) / 14
    got = counts / n
    assert counts[0] == 0 and counts[4] == 0
    assert torch.all((got - want).abs() <= 4 * (want * (1 - want) / n).sqrt() + 1e-9), (got, want)


# ----------------------------------------------------------------------------- (b) it all stays on device
def _run_on_sim(fn, *args, **kw):
    mode = _SimMode()
    with mode:
        result = fn(*[to_sim(a) if isinstance(a, torch.Tensor) else a for a in args], **kw)
    return result, mode


def _assert_clean(mode: _SimMode, max_syncs: int):
    assert not mode.mixed, f"ops mixing device and host tensors: {mode.mixed[:5]}"
    assert not mode.shipped, f"host-built tensors shipped to the device: {mode.shipped[:5]}"
    big = [c for c in mode.to_host if c[1] > 64]
    assert not big, f"device tensors copied to the host: {big[:5]}"
    assert len(mode.syncs) <= max_syncs, f"{len(mode.syncs)} host syncs > {max_syncs}: {sorted(set(mode.syncs))}"


def test_sim_device_catches_host_tensors():
    """The checker itself: a host tensor meeting a device tensor, a .cpu(), an .item() are all seen."""
    x, mode = _run_on_sim(lambda a: a + torch.zeros(3), torch.ones(3))
    assert mode.mixed
    _, mode = _run_on_sim(lambda a: a.cpu() + 1, torch.ones(100))
    assert mode.to_host and mode.syncs
    _, mode = _run_on_sim(lambda a: (a * 2).sum().item(), torch.ones(3))
    assert mode.syncs
    _, mode = _run_on_sim(lambda a: a + torch.zeros(3).to(a.device), torch.ones(3))
    assert mode.shipped and not mode.mixed
    _, mode = _run_on_sim(lambda a: a + torch.randperm(3, generator=torch.Generator()).to(a.device), torch.ones(3))
    assert not mode.shipped and not mode.mixed  # random draws may travel
    assert isinstance(x, _Sim) and x.device == _DEV and torch.equal(x.elem, torch.ones(3))


def _sync_budget(stages: int, iters: int, k: int, refits: int) -> int:
    """Host syncs a layer may make, whatever its size: per stage the k-means (a few per Lloyd iteration,
    one or two per batch of seeding draws), the Cholesky attempts, the re-fit tests."""
    seeding = -(-k // kmeans._DRAW_BATCH) + 2
    return stages * (3 * iters + seeding + 2) + 8 * refits + 10


@pytest.mark.parametrize("name,hess,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_quantize_weight_stays_on_device(name, hess, kw):
    w, h = _inputs(hess)
    q, mode = _run_on_sim(_quantize, w, h, **kw)
    _assert_clean(mode, _sync_budget(kw.get("stages", 2), 5, 1 << kw.get("bits", 4), kw.get("refits", 0)))
    for t in _all_tensors(q):
        assert isinstance(t, _Sim) and t.device == _DEV
    # the same math ran, the non-CPU branches included (index_put_ sums in index_add_'s order on the CPU)
    ref = _quantize(w, h, **kw)
    for a, b in ((q.codes, ref.codes), (q.codebooks, ref.codebooks), (q.scales, ref.scales)):
        assert torch.equal(from_sim(a), b)


@pytest.mark.parametrize("groups,k", [(16, 16), (64, 64)])
def test_syncs_do_not_grow_with_the_layer(groups, k):
    """Per-group (error feedback) and per-codeword (seeding) work makes no host sync: a 4x wider layer
    with 4x the codewords syncs no more than the budget that ignores both."""
    w, h = _problem(out=16, inp=4 * groups)
    kw = dict(bits=k.bit_length() - 1, beam=2, refits=1, rotate=True, kmeans_points=4)
    _, mode = _run_on_sim(_quantize, w, h, **kw)
    _assert_clean(mode, _sync_budget(2, 5, 16, 1))  # the budget of the small case, for both


def test_pieces_stay_on_device():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 4, generator=g)
    wt = torch.rand(600, 4, generator=g)
    cb, mode = _run_on_sim(learn_codebooks, x, wt, 2, 16, 4, 1, 16, refits=2, beam=3)
    _assert_clean(mode, _sync_budget(2, 4, 16, 2))
    assert isinstance(cb, _Sim)
    codes, mode = _run_on_sim(encode_rvq, x, from_sim(cb), 4, wt)
    _assert_clean(mode, 0)
    assert isinstance(codes, _Sim)
    (books, codes), mode = _run_on_sim(refine_codebooks, x, wt, from_sim(cb), 2, 2)
    _assert_clean(mode, 12)
    assert isinstance(books, _Sim) and isinstance(codes, _Sim)
    signs = random_signs(64, 1)
    hh = torch.randn(64, 64, dtype=torch.float64, generator=g)
    r, mode = _run_on_sim(rotate_hessian, hh, signs, 16)
    _assert_clean(mode, 0)
    assert torch.equal(from_sim(r), rotate_hessian(hh, signs, 16))


class _Probe(nn.Module):
    """Stands in for a linear layer: a forward whose input a HessianCollector hook sees."""

    in_features = 12

    def forward(self, x):
        return x


def test_hessian_collector_accumulates_on_the_input_device():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 12, generator=g) for _ in range(2)]
    with HessianCollector({"p": _Probe()}) as ref:
        for x in xs:
            ref.new_pass()
            ref.layers["p"](x)
    mode = _SimMode()
    with mode, HessianCollector({"p": _Probe()}) as col:
        for x in xs:
            col.new_pass()
            col.layers["p"](to_sim(x))
    _assert_clean(mode, 0)
    h = col.hessians["p"]
    assert isinstance(h, _Sim) and h.dtype == torch.float64 and col.tokens["p"] == 30
    assert torch.equal(from_sim(h), ref.hessians["p"])


def test_hessian_products_are_float32_or_what_autocast_multiplies_in():
    """What the docs say of ``calib_dtype``: outside autocast each pass's ``xᵀx`` is a float32 product; under
    bfloat16 autocast it is autocast's product (bfloat16 inputs, float32 accumulation, a bfloat16 result),
    summed in float64 either way."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 12, generator=g) for _ in range(3)]
    want32 = sum((x.T @ x).double() for x in xs)
    want16 = sum((x.bfloat16().T @ x.bfloat16()).double() for x in xs)
    for ctx, want in ((contextlib.nullcontext(), want32), (torch.autocast("cpu", dtype=torch.bfloat16), want16)):
        with ctx, HessianCollector({"p": _Probe()}) as col:
            for x in xs:
                col.new_pass()
                col.layers["p"](x)
        assert col.hessians["p"].dtype == torch.float64
        assert torch.equal(col.hessians["p"], want)
    assert not torch.equal(want32, want16)


def test_no_out_by_in_by_codewords_blocks():
    """Error feedback and beam search build per-group ``[out, beam, K]`` blocks (and ``[in, in]`` factors),
    never anything of size ``out * in * K``; the chunked beam search stays within its ``max_elems``."""
    out, inp, d, k, beam = 64, 256, 4, 64, 4
    w, h = _problem(out=out, inp=inp)
    g = torch.Generator().manual_seed(0)
    books = torch.randn(2, k, d, generator=g) * torch.tensor([1.0, 0.3])[:, None, None]
    scales = w.pow(2).mean(1).sqrt()
    codes, mode = _run_on_sim(encode_with_feedback, w, h, scales, books, 128, beam)
    _assert_clean(mode, 4)
    assert from_sim(codes).shape == (out, inp // d, 2)
    assert mode.largest <= max(inp * inp, out * beam * k) < out * inp * k // 8, mode.largest
    x = torch.randn(2000, d, generator=g)
    wt = torch.rand(2000, d, generator=g)
    codes, mode = _run_on_sim(encode_rvq_chunked, x, books, beam, wt, 4096)
    _assert_clean(mode, 0)
    assert mode.largest <= max(4096, x.numel()), mode.largest
    assert torch.equal(from_sim(codes), encode_rvq_chunked(x, books, beam, wt, 4096))


@pytest.mark.parametrize("name,hess,kw", [c for c in CONFIGS if c[1] in ("full", "dead", "fp32", "diag")],
                         ids=[c[0] for c in CONFIGS if c[1] in ("full", "dead", "fp32", "diag")])
def test_callers_hessian_is_never_modified(name, hess, kw):
    """The error feedback damps and factors its working matrix in place: never the caller's Hessian."""
    w, h = _inputs(hess)
    before = h.clone()
    _quantize(w, h, **kw)
    assert torch.equal(h, before)
