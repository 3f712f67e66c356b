"""Where a quantization run executes: one device and, under ``torchrun``, one rank of several.

A :class:`Placement` is the single object the pipeline needs to know about devices and ranks. With
``world == 1`` every collective below is a no-op (nothing is imported from, or initialised in,
:mod:`torch.distributed`); with ``world > 1`` they are thin wrappers over :mod:`torch.distributed`
collectives on the default process group (NCCL on CUDA, gloo on CPU). The engine is torch.distributed:
this module schedules nothing of its own, it only decides who owns what (:meth:`Placement.assign`,
:meth:`Placement.my_batches`) deterministically, so that every rank computes the same answer without
talking.

How a block is meant to be walked with ``N`` ranks:

1. each rank runs its own calibration batches (:meth:`~Placement.my_batches`) through the block and
   accumulates partial input Hessians;
2. :meth:`~Placement.assign` gives each layer an owner rank (layers sharing one Hessian together);
3. :meth:`~Placement.reduce_hessians` sums the partial Hessians onto their owners;
4. each owner codes its layers, then :meth:`~Placement.broadcast_layer` sends every coded layer to all
   ranks, so that all ranks hold the same quantized block.

:func:`placement_from_env` builds a placement from ``torchrun``'s environment at the CLI edge and
:func:`shutdown` tears down what it created.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import Tensor, nn

from .errors import RVQError
from .nn import QuantizedLinear

#: How long a collective may wait for the other ranks before failing. Generous: while one rank codes
#: its share of a block's layers, the others wait in :meth:`Placement.broadcast_layer`.
DEFAULT_TIMEOUT = timedelta(minutes=60)

_DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N'"


@dataclass
class Placement:
    """One process's device and its place among the ranks of a run.

    Attributes:
        device: where this rank's tensors live (``cpu`` or ``cuda:i``).
        rank: this process's global rank, ``0 <= rank < world``.
        world: the number of ranks; ``1`` means a plain single-process run (no process group).
        local_rank: the rank on this machine (``LOCAL_RANK``); picks the GPU.
        owns_group: whether :func:`placement_from_env` created the default process group (then
            :func:`shutdown` destroys it).

    With ``world > 1`` the default process group must be initialised (see :func:`placement_from_env`);
    every rank must call the collective methods in the same order with matching arguments.
    """

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world}")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks (``world > 1``): the collectives then communicate."""
        return self.world > 1

    # ---- who does what (pure, identical on every rank) -------------------------------------------

    def my_batches(self, n_batches: int) -> list[int]:
        """This rank's share of the global batch indices ``0 .. n_batches - 1``.

        A contiguous range; the ranks' ranges, in rank order, are ``0 .. n_batches - 1`` exactly once.
        Sizes differ by at most one (the first ``n_batches % world`` ranks get one more); a rank may get
        none when ``n_batches < world``.
        """
        if n_batches < 0:
            raise ValueError(f"n_batches must be >= 0, got {n_batches}")
        base, extra = divmod(n_batches, self.world)
        start = self.rank * base + min(self.rank, extra)
        return list(range(start, start + base + (self.rank < extra)))

    def assign(self, groups: list[list[str]], sizes: dict[str, int]) -> dict[str, int]:
        """The owner rank of each layer: greedy longest-processing-time over layer groups.

        Args:
            groups: lists of layer names that share one input Hessian (q/k/v; gate/up): each list gets
                one owner. A layer of ``sizes`` in no group is a group of its own.
            sizes: the work of each layer, its weight's ``numel``.
        Returns:
            ``{name: rank}`` for every name of ``sizes``. Groups are taken largest total first (ties: by
            their smallest name) and each goes to the least-loaded rank so far (ties: the lowest rank):
            the same answer on every rank, whatever the order of ``groups`` and ``sizes``.
        """
        seen: dict[str, int] = {}
        units: list[list[str]] = []
        for group in groups:
            names = sorted(set(group))
            if not names:
                continue
            for name in names:
                if name not in sizes:
                    raise ValueError(f"layer {name!r} of a group has no size")
                if name in seen:
                    raise ValueError(f"layer {name!r} is in two groups")
                seen[name] = len(units)
            units.append(names)
        units += [[name] for name in sorted(sizes) if name not in seen]
        units.sort(key=lambda names: (-sum(sizes[n] for n in names), names[0]))
        loads = [0] * self.world
        owners: dict[str, int] = {}
        for names in units:
            rank = min(range(self.world), key=lambda r: (loads[r], r))
            loads[rank] += sum(sizes[n] for n in names)
            owners.update(dict.fromkeys(names, rank))
        return owners

    # ---- collectives --------------------------------------------------------------------------------

    def reduce_hessians(self, hessians: dict[str, Tensor], tokens: dict[str, int],
                        owners: dict[str, int]) -> None:
        """Sum each rank's partial input Hessians onto their owners, in place.

        Args:
            hessians: ``{layer: [in, in]}`` this rank's partial sums (e.g.
                :attr:`rvqllm.calibration.HessianCollector.hessians`). Names fed the same input map to
                the very same tensor object; such a tensor is reduced once. A rank may lack some layers
                (no calibration batch of its own, or a layer its batches never reached): it contributes
                zeros for them.
            tokens: ``{layer: count}`` the tokens behind each partial sum.
            owners: ``{layer: rank}`` from :meth:`assign`; names sharing a tensor must share an owner.
        After the call (``world > 1``):
            * ``hessians`` holds exactly the layers this rank owns, each the sum over all ranks (names
              that shared a tensor still share one, on :attr:`device`); the other entries are removed
              (what a non-owner's buffer holds after ``dist.reduce`` is backend-defined, and it is not
              needed).
            * ``tokens`` holds, on every rank, the total over all ranks for every layer that any rank
              had.
        With ``world == 1`` nothing changes.

        Raises:
            ValueError: a layer without owner, or layers sharing a tensor with different owners.
            RuntimeError: ranks disagree on which layers share a Hessian, or on its shape/dtype (a bug).
        """
        if not self.distributed:
            return
        import torch.distributed as dist

        # one entry per distinct local tensor: (names sharing it, shape, dtype, tokens)
        by_id: dict[int, list[str]] = {}
        for name in sorted(hessians):
            by_id.setdefault(id(hessians[name]), []).append(name)
        local = [(tuple(names), tuple(hessians[names[0]].shape), str(hessians[names[0]].dtype),
                  int(tokens.get(names[0], 0))) for names in by_id.values()]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, local)

        # the shared-tensor groups, as the union of what the ranks saw
        group_of: dict[str, int] = {}
        groups: list[dict] = []
        for rank, entries in enumerate(gathered):
            for names, shape, dtype, count in entries:
                known = {group_of[n] for n in names if n in group_of}
                if len(known) > 1:
                    raise RuntimeError(f"ranks disagree on which layers share an input Hessian: {names}")
                if known:
                    g = groups[known.pop()]
                    if rank in g["ranks"] or g["shape"] != shape or g["dtype"] != dtype:
                        raise RuntimeError(f"ranks disagree on the input Hessian of {names}")
                else:
                    g = {"names": set(), "shape": shape, "dtype": dtype, "ranks": set(), "tokens": 0,
                         "index": len(groups)}
                    groups.append(g)
                g["names"].update(names)
                g["ranks"].add(rank)
                g["tokens"] += count
                for n in names:
                    group_of[n] = g["index"]
        groups.sort(key=lambda g: min(g["names"]))  # the same order on every rank

        pending = []
        for g in groups:
            names = sorted(g["names"])
            missing = [n for n in names if n not in owners]
            if missing:
                raise ValueError(f"layer {missing[0]!r} has a Hessian but no owner")
            owner = owners[names[0]]
            if any(owners[n] != owner for n in names):
                raise ValueError(f"layers {names} share an input Hessian but not an owner")
            mine = next((hessians[n] for n in names if n in hessians), None)
            if mine is None:
                dtype = getattr(torch, g["dtype"].removeprefix("torch."))
                mine = torch.zeros(g["shape"], dtype=dtype, device=self.device)
            pending.append((dist.reduce(mine, dst=owner, op=dist.ReduceOp.SUM, async_op=True), mine, names,
                            owner, g["tokens"]))
        for work, tensor, names, owner, count in pending:
            work.wait()
            for n in names:
                tokens[n] = count
                if owner == self.rank:
                    hessians[n] = tensor
                else:
                    hessians.pop(n, None)

    def broadcast_layer(self, layer: QuantizedLinear | None, spec: dict | None, src: int) -> QuantizedLinear:
        """Send rank ``src``'s coded layer to every rank.

        Args:
            layer: on ``src``, its :class:`QuantizedLinear`; ignored (pass ``None``) elsewhere.
            spec: on ``src``, the layer's spec (``None``: ``layer.spec()``); ignored elsewhere.
            src: the owner rank.
        Returns:
            on ``src``, ``layer`` itself; elsewhere, a new :class:`QuantizedLinear` on :attr:`device`
            built with :meth:`QuantizedLinear.from_spec` from the broadcast spec, whose buffers have the
            same names, shapes, dtypes and bytes as ``src``'s. The spec travels by
            ``dist.broadcast_object_list``, the buffers as one ``uint8`` tensor by ``dist.broadcast``.
            With ``world == 1``, ``layer``.
        """
        if not 0 <= src < self.world:
            raise ValueError(f"src rank {src} is not in a world of {self.world}")
        if self.rank == src:
            if layer is None:
                raise ValueError("the source rank must pass its layer")
            if spec is not None:  # fail here, before any collective, rather than on the receivers
                shell = QuantizedLinear.from_spec(spec, device="meta")
                got = [(n, tuple(b.shape)) for n, b in shell.named_buffers()]
                want = [(n, tuple(b.shape)) for n, b in layer.named_buffers()]
                if got != want:
                    raise ValueError(f"spec {spec} does not describe the layer's buffers {want}")
        if not self.distributed:
            return layer
        import torch.distributed as dist

        header: list = [None]
        if self.rank == src:
            buffers = [(n, b) for n, b in layer.named_buffers()]
            header[0] = {
                "spec": dict(spec if spec is not None else layer.spec()),
                "bias_dtype": str(layer.bias.dtype) if layer.bias is not None else None,
                "buffers": [(n, tuple(b.shape), str(b.dtype)) for n, b in buffers],
            }
            flat = torch.cat([b.detach().contiguous().reshape(-1).view(torch.uint8) for _, b in buffers])
            flat = flat.to(self.device)
        dist.broadcast_object_list(header, src=src, device=self._object_device())
        meta = header[0]
        if self.rank != src:
            bias_dtype = getattr(torch, meta["bias_dtype"].removeprefix("torch.")) if meta["bias_dtype"] \
                else torch.float16
            layer = QuantizedLinear.from_spec(meta["spec"], bias_dtype=bias_dtype, device=self.device)
            buffers = [(n, b) for n, b in layer.named_buffers()]
            mine = [(n, tuple(b.shape), str(b.dtype)) for n, b in buffers]
            if mine != meta["buffers"]:
                raise RuntimeError(f"broadcast layer: the spec rebuilds buffers {mine}, "
                                   f"rank {src} sent {meta['buffers']}")
            flat = torch.empty(sum(b.numel() * b.element_size() for _, b in buffers), dtype=torch.uint8,
                               device=self.device)
        dist.broadcast(flat, src=src)
        if self.rank != src:
            offset = 0
            for _, b in buffers:
                n = b.numel() * b.element_size()
                b.view(-1).view(torch.uint8).copy_(flat[offset : offset + n])
                offset += n
        return layer

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself with ``world == 1``)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` (any shape, on :attr:`device`) over ranks, in place; returns ``t``."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_float(self, x: float) -> float:
        """The sum of ``x`` over ranks (in float64); ``x`` itself with ``world == 1``."""
        if not self.distributed:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        return float(self.all_reduce_sum(t).item())

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Replace each parameter's ``.grad`` by its sum over ranks (the caller scales, e.g. by ``1/world``).

        ``params`` must be the same parameters in the same order on every rank. A ``None`` grad counts as
        zeros (and becomes the summed tensor). Grads are coalesced into one flat buffer per
        (dtype, device), so a block's parameters cost one collective.
        """
        if not self.distributed:
            return
        buckets: dict[tuple, list[nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for bucket in buckets.values():
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            self.all_reduce_sum(flat)
            offset = 0
            for p in bucket:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    def barrier(self) -> None:
        """Wait until every rank gets here (no-op with ``world == 1``)."""
        if self.distributed:
            import torch.distributed as dist

            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def _object_device(self) -> torch.device | None:
        """The device for object collectives: this rank's GPU under NCCL, else the backend's default."""
        return self.device if self.device.type == "cuda" else None


# ---- building a placement ----------------------------------------------------------------------------


def _env_int(env: Mapping[str, str], key: str, default: int | None) -> int:
    value = env.get(key)
    if value is None:
        if default is None:
            raise RVQError(f"{key} is not set although WORLD_SIZE > 1: start the ranks with "
                           "`torchrun --nproc-per-node N --no-python rvqllm ...`")
        return default
    try:
        return int(value)
    except ValueError:
        raise RVQError(f"{key}={value!r} in the environment is not an integer: start the ranks with "
                       "`torchrun --nproc-per-node N --no-python rvqllm ...`") from None


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "no GPU is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")


def _cuda_device(index: int, what: str) -> torch.device:
    if not torch.cuda.is_available():
        raise RVQError(f"CUDA is not available on this machine: {_no_cuda_reason()}; pass --device cpu")
    count = torch.cuda.device_count()
    if index >= count:
        raise RVQError(f"{what} asks for GPU {index} but only {count} GPU(s) are visible: "
                       f"run at most {count} rank(s) per machine or pass another --device")
    return torch.device("cuda", index)


def resolve_device(device: str, world: int = 1, local_rank: int = 0) -> torch.device:
    """The :class:`torch.device` a ``--device`` string means for rank ``local_rank`` of ``world``.

    ``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``cpu``; ``cuda``:
    ``cuda:LOCAL_RANK``; ``cuda:N``: GPU ``N``, single-rank runs only (with several ranks each picks its
    GPU from ``LOCAL_RANK``). Anything else, or a GPU that is not there, is an :class:`RVQError`.
    """
    text = str(device).strip()
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        return _cuda_device(local_rank, f"LOCAL_RANK={local_rank}") if torch.cuda.is_available() \
            else torch.device("cpu")
    if text == "cuda":
        return _cuda_device(local_rank, f"LOCAL_RANK={local_rank}")
    head, sep, tail = text.partition(":")
    if head == "cuda" and sep and tail.isdigit():
        if world > 1:
            raise RVQError(f"--device {text} with {world} ranks: ranks pick their GPU from LOCAL_RANK; "
                           "pass --device cuda")
        return _cuda_device(int(tail), f"--device {text}")
    raise RVQError(f"unknown device {text!r}: pass --device {_DEVICE_FORMS}")


def placement_from_env(device: str = "auto", env: Mapping[str, str] | None = None, *,
                       timeout: timedelta = DEFAULT_TIMEOUT) -> Placement:
    """This process's :class:`Placement`, from ``torchrun``'s environment.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`resolve_device`).
        env: the environment (default ``os.environ``): ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
            ``MASTER_ADDR``, ``MASTER_PORT`` as ``torchrun`` sets them. Without ``WORLD_SIZE`` (or with
            ``WORLD_SIZE=1``) the run has one rank and no process group is made.
        timeout: how long joining the group, and later each collective, may wait for the other ranks.
    Returns:
        the placement. With several ranks the default process group is initialised (NCCL for CUDA,
        gloo for CPU; on CUDA the current device is set to this rank's GPU) unless it already is, in
        which case it is reused (and :func:`shutdown` leaves it alone).
    Raises:
        RVQError: bad environment values, a device string or GPU that does not fit, or a group that
            cannot be joined; the message is one line naming the fix.
    """
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    if world < 1:
        raise RVQError(f"WORLD_SIZE={world} in the environment: it must be >= 1; start the ranks with torchrun")
    rank = _env_int(env, "RANK", 0 if world == 1 else None)
    local_rank = _env_int(env, "LOCAL_RANK", 0 if world == 1 else None)
    if not 0 <= rank < world or local_rank < 0:
        raise RVQError(f"RANK={rank} / LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world}: "
                       "start the ranks with torchrun")
    dev = resolve_device(device, world, local_rank)
    if world == 1:
        return Placement(dev, 0, 1, local_rank)

    import torch.distributed as dist

    if not dist.is_available():
        raise RVQError(f"WORLD_SIZE={world} but this torch build has no torch.distributed: "
                       "run a single rank or install a torch with distributed support")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(f"a process group of {dist.get_world_size()} ranks (this one "
                               f"{dist.get_rank()}) exists, the environment says {world} (this one {rank})")
        return Placement(dev, rank, world, local_rank, owns_group=False)
    host = env.get("MASTER_ADDR")
    port_text = env.get("MASTER_PORT")
    if not host or not port_text:
        raise RVQError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set: start the ranks with "
                       "`torchrun --nproc-per-node N --no-python rvqllm ...`")
    port = _env_int(env, "MASTER_PORT", None)
    if not 0 < port < 65536:
        raise RVQError(f"MASTER_PORT={port} is not a TCP port: pass torchrun a --master-port in 1..65535")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    backend = "nccl" if dev.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world,
                                timeout=timeout, device_id=dev if dev.type == "cuda" else None)
    except (RuntimeError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RVQError(f"rank {rank} could not join the {backend} group at {host}:{port} ({first}): check "
                       f"MASTER_ADDR/MASTER_PORT and that all {world} ranks started") from err
    return Placement(dev, rank, world, local_rank, owns_group=True)


def shutdown(placement: Placement) -> None:
    """Destroy the process group if :func:`placement_from_env` made it (idempotent)."""
    if not placement.owns_group:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    placement.owns_group = False


# ---- device memory -----------------------------------------------------------------------------------


def peak_device_mib(device: torch.device | str) -> float | None:
    """Peak memory allocated by torch on a CUDA ``device`` since the last reset, in MiB; ``None`` elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak_device(device: torch.device | str) -> None:
    """Start a new peak for :func:`peak_device_mib` (no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def oom_errors() -> tuple[type[BaseException], ...]:
    """The exception types torch raises when a device runs out of memory, for ``except oom_errors():``."""
    found: list[type[BaseException]] = []
    for owner, attr in ((torch, "OutOfMemoryError"), (torch.cuda, "OutOfMemoryError")):
        cls = getattr(owner, attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


__all__ = ["DEFAULT_TIMEOUT", "Placement", "oom_errors", "peak_device_mib", "placement_from_env",
           "reset_peak_device", "resolve_device", "shutdown"]

