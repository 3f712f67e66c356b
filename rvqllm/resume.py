"""The run folder: a quantization run's progress on disk, committed after each decoder block.

Layout of ``<out>.partial/`` (written by :class:`RunDir`)::

    run.json                  fingerprint of the run: RVQConfig, sha256 of the input model's tensors and
                              of the calibration ids, the layer names of every block
    progress.json             {"blocks_done": k}: the commit point, replaced atomically after each block
    layers-0000.safetensors   block 0's quantized layers (codes, codebooks, scales, bias) + their specs
    ...
    in-000k/00000.safetensors the inputs (hidden states) of block k, one file per calibration batch

After block ``i`` is quantized, its layers and the next block's inputs are written and flushed, then
``progress.json`` says ``blocks_done = i + 1``; only then are block ``i``'s inputs deleted. A kill at any
moment leaves the last committed state readable, and anything written after it is ignored and removed
on resume. Every file carries sha256 checksums, checked on read. Because quantization is deterministic
given its inputs (seeded k-means, exact fp32 activations on disk), a resumed run produces the same bytes
as an uninterrupted one.

Activations also live here while the run is going: at most one batch of hidden states is in memory at a
time, so a larger calibration set costs disk, not memory (:class:`DiskActivations`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import RVQConfig
from .errors import RVQError
from .fsutil import fsync_path
from .nn import QuantizedLinear
from .validate import TENSOR_SUMS_KEY, read_checksummed, tensor_digest, write_safetensors

RUN_VERSION = 1
STREAMS = ("in", "fp")  #: activation streams a run folder may hold per block
PARAM_PREFIX = "block_param::"  #: key prefix of the float parameters a committed block carries


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

    def complete(self, n: int) -> bool:
        return all(self._path(j).is_file() for j in range(n))


# ------------------------------------------------------------------------------------------ fingerprint
def run_fingerprint(model: nn.Module, config: RVQConfig, calibration: Tensor,
                    layer_names: list[list[str]]) -> dict:
    """What must be identical for a run to be resumed: config, input model tensors, calibration, layers."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(bytes.fromhex(tensor_digest(t)))
    return {
        "run_format": RUN_VERSION,
        "config": config.to_dict(),
        "model_sha256": h.hexdigest(),
        "calibration": {"shape": list(calibration.shape), "sha256": tensor_digest(calibration.long())},
        "layers": layer_names,
    }


_WHAT = {"config": "RVQ config", "model_sha256": "input model", "calibration": "calibration data",
         "layers": "set of layers to quantize", "run_format": "rvqllm version"}


