"""The run folder: a quantization run's progress on disk, committed after each decoder block.

Layout of ``<out>.partial/`` (written by :class:`RunDir`)::

    run.json                  fingerprint of the run: RVQConfig, sha256 of the input model (its tensors, or
                              its shard headers when streamed) and of the calibration ids, the layer names
    progress.json             {"blocks_done": k, "distilled": bool}: the commit point, replaced atomically
    model-00001-of-0000N.safetensors
                              block 0 as the final checkpoint stores it (quantized layers, norms, specs in
    ...                       the metadata; :func:`rvqllm.checkpoint.write_shard`): the finished checkpoint
                              is these shards plus the last one (:func:`rvqllm.checkpoint.publish`)
    in-000k/00000.safetensors the inputs (hidden states) of block k, one file per calibration batch
    fp-000k/...               the float model's inputs of block k (fine-tuning towards them, distillation)
    teacher-000N/...          the float model's top-k next-token log-probabilities (distillation)
    plan.json                 the code shape of each layer (config bpw_budget), chosen before block 0
    sens-0000/...
                              block k's input while the sensitivity of the layers is measured (removed after)
    shared-codebook.safetensors
                              the shared codebook as the distillation tuned it (config shared_codebook),
                              written before progress.json says distilled

After block ``i`` is quantized, its shard and the next block's inputs are written and flushed, then
``progress.json`` says ``blocks_done = i + 1``; only then are block ``i``'s inputs deleted. A kill at any
moment leaves the last committed state readable, and anything written after it is ignored and removed
on resume. Every file carries sha256 checksums, checked on read. Because quantization is deterministic
given its inputs (seeded k-means, exact fp32 activations on disk), a resumed run produces the same bytes
as an uninterrupted one.

Activations also live here while the run is going: at most one batch of hidden states is in memory at a
time, so a larger calibration set costs disk, not memory (:class:`DiskActivations`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .arch import set_module
from .checkpoint import block_tensors, read_shard, shard_name, write_shard
from .config import RVQConfig
from .errors import RVQError
from .fsutil import fsync_path
from .nn import SHARED_KEY, SHARED_NAME, QuantizedLinear, bind_shared
from .validate import TENSOR_SUMS_KEY, read_checksummed, tensor_digest, write_safetensors

RUN_VERSION = 1
STREAMS = ("in", "fp", "teacher")  #: activation streams a run folder may hold per block
PLAN_FILE = "plan.json"  #: the code shape per layer (config bpw_budget)


# ------------------------------------------------------------------------------------------ atomic files
def _atomic_replace(tmp: Path, final: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` so that a reader sees either the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    _atomic_replace(tmp, path)


def write_tensors_atomic(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file with per-tensor sha256 in its metadata, atomically (tmp + fsync + rename)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), TENSOR_SUMS_KEY: json.dumps({k: tensor_digest(v) for k, v in tensors.items()})}
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(tmp, tensors, meta)
    _atomic_replace(tmp, path)


# ------------------------------------------------------------------------------------------ activations
class MemoryActivations:
    """Hidden states of each calibration batch, kept in memory (the library default without a run folder)."""

    def __init__(self) -> None:
        self._items: dict[int, Tensor] = {}

    def put(self, j: int, hidden: Tensor) -> None:
        self._items[j] = hidden.detach()

    def get(self, j: int) -> Tensor:
        return self._items[j]


class DiskActivations:
    """Hidden states of each calibration batch, one checksummed safetensors file per batch in ``folder``.

    ``get`` reads one batch back (``[batch, seq, hidden]``, exactly the bits written), so memory holds
    one batch at a time however many batches there are.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, j: int) -> Path:
        return self.folder / f"{j:05d}.safetensors"

    def put(self, j: int, hidden: Tensor) -> None:
        write_tensors_atomic(self._path(j), {"hidden": hidden})

    def get(self, j: int) -> Tensor:
        tensors, _ = read_checksummed(self._path(j))
        if "hidden" not in tensors:
            raise RVQError(f"{self._path(j)} holds no hidden states: the run folder is damaged; "
                           "delete it (or pass --overwrite) to start over")
        return tensors["hidden"]

    def complete(self, batches: Iterable[int]) -> bool:
        return all(self._path(j).is_file() for j in batches)


