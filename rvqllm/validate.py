"""Checkpoint validation: loading *is* validation.

A checkpoint folder may come from a stranger. Nothing in it is executed (safetensors only, no pickle,
no ``trust_remote_code``) and no tensor reaches a kernel before it has passed, in this order:

1. ``config.json`` parses; ``quantization_config`` names method ``rvq`` and a known format version;
   every layer spec has integer fields in range (:func:`check_layer_spec`).
2. The weights: one ``model.safetensors`` (the first format), or ``model.safetensors.index.json`` and
   the shards it names (one per decoder block plus one for the rest, :mod:`rvqllm.checkpoint`). The index
   is bounded JSON whose ``weight_map`` names only ``model-XXXXX-of-XXXXX.safetensors`` files of this
   folder; every tensor must sit in the shard the index names, once. Where both layouts are present,
   ``model.safetensors`` is the one read (as transformers does).
   Each safetensors header is parsed by hand (:func:`read_header`) with bounds checks: header length
   within the file, known dtypes, ``data_offsets`` that match each shape and tile the data area exactly.
   A truncated or padded file fails here, naming the tensor.
3. The checksums stored at save time that headers hold: sha256 of ``config.json``'s content (canonical
   JSON; in ``model.safetensors``' metadata, or in the index's, which also holds the sha256 of each
   shard's header, so that shards of another checkpoint cannot be mixed in).
4. Sizes, before anything is built: every count of layers or experts the config declares is at most
   the number of tensors in the files, and the model skeleton is built on the meta device under a
   budget of registrations and computed-buffer bytes set by the files (:mod:`rvqllm.bounds`); the
   skeleton then says which tensors must be present, with which shape and dtype, and each quantized
   layer's spec must match the layer it replaces. Missing, unexpected, mis-shaped or mis-typed tensors
   fail, naming the tensor. Steps 1-4 read headers only (:func:`check_headers`): a config that declares
   a model larger than its files is refused in time and memory bounded by the files, whatever it declares.
5. Only then is tensor data read: sha256 of every tensor's raw bytes against the sums in its file's
   metadata; every code index below its codebook size ``2**bits``; a rotated layer's signs exactly ±1;
   codebooks, scales and every other floating tensor finite.

Checksums alone only catch accidents (anyone can recompute them), so sizes, structure and values are
checked independently.
Every failure is an :class:`RVQError` with one line naming the file or tensor and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import RVQError

#: the newest checkpoint format this rvqllm reads and writes. A checkpoint says the lowest version that
#: describes it (:func:`format_version`): 1 when every layer is RVQ-coded (readable by every rvqllm),
#: 2 when some layer is trellis-coded (an older rvqllm then says "upgrade" instead of misreading it)
FORMAT_VERSION = 2
#: the versions this rvqllm reads
READABLE_VERSIONS = (1, 2)
#: the spec field that marks a trellis-coded layer (:class:`rvqllm.nn.TrellisLinear`; its state bits ``L``) and
#: the format version that introduced it
TRELLIS_KEY = "trellis_state_bits"
TRELLIS_VERSION = 2
QUANT_METHOD = "rvq"
WEIGHTS_NAME = "model.safetensors"
#: the sharded layout: this index plus the shards it names (see :mod:`rvqllm.checkpoint`)
INDEX_NAME = "model.safetensors.index.json"
#: a shard's file name: ``model-<k>-of-<n>.safetensors`` (1-based ``k``, five digits each)
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
#: safetensors metadata key of a shard: JSON ``{layer name: spec}`` of the quantized layers it holds
SPECS_KEY = "rvq_specs"
#: index metadata key: ``{shard file: sha256 of its header bytes}`` (binds the shards to the index)
SHARD_HEADERS_KEY = "rvq_shard_header_sha256"
#: safetensors metadata keys holding the checksums
TENSOR_SUMS_KEY = "rvq_tensor_sha256"
CONFIG_SUM_KEY = "rvq_config_sha256"
#: refuse headers above this size before reading them (a real header is a few hundred KiB at most)
MAX_HEADER_BYTES = 64 * 2**20

#: safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1), "U8": (torch.uint8, 1), "I8": (torch.int8, 1), "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2), "I32": (torch.int32, 4), "U32": (torch.uint32, 4), "I64": (torch.int64, 8),
    "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2), "F32": (torch.float32, 4), "F64": (torch.float64, 8),
}
FLOAT_NAMES = {"F16", "BF16", "F32", "F64"}
_TORCH_TO_NAME = {v[0]: k for k, v in DTYPES.items()}
_FIX = "the checkpoint is corrupt or tampered; re-create or re-download it"

#: allowed ranges of a quantized layer's spec fields (RVQConfig's ranges)
SPEC_RANGES = {"vector_dim": (1, 64), "stages": (1, 8), "bits": (1, 16),
               "in_features": (1, 2**31 - 1), "out_features": (1, 2**31 - 1)}
#: largest Hadamard block a rotated layer's spec may name (optional field ``hadamard_block``)
MAX_HADAMARD_BLOCK = 1 << 16


# ------------------------------------------------------------------------------------------ checksums
def tensor_digest(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes as safetensors stores them (C order, little endian)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(flat.view(torch.uint8).numpy().data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The canonical bytes of a JSON value (sorted keys, no spaces), as the config checksum sees it."""
    if _has_nan(obj):
        raise ValueError("NaN in a config")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def _has_nan(obj: Any) -> bool:
    if isinstance(obj, float):
        return obj != obj
    if isinstance(obj, dict):
        return any(_has_nan(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_has_nan(v) for v in obj)
    return False


def config_digest(config: dict) -> str:
    """sha256 (hex) of a ``config.json`` dict's canonical JSON."""
    return hashlib.sha256(canonical_json(config)).hexdigest()


def checksum_metadata(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, str]:
    """The safetensors metadata entries that :func:`read_layout` and :func:`read_tensors` check on load.

    ``config`` must be the dict exactly as it will be read back from ``config.json`` (JSON round-tripped).
    """
    sums = {name: tensor_digest(t) for name, t in sorted(tensors.items())}
    return {TENSOR_SUMS_KEY: json.dumps(sums, sort_keys=True), CONFIG_SUM_KEY: config_digest(config)}


# ------------------------------------------------------------------------------------------ config
def read_config(folder: str | Path) -> dict:
    """``config.json`` of a checkpoint folder as a dict (checked to be a JSON object)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise RVQError(f"checkpoint {folder} {what}: give a folder written by `rvqllm quantize`")
    path = folder / "config.json"
    if not path.is_file():
        raise RVQError(f"{folder} is not an rvqllm checkpoint (no config.json): give a folder written by `rvqllm quantize`")
    cap = config_cap(weights_bytes(folder))
    try:
        with open(path, "rb") as f:
            raw = f.read(cap + 1)
    except OSError as err:
        raise RVQError(f"{path} cannot be read ({err.strerror or err}): check the file") from err
    if len(raw) > cap:
        raise RVQError(f"{path} is larger than {cap:,} bytes, more than a config of these weights needs: {_FIX}")
    try:
        config = json.loads(raw.decode("utf-8"), parse_constant=_infinity_only)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
        raise RVQError(f"{path} is not valid JSON: {_FIX}") from None
    if not isinstance(config, dict):
        raise RVQError(f"{path} is not a JSON object: {_FIX}")
    return config


def weights_bytes(folder: Path) -> int:
    """Bytes of a folder's safetensors files (``model.safetensors`` and shards), from ``stat`` alone."""
    total = 0
    for p in folder.glob("*.safetensors"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total


def config_cap(n_bytes: int) -> int:
    """Largest ``config.json`` read beside ``n_bytes`` of weights: 1 MiB plus 1/16 of the weights (a
    config of a few KiB plus one spec per quantized layer: ~3 MiB for a 36,000-layer MoE of ~60 GB),
    so that parsing the JSON costs memory in proportion to the files, whatever the config holds."""
    return min((1 << 20) + n_bytes // 16, MAX_HEADER_BYTES)


def _infinity_only(name: str) -> float:
    """``config.json`` may hold ``Infinity`` / ``-Infinity`` (transformers writes them, e.g. Mamba's
    ``time_step_limit``); ``NaN`` is refused."""
    if name == "NaN":
        raise ValueError("JSON constant NaN is not allowed")
    return float(name.replace("Infinity", "inf"))


def _reject_constant(name: str) -> None:
    raise ValueError(f"JSON constant {name} is not allowed")


def check_layer_spec(name: str, spec: Any, where: str = "config.json") -> dict:
    """Raise unless ``spec`` is ``{in_features, out_features, vector_dim, stages, bits: int, bias: bool}`` in range.

    ``where`` names the file the spec comes from, for the message."""
    if not isinstance(spec, dict):
        raise RVQError(f"{where}: quantized layer {name!r} has no spec object: {_FIX}")
    for key, (lo, hi) in SPEC_RANGES.items():
        v = spec.get(key)
        if type(v) is not int or not lo <= v <= hi:
            raise RVQError(f"{where}: quantized layer {name!r} has {key}={v!r}, not an integer in {lo}..{hi}: {_FIX}")
    if type(spec.get("bias")) is not bool:
        raise RVQError(f"{where}: quantized layer {name!r} has bias={spec.get('bias')!r}, not true/false: {_FIX}")
    if "shared_codebooks" in spec and spec["shared_codebooks"] is not True:  # optional: decodes with rvq_shared
        raise RVQError(f"{where}: quantized layer {name!r} has shared_codebooks={spec['shared_codebooks']!r}, "
                       f"which is true when present: {_FIX}")
    if TRELLIS_KEY in spec:  # optional: a trellis-coded layer (rvqllm.nn.TrellisLinear)
        L, k = spec[TRELLIS_KEY], spec.get("trellis_step_bits")
        if (type(L) is not int or type(k) is not int or not 1 <= k <= 8 or not k < L <= 24 or L % k
                or spec["vector_dim"] != 1 or spec["stages"] != 1 or spec["bits"] > 8 or spec.get("shared_codebooks")):
            raise RVQError(f"{where}: trellis layer {name!r} has trellis_state_bits={L!r}, trellis_step_bits={k!r}, "
                           f"vector_dim={spec['vector_dim']}, stages={spec['stages']}, bits={spec['bits']}: not a "
                           f"trellis code rvqllm writes; {_FIX}")
    if "hadamard_block" in spec:  # optional: the layer is rotated (rvqllm.rvq.rotation)
        b = spec["hadamard_block"]
        width = -(-spec["in_features"] // spec["vector_dim"]) * spec["vector_dim"]
        if type(b) is not int or not 1 <= b <= MAX_HADAMARD_BLOCK or b & (b - 1) or width % b:
            raise RVQError(f"{where}: quantized layer {name!r} has hadamard_block={b!r}, not a power of two "
                           f"dividing its coded width {width}: {_FIX}")
    return spec


def shared_shape(layers: dict[str, dict], where: str) -> tuple[int, int, int] | None:
    """``(stages, 2**bits, vector_dim)`` of the shared codebook the layers with ``shared_codebooks`` decode
    with (they must agree), or ``None`` when no layer shares one."""
    shapes = {(s["stages"], 1 << s["bits"], s["vector_dim"]) for s in layers.values() if s.get("shared_codebooks")}
    if len(shapes) > 1:
        raise RVQError(f"{where}: layers with shared_codebooks disagree on the codebook's shape "
                       f"({sorted(shapes)}), but a model has one shared codebook: {_FIX}")
    return next(iter(shapes), None)


def format_version(layers: dict[str, dict]) -> int:
    """The format version a checkpoint of these layer specs is written as: the lowest that describes it."""
    return TRELLIS_VERSION if any(TRELLIS_KEY in s for s in layers.values()) else 1


def check_quantization_config(config: dict, folder: str | Path) -> dict:
    """The validated ``quantization_config`` of a parsed ``config.json``."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise RVQError(f"{folder} is not an rvqllm checkpoint (no quantization_config with quant_method 'rvq')")
    version = q.get("format_version")
    if version not in READABLE_VERSIONS or type(version) is not int:
        raise RVQError(
            f"{folder} has checkpoint format version {version!r}; this rvqllm reads versions "
            f"{list(READABLE_VERSIONS)}: upgrade rvqllm or re-quantize the model"
        )
    layers = q.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise RVQError(f"{folder}/config.json: quantization_config lists no quantized layers: {_FIX}")
    for name, spec in layers.items():
        check_layer_spec(name, spec)
    if version != format_version(layers):
        raise RVQError(f"{folder}/config.json: format version {version} does not match its layers (version "
                       f"{format_version(layers)} describes them): {_FIX}")
    shared_shape(layers, f"{folder}/config.json")
    if not isinstance(q.get("rvq_config", {}), dict):
        raise RVQError(f"{folder}/config.json: quantization_config.rvq_config is not an object: {_FIX}")
    return q


# ------------------------------------------------------------------------------------------ safetensors
@dataclass
class TensorEntry:
    """One tensor as the safetensors header describes it (offsets are absolute file positions)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a standard safetensors file whose bytes depend only on its content.

    (The ``safetensors`` library writes ``__metadata__`` in hash-map order, which changes from process to
    process; a resumed run must give the same bytes as an uninterrupted one.) Tensors are laid out in
    name order, the header is compact JSON with sorted keys, space-padded to a multiple of 8 bytes.
    """
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    pos = 0
    blobs = []
    for name in names:
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _TORCH_TO_NAME:
            raise TypeError(f"tensor {name}: dtype {t.dtype} has no safetensors name")
        blob = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")
        header[name] = {"dtype": _TORCH_TO_NAME[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + blob.nbytes]}
        pos += blob.nbytes
        blobs.append(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def read_header(path: Path, data: bytes | memoryview, size: int | None = None
                ) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and bounds-check a safetensors header. Returns ``(entries by name, metadata)``.

    ``data`` is the whole file, or (with ``size``, the file's length in bytes) at least its first
    ``8 + header length`` bytes: the offsets are checked against ``size`` either way."""
    size = len(data) if size is None else size
    if size < 8 or len(data) < 8:
        raise RVQError(f"{path} is truncated ({size} bytes, no header): {_FIX}")
    n = int.from_bytes(bytes(data[:8]), "little")
    if n < 2 or n > min(size - 8, MAX_HEADER_BYTES) or len(data) < 8 + n:
        raise RVQError(f"{path}: header length {n} does not fit the file of {size} bytes (truncated?): {_FIX}")
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"), parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
        raise RVQError(f"{path}: the header is not valid JSON: {_FIX}") from None
    if not isinstance(header, dict):
        raise RVQError(f"{path}: the header is not a JSON object: {_FIX}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise RVQError(f"{path}: the header's __metadata__ is not a string map: {_FIX}")
    start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, e in header.items():
        if not isinstance(e, dict):
            raise RVQError(f"{path}: tensor {name!r} has no header entry object: {_FIX}")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in DTYPES:
            raise RVQError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}: {_FIX}")
        if not isinstance(shape, list) or not all(type(s) is int and 0 <= s < 2**40 for s in shape) or len(shape) > 8:
            raise RVQError(f"{path}: tensor {name!r} has an invalid shape {shape!r}: {_FIX}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise RVQError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}: {_FIX}")
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        if offsets[1] - offsets[0] != nbytes:
            raise RVQError(f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but shape {shape} "
                           f"of {dtype} needs {nbytes}: {_FIX}")
        entries[name] = TensorEntry(name, dtype, tuple(shape), start + offsets[0], start + offsets[1])
    pos = start
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            what = "overlaps another tensor" if e.begin < pos else "leaves a gap before it"
            raise RVQError(f"{path}: tensor {e.name!r} {what} in the data area: {_FIX}")
        pos = e.end
    if pos != size:
        if pos > size:
            last = max(entries.values(), key=lambda e: e.end)
            raise RVQError(f"{path} is truncated: tensor {last.name!r} ends at byte {last.end} "
                           f"but the file has {size} bytes: {_FIX}")
        raise RVQError(f"{path} has {size - pos} unexpected trailing bytes after the last tensor: {_FIX}")
    return entries, metadata


def read_header_only(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], str]:
    """A safetensors file's header without its tensor data (reads at most ``8 + MAX_HEADER_BYTES`` bytes).

    Returns ``(entries by name, metadata, sha256 hex of the header bytes)``; the entries are checked
    against the file's size like :func:`read_header` does."""
    if not path.is_file():
        raise RVQError(f"{path} is missing: the checkpoint is incomplete; re-create or re-download it")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                head += f.read(n)
    except OSError as err:
        raise RVQError(f"{path} cannot be read ({err.strerror or err}): check the file") from err
    entries, metadata = read_header(path, head, size)
    return entries, metadata, hashlib.sha256(head).hexdigest()


def read_checksummed(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file written with :func:`checksum_metadata`-style tensor sums, checking its header
    and every tensor's sha256. Returns ``(CPU tensors by name, metadata)``; the file is not kept open."""
    tensors, metadata, _ = _read_checksummed(path)
    return tensors, metadata


def _read_checksummed(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """:func:`read_checksummed`, plus the sha256 of the file's header bytes."""
    if not path.is_file():
        raise RVQError(f"{path} is missing: the checkpoint is incomplete; re-create or re-download it")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RVQError(f"{path} cannot be read ({err.strerror or err}): check the file") from err
    entries, metadata = read_header(path, data)
    header_sum = hashlib.sha256(memoryview(data)[: 8 + int.from_bytes(data[:8], "little")]).hexdigest()
    if TENSOR_SUMS_KEY not in metadata:
        raise RVQError(f"{path} carries no checksums (not written by this rvqllm, or tampered): {_FIX}")
    try:
        sums = json.loads(metadata[TENSOR_SUMS_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise RVQError(f"{path}: the stored tensor checksums are not valid JSON: {_FIX}") from None
    if not isinstance(sums, dict):
        raise RVQError(f"{path}: the stored tensor checksums are not a map: {_FIX}")
    for name in sorted(set(sums) - set(entries)):
        raise RVQError(f"{path} lacks tensor {name!r} (listed in its checksums): {_FIX}")
    view = memoryview(data)
    tensors = {}
    for name, e in entries.items():
        if name not in sums:
            raise RVQError(f"{path}: tensor {name!r} has no stored checksum: {_FIX}")
        if hashlib.sha256(view[e.begin : e.end]).hexdigest() != sums[name]:
            raise RVQError(f"{path}: tensor {name!r} does not match its stored checksum (corrupted bytes): {_FIX}")
        dtype = DTYPES[e.dtype][0]
        if e.end > e.begin:
            t = torch.frombuffer(bytearray(view[e.begin : e.end]), dtype=dtype)
        else:
            t = torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(e.shape)
    return tensors, metadata, header_sum


def _check_config_sum(stored: str, config: dict, folder: Path, where: str) -> None:
    """``config.json`` of ``folder`` must have the checksum ``stored`` in file ``where``."""
    try:
        want = config_digest(config)
    except ValueError:
        raise RVQError(f"{folder}/config.json holds NaN: {_FIX}") from None
    if stored != want:
        raise RVQError(f"{folder}/config.json does not match the checksum stored in {where} (edited or corrupted): {_FIX}")


# ------------------------------------------------------------------------------------------ shards
class _RepeatedKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _RepeatedKey(k)
        out[k] = v
    return out


def shard_specs(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """The specs ``{layer name: spec}`` of the quantized layers a shard holds (its ``rvq_specs`` metadata),
    each checked like ``config.json``'s (:func:`check_layer_spec`)."""
    if SPECS_KEY not in metadata:
        raise RVQError(f"{path} carries no {SPECS_KEY} metadata (not a shard written by this rvqllm, or tampered): {_FIX}")
    try:
        specs = json.loads(metadata[SPECS_KEY], parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise RVQError(f"{path}: its {SPECS_KEY} metadata is not valid JSON: {_FIX}") from None
    if not isinstance(specs, dict):
        raise RVQError(f"{path}: its {SPECS_KEY} metadata is not a JSON object: {_FIX}")
    for name, spec in specs.items():
        check_layer_spec(name, spec, where=str(path))
    return specs


def read_index(folder: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """``(weight_map, metadata)`` of ``folder``'s ``model.safetensors.index.json``, checked: a JSON object
    (at most ``MAX_HEADER_BYTES``, no repeated keys) whose ``weight_map`` maps tensor names to shard files
    of this folder (``model-XXXXX-of-NNNNN.safetensors``, one ``NNNNN`` for all) and whose ``metadata``
    is an object. The shards themselves are not read."""
    path = folder / INDEX_NAME
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_HEADER_BYTES + 1)
    except FileNotFoundError:
        raise RVQError(f"{path} is missing: the checkpoint is incomplete; re-create or re-download it") from None
    except OSError as err:
        raise RVQError(f"{path} cannot be read ({err.strerror or err}): check the file") from err
    if len(raw) > MAX_HEADER_BYTES:
        raise RVQError(f"{path} is larger than {MAX_HEADER_BYTES >> 20} MiB, far more than any index: {_FIX}")
    try:
        index = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_pairs)
    except _RepeatedKey as err:
        raise RVQError(f"{path} holds key {err.args[0]!r} twice: {_FIX}") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RVQError(f"{path} is not valid JSON: {_FIX}") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
        raise RVQError(f"{path} is not a JSON object with a non-empty weight_map: {_FIX}")
    if not isinstance(index.get("metadata"), dict):
        raise RVQError(f"{path} has no metadata object: {_FIX}")
    weight_map = index["weight_map"]
    totals = set()
    for name, file in weight_map.items():
        m = SHARD_RE.fullmatch(file) if isinstance(file, str) else None
        if m is None or not 1 <= int(m[1]) <= int(m[2]):
            raise RVQError(f"{path} puts tensor {name!r} in {file!r}, not a shard file of this folder "
                           f"(model-XXXXX-of-XXXXX.safetensors): {_FIX}")
        totals.add(m[2])
    if len(totals) > 1:
        raise RVQError(f"{path} names shards of different checkpoints (of {' and '.join(sorted(totals))} shards): {_FIX}")
    return weight_map, index["metadata"]


@dataclass
class Layout:
    """A checkpoint's weights as their headers describe them (no tensor data read yet)."""

    entries: dict[str, TensorEntry]  #: every tensor, by name
    files: dict[str, Path]  #: the file each tensor is in
    header_sums: dict[Path, str]  #: sha256 of each file's header bytes
    size: int  #: bytes of all the files
    sharded: bool


def read_layout(folder: Path, config: dict, quantized: dict[str, dict]) -> Layout:
    """Read and check a checkpoint's weight headers, not its tensor data: the safetensors headers (bounds,
    dtypes, offsets), the config checksum, and for the sharded layout the index (:func:`read_index`), the
    shard header checksums it stores, that each tensor sits in the shard the index names (once), the
    index's ``total_size`` and that each shard's ``rvq_specs`` agree with ``quantized`` (``config.json``'s
    layer specs). Reads a few KiB per file."""
    single = folder / WEIGHTS_NAME
    if single.exists() or single.is_symlink() or not (folder / INDEX_NAME).exists():
        entries, metadata, header_sum = read_header_only(single)  # says so if it is missing
        if TENSOR_SUMS_KEY not in metadata or CONFIG_SUM_KEY not in metadata:
            raise RVQError(f"{single} carries no checksums (not written by this rvqllm, or tampered): {_FIX}")
        _check_config_sum(metadata[CONFIG_SUM_KEY], config, folder, WEIGHTS_NAME)
        return Layout(entries, dict.fromkeys(entries, single), {single: header_sum}, single.stat().st_size, False)
    index = folder / INDEX_NAME
    weight_map, meta = read_index(folder)
    version = str(config.get("quantization_config", {}).get("format_version"))
    if meta.get("quant_method") != QUANT_METHOD or meta.get("format_version") != version:
        raise RVQError(f"{index}: its metadata does not say quant_method {QUANT_METHOD!r}, format_version "
                       f"'{version}' (the config's): {_FIX}")
    if not isinstance(meta.get(CONFIG_SUM_KEY), str) or not isinstance(meta.get(SHARD_HEADERS_KEY), dict):
        raise RVQError(f"{index} carries no config or shard checksums (not written by this rvqllm, or tampered): {_FIX}")
    _check_config_sum(meta[CONFIG_SUM_KEY], config, folder, INDEX_NAME)
    layout = Layout({}, {}, {}, 0, True)
    total = 0
    for file in sorted(set(weight_map.values())):
        path = folder / file
        shard, metadata, header_sum = read_header_only(path)
        if TENSOR_SUMS_KEY not in metadata:
            raise RVQError(f"{path} carries no checksums (not written by this rvqllm, or tampered): {_FIX}")
        if meta[SHARD_HEADERS_KEY].get(file) != header_sum:
            raise RVQError(f"{path} is not the shard {INDEX_NAME} was written with (its header checksum differs: "
                           f"edited, or a shard of another checkpoint): {_FIX}")
        for name, e in shard.items():
            if weight_map.get(name) != file:
                listed = f"places in {weight_map[name]}" if name in weight_map else "does not list"
                raise RVQError(f"{path} holds tensor {name!r}, which {INDEX_NAME} {listed}: {_FIX}")
            layout.entries[name], layout.files[name] = e, path
            total += e.end - e.begin
        specs = shard_specs(path, metadata)
        held = {n for n in quantized if f"{n}.codes" in shard}
        for n in sorted(held | set(specs)):
            if specs.get(n) != quantized.get(n):
                raise RVQError(f"{path}: its {SPECS_KEY} entry for layer {n!r} disagrees with config.json: {_FIX}")
        layout.header_sums[path] = header_sum
        layout.size += path.stat().st_size
    for name, file in weight_map.items():
        if name not in layout.entries:
            raise RVQError(f"{folder / file} lacks tensor {name!r} (listed in {INDEX_NAME}): {_FIX}")
    if meta.get("total_size") != total:
        raise RVQError(f"{index}: total_size {meta.get('total_size')!r} is not the {total} bytes its shards hold: {_FIX}")
    return layout


def read_tensors(layout: Layout) -> dict[str, torch.Tensor]:
    """Every tensor of a checked :class:`Layout`, each checked against its stored sha256 (CPU tensors).

    A file whose header changed since :func:`read_layout` read it is refused."""
    tensors: dict[str, torch.Tensor] = {}
    for path, header_sum in layout.header_sums.items():
        shard, _, now = _read_checksummed(path)
        if now != header_sum:
            raise RVQError(f"{path} changed while it was being loaded: load it again once nothing writes to it")
        tensors.update(shard)
    return tensors


# ------------------------------------------------------------------------------------------ structure
def expected_tensors(skeleton: nn.Module) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], list[list[str]]]:
    """What a checkpoint of ``skeleton`` (a meta-device model with its quantized layers in place) holds.

    Returns ``(name -> (shape, dtype), alias groups)``: names in one alias group share one tensor (tied
    weights), and the checkpoint stores exactly one of them.
    """
    groups: dict[int, list[str]] = {}
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, t in skeleton.state_dict(keep_vars=True).items():
        spec[name] = (tuple(t.shape), t.dtype)
        groups.setdefault(id(t), []).append(name)
    return spec, list(groups.values())


def check_structure(path: Path, tensors: dict[str, torch.Tensor], skeleton: nn.Module, quantized: dict[str, dict],
                    where: dict[str, Path] | None = None) -> None:
    """Every expected tensor present once, nothing unexpected, right shapes and dtypes.

    Quantized buffers must have their exact dtype (codes uint8/int16 by bits, codebooks and scales fp16);
    other floating tensors may be stored in any float dtype (they are cast on load); integer buffers exact.
    Messages name ``path``, or for one tensor the file ``where`` says it came from.
    """
    from .nn import SHARED_KEY
    from .rvq import code_dtype

    def at(name: str) -> Path:
        return (where or {}).get(name, path)

    spec, groups = expected_tensors(skeleton)
    exact = {}
    for name, s in quantized.items():
        exact[f"{name}.codes"] = code_dtype(s["bits"])
        exact[f"{name}.codebooks"] = torch.float16
        exact[f"{name}.scales"] = torch.float16
    exact[SHARED_KEY] = torch.float16
    for name in tensors:
        if name not in spec:
            raise RVQError(f"{at(name)} holds tensor {name!r}, which the model has no place for: "
                           f"the checkpoint does not match its config; {_FIX}")
    for group in groups:
        present = [n for n in group if n in tensors]
        if not present:
            raise RVQError(f"{path} lacks tensor {group[0]!r}: {_FIX}")
        if len(present) > 1:
            raise RVQError(f"{path} stores tied tensor {present[1]!r} twice (also as {present[0]!r}): {_FIX}")
    for name, t in tensors.items():
        shape, dtype = spec[name]
        if tuple(t.shape) != shape:
            raise RVQError(f"{at(name)}: tensor {name!r} has shape {list(t.shape)} but the config makes it "
                           f"{list(shape)}: the config disagrees with the tensors; {_FIX}")
        want = exact.get(name)
        if want is not None and t.dtype != want:
            raise RVQError(f"{at(name)}: tensor {name!r} is {_TORCH_TO_NAME.get(t.dtype, t.dtype)}, "
                           f"expected {_TORCH_TO_NAME[want]}: {_FIX}")
        if want is None and dtype.is_floating_point != t.dtype.is_floating_point:
            raise RVQError(f"{at(name)}: tensor {name!r} is {_TORCH_TO_NAME.get(t.dtype, t.dtype)}, "
                           f"expected a {'float' if dtype.is_floating_point else 'integer'} tensor: {_FIX}")
        if want is None and not dtype.is_floating_point and t.dtype != dtype:
            raise RVQError(f"{at(name)}: tensor {name!r} is {_TORCH_TO_NAME.get(t.dtype, t.dtype)}, "
                           f"expected {_TORCH_TO_NAME.get(dtype, dtype)}: {_FIX}")


def check_values(path: Path, tensors: dict[str, torch.Tensor], quantized: dict[str, dict],
                 where: dict[str, Path] | None = None) -> None:
    """Every code index below ``2**bits``; every floating tensor (codebooks, scales, the rest) finite.

    Messages name the file ``where`` says a tensor came from, else ``path``."""
    def file_of(name: str) -> Path:
        return (where or {}).get(name, path)

    for name, s in quantized.items():
        codes = tensors[f"{name}.codes"]
        if s["bits"] < 16 and codes.numel() and TRELLIS_KEY not in s:  # every byte string is a valid walk
            idx = codes.long() & 0xFFFF if codes.dtype == torch.int16 else codes.long()
            k = 1 << s["bits"]
            bad = (idx >= k).nonzero()
            if len(bad):
                at = bad[0].tolist()
                raise RVQError(f"{file_of(f'{name}.codes')}: tensor '{name}.codes' holds code {int(idx[tuple(at)])} at {at}, past the "
                               f"codebook size {k} (bits={s['bits']}): {_FIX}")
        signs = tensors.get(f"{name}.signs") if s.get("hadamard_block") else None
        if signs is not None:
            bad = ((signs != 1) & (signs != -1)).nonzero()
            if len(bad):
                at = bad[0].tolist()
                raise RVQError(f"{file_of(f'{name}.signs')}: tensor '{name}.signs' holds {signs[tuple(at)].item()} at {at}, not +1 or -1 "
                               f"(a rotation's signs): {_FIX}")
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            raise RVQError(f"{file_of(name)}: tensor {name!r} holds NaN or Inf values: {_FIX}")


# ------------------------------------------------------------------------------------------ all of it
@dataclass
class ValidatedCheckpoint:
    """A checkpoint that passed every check: the meta-device skeleton with quantized layers in place,
    the tensors to load into it, and the parsed configs."""

    skeleton: nn.Module
    tensors: dict[str, torch.Tensor]
    config: dict
    quantization_config: dict


def validate_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32) -> ValidatedCheckpoint:
    """Run every check on a checkpoint folder (see the module doc); raise :class:`RVQError` on the first failure.

    The returned skeleton's non-quantized parameters are on the meta device in ``dtype``; the caller
    assigns the returned tensors (``load_state_dict(..., assign=True)``).
    """
    folder = Path(folder)
    skeleton, layout, config, qcfg = check_headers(folder, dtype)
    weights = folder if layout.sharded else folder / WEIGHTS_NAME
    tensors = read_tensors(layout)
    check_values(weights, tensors, qcfg["layers"], layout.files if layout.sharded else None)
    return ValidatedCheckpoint(skeleton, tensors, config, qcfg)


def check_headers(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Layout, dict, dict]:
    """Every check that needs no tensor data (steps 1, 2, 4 of the module doc and the config checksum),
    in time and memory bounded by the files' headers whatever the config declares (:mod:`rvqllm.bounds`).

    Returns ``(meta skeleton with quantized layers in place, layout, config, quantization_config)``."""
    from transformers import AutoConfig

    from .arch import is_conv1d, is_linear, prepare_for_layers, set_module
    from .bounds import build_skeleton, check_declared_counts
    from .nn import QuantizedLinear, attach_shared, bind_shared

    folder = Path(folder)
    config = read_config(folder)
    qcfg = check_quantization_config(config, folder)
    layout = read_layout(folder, config, qcfg["layers"])  # headers only: a few KiB per file
    n = len(layout.entries)
    shared = shared_shape(qcfg["layers"], f"{folder}/config.json")
    least = sum(2 if s.get("shared_codebooks") else 3 for s in qcfg["layers"].values()) + (shared is not None)
    if least > n:  # codes, codebooks and scales each (codebooks once for the sharing layers)
        raise RVQError(f"{folder}/config.json lists {len(qcfg['layers'])} quantized layers but the weights hold "
                       f"only {n} tensors: {_FIX}")
    check_declared_counts(config, n, str(folder), _FIX)
    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # config classes validate with their own exception types
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:200]
        raise RVQError(f"{folder}/config.json is not a model config transformers can build ({first}): {_FIX}") from None
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    weights = folder if layout.sharded else folder / WEIGHTS_NAME
    where = layout.files if layout.sharded else None
    declared = {k: torch.empty(e.shape, dtype=DTYPES[e.dtype][0], device="meta") for k, e in layout.entries.items()}

    def swap_quantized(skeleton: nn.Module) -> nn.Module:
        prepare_for_layers(skeleton, list(qcfg["layers"]))  # e.g. split fused MoE experts (rvqllm.arch)
        for name, spec in qcfg["layers"].items():
            try:
                module = skeleton.get_submodule(name)
            except AttributeError:
                raise RVQError(f"{folder}/config.json lists quantized layer {name!r}, which the model has not: {_FIX}") from None
            if not is_linear(module):
                raise RVQError(f"{folder}/config.json lists quantized layer {name!r}, which is a "
                               f"{type(module).__name__}, not a linear layer: {_FIX}")
            out_f, in_f = (module.weight.shape[1], module.weight.shape[0]) if is_conv1d(module) else module.weight.shape
            if (spec["out_features"], spec["in_features"]) != (out_f, in_f):
                raise RVQError(f"{folder}/config.json says layer {name!r} is {spec['out_features']}x{spec['in_features']} "
                               f"but the model config makes it {out_f}x{in_f}: {_FIX}")
            set_module(skeleton, name, QuantizedLinear.from_spec(spec, bias_dtype=dtype, device="meta"))
        if shared is not None:  # one meta codebook the sharing layers point at; load() assigns its tensor
            attach_shared(skeleton, torch.empty(shared, dtype=torch.float16, device="meta"))
            bind_shared(skeleton)
        skeleton.tie_weights()
        return skeleton

    def check(meta_skeleton: nn.Module) -> None:  # before anything real is built
        check_structure(weights, declared, swap_quantized(meta_skeleton), qcfg["layers"], where)

    skeleton = build_skeleton(hf_config, n_tensors=n, n_bytes=layout.size, label=str(folder), fix=_FIX, dtype=dtype,
                              check=check)
    swap_quantized(skeleton)
    return skeleton, layout, config, qcfg


# ------------------------------------------------------------------------------------------ inputs to quantize
def check_vector_dim_fits(vector_dim: int, widths: dict[str, int]) -> None:
    """Refuse a ``vector_dim`` that divides no layer's input width.

    Zero-padding a few layers up to a multiple of ``vector_dim`` is by design (it costs a little size);
    but when *no* layer's ``in_features`` is a multiple of it, the value is almost surely a mistake.
    """
    if widths and not any(w % vector_dim == 0 for w in widths.values()):
        distinct = sorted(set(widths.values()))
        divisors = [d for d in (8, 4, 16, 32, 6, 12, 2) if all(w % d == 0 for w in distinct)]
        hint = f"e.g. vector_dim={divisors[0]}" if divisors else "a divisor of them"
        raise RVQError(f"vector_dim={vector_dim} divides no layer's input width (widths {distinct}): "
                       f"choose {hint}")


def check_finite_parameters(model: nn.Module) -> None:
    """Refuse a model with NaN/Inf in any floating parameter or buffer, naming the first one."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            raise RVQError(f"{name} of the input model holds NaN/Inf values: the model is corrupt; "
                           "re-download or re-convert it")


def _two_sequences(model: nn.Module, seq_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two seeded random ``[1, seq_len]`` token sequences that differ only in their last token."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab or vocab < 2:
        return None
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq_len), generator=gen)
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1 + int(torch.randint(0, vocab - 1, (1,), generator=gen))) % vocab
    if other[0, -1] == ids[0, -1]:
        other[0, -1] = (ids[0, -1] + 1) % vocab
    return ids, other


def _refuse_if_different(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    scale = a.abs().max().clamp_min(1e-6)
    if (a - b).abs().max() > 1e-3 * scale:
        raise RVQError(f"{type(model).__name__} is not causal: its outputs at a position change with later "
                       "tokens (bidirectional attention); rvqllm quantizes causal (decoder-only) LMs")


def check_causal_first_block(model: nn.Module, first_block: nn.Module, device: torch.device,
                             seq_len: int = 8) -> None:
    """:func:`check_causal_behaviour` for a model streamed block by block: the embeddings and the first
    decoder block (loaded) only, which is where bidirectional attention shows."""
    from .calibration import capture_block_inputs

    pair = _two_sequences(model, seq_len)
    if pair is None:
        return
    outs = []
    with torch.no_grad():
        for ids in pair:
            (inp,) = capture_block_inputs(model, first_block, [ids.to(device)])
            out = first_block(inp.hidden, **inp.kwargs)
            outs.append((out[0] if isinstance(out, tuple | list) else out)[0, :-1].float())
    _refuse_if_different(model, *outs)


def check_causal_behaviour(model: nn.Module, seq_len: int = 8) -> None:
    """Refuse a model whose outputs at position ``t`` depend on tokens after ``t`` (bidirectional).

    Runs two seeded random sequences that differ only in their last token and compares the logits of
    every earlier position; a causal LM gives the same values (up to float noise).
    """
    pair = _two_sequences(model, seq_len)
    if pair is None:
        return
    device = next(model.parameters()).device
    with torch.no_grad():
        a, b = (model(input_ids=ids.to(device), use_cache=False).logits[0, :-1].float() for ids in pair)
    _refuse_if_different(model, a, b)