# ------------------------------------------------------------------------------------------ run folder
class RunDir:
    """A quantization run's progress folder (see the module doc). Create with :meth:`open`."""

    def __init__(self, path: Path, fingerprint: dict, blocks_done: int) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.blocks_done = blocks_done

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict, resume: bool) -> RunDir:
        """Start a run in ``path`` (wiping what is there), or with ``resume`` continue the one it holds.

        Resuming checks that the stored fingerprint equals ``fingerprint`` and that every committed file
        is present; uncommitted leftovers of a killed run are removed.
        """
        path = Path(path)
        if resume and (path / "run.json").is_file():
            run = cls._reopen(path, fingerprint)
            run._remove_uncommitted()
            return run
        if path.exists() or path.is_symlink():
            if path.is_symlink() or not path.is_dir():
                raise RVQError(f"run folder {path} exists and is not a folder: remove it or choose another output")
            shutil.rmtree(path)
        path.mkdir(parents=True)
        write_json_atomic(path / "run.json", fingerprint)
        write_json_atomic(path / "progress.json", {"blocks_done": 0})
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
        for i in range(k):
            if not cls._layers_path(path, i).is_file():
                raise RVQError(damaged)
        return cls(path, fingerprint, k)

    @staticmethod
    def _layers_path(path: Path, i: int) -> Path:
        return path / f"layers-{i:04d}.safetensors"

    def _inputs_path(self, i: int, stream: str = "in") -> Path:
        return self.path / f"{stream}-{i:04d}"

    def _remove_uncommitted(self) -> None:
        keep = {"run.json", "progress.json"} | {self._inputs_path(self.blocks_done, s).name for s in STREAMS}
        keep |= {self._layers_path(self.path, i).name for i in range(self.blocks_done)}
        for p in self.path.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    # -- activations -------------------------------------------------------------------------------
    def inputs(self, i: int, stream: str = "in") -> DiskActivations:
        """The store of block ``i``'s inputs (block ``blocks_done``'s are readable after a resume).

        ``stream`` is ``"in"`` (what the quantized model feeds the block) or ``"fp"`` (what the float
        model feeds it, kept when fine-tuning aims at the float model's activations)."""
        return DiskActivations(self._inputs_path(i, stream))

    def resumable_inputs(self, n_batches: int, stream: str = "in") -> DiskActivations | None:
        """Block ``blocks_done``'s committed inputs, or ``None`` when there are none to resume from."""
        if self.blocks_done == 0:
            return None
        store = DiskActivations(self._inputs_path(self.blocks_done, stream)) if self.blocks_done < len(
            self.fingerprint["layers"]) else MemoryActivations()  # all blocks done: no inputs are read
        if isinstance(store, DiskActivations) and not store.complete(n_batches):
            raise RVQError(f"the run folder {self.path} lacks the inputs of block {self.blocks_done}: "
                           "delete it (or pass --overwrite) to start over")
        return store

    # -- layers ------------------------------------------------------------------------------------
    def commit_block(self, i: int, layers: dict[str, QuantizedLinear], params: dict[str, Tensor] | None = None) -> None:
        """Persist block ``i``'s quantized layers (and the float ``params`` that fine-tuning changed, by
        model-level name), then mark blocks ``0..i`` done, then drop its inputs.

        Block ``i + 1``'s inputs must already be complete in :meth:`inputs` ``(i + 1)``.
        """
        tensors = {f"{PARAM_PREFIX}{name}": t for name, t in (params or {}).items()}
        for name, layer in layers.items():
            for key, t in layer.state_dict().items():
                tensors[f"{name}.{key}"] = t
        specs = {name: layer.spec() for name, layer in layers.items()}
        write_tensors_atomic(self._layers_path(self.path, i), tensors, {"specs": json.dumps(specs)})
        write_json_atomic(self.path / "progress.json", {"blocks_done": i + 1})
        self.blocks_done = i + 1
        for stream in STREAMS:
            shutil.rmtree(self._inputs_path(i, stream), ignore_errors=True)

    def restore_block(self, i: int, names: Iterable[str]) -> tuple[dict[str, QuantizedLinear], dict[str, Tensor]]:
        """Block ``i``'s quantized layers as written by :meth:`commit_block`, in the order of ``names``,
        and its float parameters (empty unless fine-tuning changed them)."""
        path = self._layers_path(self.path, i)
        tensors, metadata = read_checksummed(path)
        try:
            specs = json.loads(metadata.get("specs", ""))
        except ValueError:
            specs = None
        out = {}
        for name in names:
            spec = specs.get(name) if isinstance(specs, dict) else None
            if not isinstance(spec, dict):
                raise RVQError(f"{path} lacks layer {name}: the run folder is damaged; pass --overwrite to start over")
            bias = tensors.get(f"{name}.bias")
            layer = QuantizedLinear.from_spec(spec, bias_dtype=bias.dtype if bias is not None else torch.float16)
            state = {k.removeprefix(f"{name}."): t for k, t in tensors.items() if k.startswith(f"{name}.")}
            try:
                layer.load_state_dict(state, strict=True)
            except RuntimeError:
                raise RVQError(f"{path}: layer {name} does not match its spec; "
                               "the run folder is damaged; pass --overwrite to start over") from None
            out[name] = layer
        params = {k.removeprefix(PARAM_PREFIX): t for k, t in tensors.items() if k.startswith(PARAM_PREFIX)}
        return out, params

    def finish(self) -> None:
        """Delete the run folder (after the final checkpoint is safely saved)."""
        shutil.rmtree(self.path, ignore_errors=True)


def run_dir_for(out: str | Path) -> Path:
    """The run folder of output ``out``: ``<out>.partial`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")