# ------------------------------------------------------------------------------------------ fingerprint
def run_fingerprint(model_digest: str, config: RVQConfig, calibration: Tensor, layer_names: list[list[str]],
                    shared: Tensor | None = None) -> dict:
    """What must be identical for a run to be resumed: config, input model (``model_digest``, from the
    source), calibration, layers, and the shared codebook's contents (``shared``, config ``shared_codebook``:
    a file may change between two runs that name it)."""
    out = {
        "run_format": RUN_VERSION,
        "config": config.to_dict(),
        "model_sha256": model_digest,
        "calibration": {"shape": list(calibration.shape), "sha256": tensor_digest(calibration.long())},
        "layers": layer_names,
    }
    if shared is not None:
        out["shared_codebook_sha256"] = tensor_digest(shared)
    return out


_WHAT = {"config": "RVQ config", "model_sha256": "input model", "calibration": "calibration data",
         "layers": "set of layers to quantize", "run_format": "rvqllm version",
         "shared_codebook_sha256": "shared codebook file"}


# ------------------------------------------------------------------------------------------ run folder
class RunDir:
    """A quantization run's progress folder (see the module doc). Create with :meth:`open`."""

    def __init__(self, path: Path, fingerprint: dict, blocks_done: int, distilled: bool = False) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.blocks_done = blocks_done
        self.distilled = distilled
        self.n_blocks = len(fingerprint["layers"])

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict, resume: bool, clean: bool = True) -> RunDir:
        """Start a run in ``path`` (wiping what is there), or with ``resume`` continue the one it holds.

        Resuming checks that the stored fingerprint equals ``fingerprint`` and that every committed file
        is present; uncommitted leftovers of a killed run are removed (unless ``clean`` is false: how the
        ranks other than 0 join the folder that rank 0 has just opened).
        """
        path = Path(path)
        if resume and (path / "run.json").is_file():
            run = cls._reopen(path, fingerprint)
            if clean:
                run._remove_uncommitted()
            return run
        if path.exists() or path.is_symlink():
            if path.is_symlink() or not path.is_dir():
                raise RVQError(f"run folder {path} exists and is not a folder: remove it or choose another output")
            shutil.rmtree(path)
        path.mkdir(parents=True)
        write_json_atomic(path / "run.json", fingerprint)
        write_json_atomic(path / "progress.json", {"blocks_done": 0, "distilled": False})
        return cls(path, fingerprint, 0)

    @classmethod
    def _reopen(cls, path: Path, fingerprint: dict) -> RunDir:
        damaged = f"the run folder {path} is damaged: delete it (or pass --overwrite) to start over"
        try:
            stored = json.loads((path / "run.json").read_text())
            progress = json.loads((path / "progress.json").read_text()) if (path / "progress.json").exists() \
                else {"blocks_done": 0}
        except (OSError, ValueError):
            raise RVQError(damaged) from None
        if not isinstance(stored, dict) or not isinstance(progress, dict):
            raise RVQError(damaged)
        for key in fingerprint:
            if stored.get(key) != fingerprint[key]:
                raise RVQError(f"the interrupted run in {path} used a different {_WHAT.get(key, key)}: resume with "
                               "the same model, config and calibration, or pass --overwrite to start over")
        k = progress.get("blocks_done")
        n_blocks = len(fingerprint["layers"])
        if type(k) is not int or not 0 <= k <= n_blocks:
            raise RVQError(damaged)
        run = cls(path, fingerprint, k, progress.get("distilled") is True)
        for i in range(k):
            if not run.shard_path(i).is_file():
                raise RVQError(damaged)
        return run

    def shard_path(self, i: int) -> Path:
        """Block ``i``'s shard (the final checkpoint's name for it)."""
        return self.path / shard_name(i, self.n_blocks + 1)

    def _inputs_path(self, i: int, stream: str = "in") -> Path:
        return self.path / f"{stream}-{i:04d}"

    def _remove_uncommitted(self) -> None:
        keep = {"run.json", "progress.json", PLAN_FILE}
        keep |= {self._inputs_path(self.blocks_done, s).name for s in STREAMS}
        keep |= {self.shard_path(i).name for i in range(self.blocks_done)}
        if self.distilled:
            self._rename_distilled()
            keep.add(SHARED_FILE)
        for p in self.path.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    # -- activations -------------------------------------------------------------------------------
    def inputs(self, i: int, stream: str = "in") -> DiskActivations:
        """The store of block ``i``'s inputs (block ``blocks_done``'s are readable after a resume).

        ``stream`` is ``"in"`` (what the quantized model feeds the block), ``"fp"`` (what the float model
        feeds it) or ``"teacher"`` (with ``i`` = the number of blocks: the distillation targets)."""
        return DiskActivations(self._inputs_path(i, stream))

    def resumable_inputs(self, n_batches: int, stream: str = "in", mine: list[int] | None = None
                         ) -> DiskActivations | MemoryActivations | None:
        """Block ``blocks_done``'s committed inputs (of batches ``mine``, default all), or ``None`` when
        there are none to resume from."""
        if self.blocks_done == 0:
            return None
        if self.blocks_done >= self.n_blocks:
            return MemoryActivations()  # all blocks done: no inputs are read
        store = DiskActivations(self._inputs_path(self.blocks_done, stream))
        if not store.complete(mine if mine is not None else range(n_batches)):
            raise RVQError(f"the run folder {self.path} lacks the inputs of block {self.blocks_done}: "
                           "delete it (or pass --overwrite) to start over")
        return store

    def scratch(self, name: str) -> DiskActivations:
        """A store for tensors that live only while one step runs (e.g. ``"sens"``); remove it with
        :meth:`drop`. Not committed: a resume removes what a killed step left."""
        return DiskActivations(self._inputs_path(0, name))

    def drop(self, store: DiskActivations) -> None:
        shutil.rmtree(store.folder, ignore_errors=True)

    # -- mixed precision ------------------------------------------------------------------------------
    def save_plan(self, plan: dict[str, dict]) -> None:
        """Keep the code shape chosen for each layer (``bpw_budget``), so a resumed run need not measure again."""
        write_json_atomic(self.path / PLAN_FILE, plan)

    def plan(self) -> dict[str, dict] | None:
        """The saved plan (:meth:`save_plan`), or ``None`` when there is none yet."""
        path = self.path / PLAN_FILE
        if not path.is_file():
            return None
        try:
            plan = json.loads(path.read_text())
        except (OSError, ValueError):
            plan = None
        names = {n for block in self.fingerprint["layers"] for n in block}
        if not isinstance(plan, dict) or set(plan) != names or not all(isinstance(v, dict) for v in plan.values()):
            raise RVQError(f"{path} is damaged: delete the run folder {self.path} (or pass --overwrite) to start over")
        return plan

    # -- blocks ------------------------------------------------------------------------------------
    def commit_block(self, i: int, model: nn.Module, dtype: torch.dtype | None, *, write: bool = True) -> None:
        """Persist block ``i`` of ``model`` as its shard, then mark blocks ``0..i`` done, then drop block
        ``i``'s inputs. Block ``i + 1``'s inputs must already be complete in :meth:`inputs` ``(i + 1)``.
        ``write=False`` (ranks other than 0) only advances the in-memory state."""
        if write:
            self._write_block(i, model, dtype, self.shard_path(i))
            write_json_atomic(self.path / "progress.json", {"blocks_done": i + 1, "distilled": False})
            for stream in ("in", "fp"):
                shutil.rmtree(self._inputs_path(i, stream), ignore_errors=True)
        self.blocks_done = i + 1

    def commit_distilled(self, model: nn.Module, dtype: torch.dtype | None, *, write: bool = True) -> None:
        """Replace every block's shard by ``model``'s distilled blocks, all or nothing: the new shards are
        written beside the old ones, then ``progress.json`` says ``distilled``, then they are renamed in
        place (a resume finishes the renames)."""
        if write:
            for i in range(self.n_blocks):
                self._write_block(i, model, dtype, self._distilled_path(i))
            owner = getattr(model, SHARED_NAME, None)
            if owner is not None:  # the distillation tuned the shared codebook too: keep it with the shards
                write_shard(self.path / SHARED_FILE, {SHARED_KEY: owner.codebooks}, {})
            write_json_atomic(self.path / "progress.json", {"blocks_done": self.n_blocks, "distilled": True})
            self._rename_distilled()
        self.distilled = True

    def shared_codebook(self) -> Tensor | None:
        """The shared codebook as the distillation left it (:meth:`commit_distilled`), or ``None``."""
        path = self.path / SHARED_FILE
        if not self.distilled or not path.is_file():
            return None
        tensors, _ = read_shard(path)
        if SHARED_KEY not in tensors:
            raise RVQError(f"{path} lacks {SHARED_KEY}: the run folder is damaged; pass --overwrite to start over")
        return tensors[SHARED_KEY]

    def _write_block(self, i: int, model: nn.Module, dtype: torch.dtype | None, path: Path) -> None:
        specs = {n: model.get_submodule(n).spec() for n in self._layer_names(i)}
        write_shard(path, block_tensors(model, i, dtype), specs)

    def _distilled_path(self, i: int) -> Path:
        return self.shard_path(i).with_name(self.shard_path(i).name + ".distilled")

    def _rename_distilled(self) -> None:
        for i in range(self.n_blocks):
            if self._distilled_path(i).is_file():
                _atomic_replace(self._distilled_path(i), self.shard_path(i))

    def _layer_names(self, i: int) -> list[str]:
        return list(self.fingerprint["layers"][i])

    def layer_spec(self, i: int, name: str) -> dict:
        """The spec of committed layer ``name`` of block ``i``."""
        _, specs = read_shard(self.shard_path(i))
        spec = specs.get(name)
        if not isinstance(spec, dict):
            raise RVQError(f"{self.shard_path(i)} lacks layer {name}: the run folder is damaged; "
                           "pass --overwrite to start over")
        return spec

    def restore_block(self, i: int) -> tuple[dict[str, QuantizedLinear], dict[str, Tensor]]:
        """Block ``i``'s quantized layers as committed (by model-level name) and its other tensors (norms...)."""
        path = self.shard_path(i)
        tensors, specs = read_shard(path)
        out = {}
        for name in self._layer_names(i):
            spec = specs.get(name)
            if not isinstance(spec, dict):
                raise RVQError(f"{path} lacks layer {name}: the run folder is damaged; pass --overwrite to start over")
            bias = tensors.get(f"{name}.bias")
            layer = QuantizedLinear.from_spec(spec, bias_dtype=bias.dtype if bias is not None else torch.float16)
            layer.compute_dtype = torch.float32  # what quantization computes in (a streamed block's dtype)
            state = {k.removeprefix(f"{name}."): t for k, t in tensors.items() if k.startswith(f"{name}.")}
            try:
                layer.load_state_dict(state, strict=True)
            except RuntimeError:
                raise RVQError(f"{path}: layer {name} does not match its spec; "
                               "the run folder is damaged; pass --overwrite to start over") from None
            out[name] = layer
        quantized = tuple(f"{n}." for n in out)
        params = {k: t for k, t in tensors.items() if not k.startswith(quantized)}
        return out, params

    def load_committed_block(self, i: int, model: nn.Module, device: torch.device) -> None:
        """Put committed block ``i`` back into ``model`` (whose block ``i`` is an empty meta skeleton) on
        ``device``: quantized layers as stored, other tensors in float32."""
        layers, params = self.restore_block(i)
        for name, layer in layers.items():
            set_module(model, name, layer.to(device))
        bind_shared(model)  # layers with a shared codebook decode with the model's
        model.load_state_dict({k: t.to(device=device, dtype=torch.float32) if t.is_floating_point() else t.to(device)
                               for k, t in params.items()}, strict=False, assign=True)

    def finish(self) -> None:
        """Delete the run folder (after the final checkpoint is safely saved)."""
        shutil.rmtree(self.path, ignore_errors=True)


#: the run folder's copy of the distilled shared codebook (config ``shared_codebook``)
SHARED_FILE = "shared-codebook.safetensors"


def run_dir_for(out: str | Path) -> Path:
    """The run folder of output ``out``: ``<out>.partial`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")
