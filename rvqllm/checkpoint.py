"""The on-disk format: safetensors shards, one per decoder block, + ``config.json`` with a ``quantization_config``.

Folder layout (``N`` = number of decoder blocks + 1)::

    model-00001-of-0000N.safetensors   block 0: every tensor named ``<blocks>.0.*`` (``<blocks>`` is the decoder
                                       block list, e.g. ``model.layers``): its quantized layers and its
                                       float parameters (norms...)
    ...                                one shard per block, in block order
    model-0000N-of-0000N.safetensors   everything else (embeddings, final norm, lm_head unless tied)
    model.safetensors.index.json       {"metadata": {total_size, rvq_config_sha256, rvq_shard_header_sha256,
                                       format_version: "1" or "2", quant_method: "rvq"}, "weight_map": {tensor: shard}}
    config.json                        the model's transformers config plus
                                       quantization_config = {quant_method: "rvq", format_version, rvq_config, layers}
                                       where layers maps NAME -> {in_features, out_features, vector_dim, stages,
                                       bits, bias} plus hadamard_block (power of two) for a rotated layer
    generation_config.json, tokenizer files

For each quantized layer NAME a shard holds NAME.codes [out, in_groups, stages] uint8|int16,
NAME.codebooks [stages, 2**bits, vector_dim] fp16, NAME.scales [out] fp16, NAME.bias [out] (if any) and
NAME.signs [in_groups * vector_dim] int8 ±1 (rotated layers only). A layer whose spec says
``shared_codebooks: true`` stores no codebooks of its own: it decodes with the model's one shared codebook,
``rvq_shared.codebooks [stages, 2**bits, vector_dim]`` fp16, stored once in the last shard (config
``shared_codebook``; every sharing layer has that code shape). A trellis-coded layer (config ``coder:
trellis``; spec ``vector_dim 1, stages 1, bits Q`` plus ``trellis_state_bits`` L and ``trellis_step_bits`` k)
stores under the same names its packed walks ``NAME.codes [in, ceil((L + k (out - 1)) / 8)]`` uint8
(:mod:`rvqllm.rvq.trellis`), its codeword table ``NAME.codebooks [1, 2**Q, 1]`` fp16, scales and signs.
``format_version`` is the lowest that describes the layers (:func:`rvqllm.validate.format_version`): 1
when every layer is RVQ-coded (what every rvqllm reads), 2 with a trellis layer. Unquantized float tensors are stored
in the model's 16-bit dtype; tied duplicates (lm_head <- embed_tokens) are stored once.

Each shard's safetensors metadata holds the sha256 of every tensor it holds (``rvq_tensor_sha256``) and
the specs of its quantized layers (``rvq_specs``), so a block's shard is complete on its own: a
quantization run writes each block's shard as the block finishes (:func:`write_shard`), and
:func:`publish` turns a folder of block shards into the checkpoint. The index holds the sha256 of
``config.json``'s canonical JSON and of each shard's header. :mod:`rvqllm.validate` checks all of it
before a tensor is used. The first format, one ``model.safetensors`` holding every tensor and the
checksums, still loads.

A checkpoint is assembled in a temporary sibling folder, flushed and validated, then renamed into place,
so a crash or a full disk never leaves a folder that looks complete.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .arch import is_linear
from .config import RVQConfig
from .errors import RVQError
from .fsutil import fsync_path
from .nn import SHARED_KEY, QuantizedLinear, bind_shared, mark_quantized
from .size import model_specs
from .validate import (
    CONFIG_SUM_KEY,
    INDEX_NAME,
    QUANT_METHOD,
    SHARD_HEADERS_KEY,
    SHARD_RE,
    SPECS_KEY,
    TENSOR_SUMS_KEY,
    WEIGHTS_NAME,
    config_digest,
    format_version,
    read_checksummed,
    read_header_only,
    shard_specs,
    tensor_digest,
    write_safetensors,
)

__all__ = ["INDEX_NAME", "WEIGHTS_NAME", "block_tensors", "check_output_folder", "load", "publish",
           "quantization_config", "read_quantization_config", "read_shard", "rest_tensors", "save",
           "shard_name", "storage_dtype", "write_index", "write_shard"]

_QUANTIZED_BUFFERS = ("codes", "codebooks", "scales")  #: stored as they are (never cast)
_SHARD_FIX = "the shard is corrupt or tampered; re-create it"


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` dict describing ``model``'s quantized layers."""
    cfg = getattr(model, "rvq_config", None)
    layers = model_specs(model)
    return {
        "quant_method": QUANT_METHOD,
        "format_version": format_version(layers),
        "rvq_config": cfg.to_dict() if isinstance(cfg, RVQConfig) else {},
        "layers": layers,
    }


# ------------------------------------------------------------------------------------------ what a shard holds
def shard_name(i: int, n: int) -> str:
    """File name of shard ``i`` (0-based) of ``n``: ``model-<i+1>-of-<n>.safetensors``, five digits each.

    Block ``i`` is stored in shard ``i``; the last shard, ``n - 1``, holds everything outside the blocks."""
    if not 0 <= i < n <= 99_999:
        raise ValueError(f"shard {i} of {n}: need 0 <= i < n <= 99999")
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, ModuleList)`` of the decoder blocks, in any state of the run: float, quantized,
    or partly on the meta device. The list whose first block holds a linear or quantized layer and which
    holds the most parameter and buffer elements (what :func:`rvqllm.arch.find_blocks` picks on the float
    model; that one counts linear layers only, which a quantized block no longer has)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not any(is_linear(m) or isinstance(m, QuantizedLinear) for m in module[0].modules()):
            continue
        size = sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise RVQError(f"{type(model).__name__}: found no list of decoder blocks with linear or quantized layers")
    return best[1], best[2]


def _kept_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` without tied duplicates: of names sharing one tensor (lm_head <- embed_tokens)
    the first is kept (transformers re-ties the others on load). Meta tensors are never taken as tied."""
    seen: set[tuple] = set()
    out = {}
    for name, t in model.state_dict().items():
        if t.numel() and not t.is_meta:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key in seen:
                continue
            seen.add(key)
        out[name] = t
    return out


def _quantized_buffers(module: nn.Module, prefix: str) -> set[str]:
    """Names (``prefix`` + name under ``module``) of the codes/codebooks/scales of its quantized layers,
    and the shared codebook's (stored as they are, never cast)."""
    layers = [n for n, m in module.named_modules() if isinstance(m, QuantizedLinear)]
    return {f"{prefix}{name}" for name in _kept_as_stored(layers)}


def _kept_as_stored(layers) -> set[str]:
    """Names of the tensors of the quantized layers ``layers`` (names, or ``{name: spec}``) never cast on
    save or load (and the shared codebook's)."""
    return {f"{name}.{b}" for name in layers for b in _QUANTIZED_BUFFERS} | {SHARED_KEY}


def _stored(name: str, t: Tensor, dtype: torch.dtype | None, quantized: bool) -> Tensor:
    """``t`` as a shard stores it: contiguous, on the CPU, unquantized floats in ``dtype``."""
    if t.is_meta:
        raise RVQError(f"tensor {name} is not loaded (it is on the meta device): load its block before storing it")
    t = t.detach().cpu()
    if dtype is not None and not quantized and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def block_tensors(model: nn.Module, i: int, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The tensors block ``i``'s shard stores: every tensor of ``model``'s state named ``<blocks>.<i>.*``,
    by model-level name, as contiguous CPU tensors.

    Quantized layers' codes ``[out, in_groups, stages]``, codebooks ``[stages, 2**bits, vector_dim]`` and
    scales ``[out]`` are kept as they are; every other float tensor (norm weights ``[hidden]``, a
    quantized layer's bias ``[out]``...) is cast to ``dtype`` (``None``: kept). Only block ``i`` has to
    be loaded; the other blocks may be on the meta device. Raises :class:`RVQError` when the model has no
    decoder blocks or block ``i`` is on the meta device.
    """
    prefix, blocks = _blocks(model)
    if not 0 <= i < len(blocks):
        raise IndexError(f"block {i} of a model with {len(blocks)} blocks")
    under = f"{prefix}.{i}."
    quantized = _quantized_buffers(blocks[i], under)
    return {name: _stored(name, t, dtype, name in quantized)
            for name, t in _kept_state(model).items() if name.startswith(under)}


def rest_tensors(model: nn.Module, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The tensors the last shard stores: everything outside the decoder blocks (embeddings ``[vocab,
    hidden]``, final norm ``[hidden]``, lm_head ``[vocab, hidden]`` unless tied), or every tensor of a model
    without a list of decoder blocks; cast like :func:`block_tensors`."""
    try:
        under = f"{_blocks(model)[0]}."
    except RVQError:
        under = None
    quantized = _quantized_buffers(model, "")
    return {name: _stored(name, t, dtype, name in quantized)
            for name, t in _kept_state(model).items() if under is None or not name.startswith(under)}


# ------------------------------------------------------------------------------------------ shard files
def _write_shard(path: Path, tensors: dict[str, Tensor], specs: dict[str, dict]) -> None:
    """:func:`write_shard`, raising ``OSError`` as it comes."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt",
                TENSOR_SUMS_KEY: json.dumps({k: tensor_digest(v) for k, v in sorted(tensors.items())}, sort_keys=True),
                SPECS_KEY: json.dumps(specs, sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_safetensors(tmp, tensors, metadata)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    fsync_path(path.parent)


def write_shard(path: str | Path, tensors: dict[str, Tensor], specs: dict[str, dict]) -> None:
    """Write one shard atomically (temporary file, fsync, rename): a reader sees the old file or the new one.

    ``tensors``: by model-level name (e.g. from :func:`block_tensors`); ``specs``: ``{layer name:
    QuantizedLinear.spec()}`` of the quantized layers among them. The metadata gets every tensor's sha256
    and the specs; the bytes depend only on the content. Raises :class:`RVQError` when the file cannot be
    written (disk full, permissions).
    """
    path = Path(path)
    try:
        _write_shard(path, tensors, specs)
    except OSError as err:
        raise RVQError(f"could not write {path}: {_reason(err)}") from err


def read_shard(path: str | Path) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Read a shard written by :func:`write_shard`, checking its header and every tensor's checksum.

    Returns ``(CPU tensors by name, {layer name: spec})``; each listed layer's codes, codebooks and scales
    are present. Raises :class:`RVQError` (one line, naming the file) on anything else.
    """
    path = Path(path)
    tensors, metadata = read_checksummed(path)
    specs = shard_specs(path, metadata)
    for name, spec in specs.items():
        for b in _QUANTIZED_BUFFERS:
            if b == "codebooks" and spec.get("shared_codebooks"):
                continue
            if f"{name}.{b}" not in tensors:
                raise RVQError(f"{path} lacks tensor '{name}.{b}' of quantized layer {name!r} (listed in its "
                               f"{SPECS_KEY}): {_SHARD_FIX}")
    return tensors, specs


def _find_shards(folder: Path) -> tuple[int | None, dict[int, Path]]:
    """``(n, {k: path})`` of the ``model-<k>-of-<n>.safetensors`` files in ``folder`` (1-based ``k``);
    ``(None, {})`` when there are none. Files of two different ``n`` are refused."""
    found: dict[int, dict[int, Path]] = {}
    for p in folder.iterdir():
        m = SHARD_RE.fullmatch(p.name)
        if m is not None and p.is_file():
            found.setdefault(int(m[2]), {})[int(m[1])] = p
    if len(found) > 1:
        counts = " and ".join(str(n) for n in sorted(found))
        raise RVQError(f"{folder} holds shards of different layouts (of {counts} shards): delete the stale ones "
                       "or start the run over")
    return next(iter(found.items()), (None, {}))


def write_index(folder: str | Path, config: dict) -> Path:
    """Write ``model.safetensors.index.json`` for the shards in ``folder`` (all ``n`` of them must be there),
    reading only their headers. ``config`` is ``config.json`` as it will be read back (its checksum goes
    into the index). Returns the index's path."""
    folder = Path(folder)
    n, found = _find_shards(folder)
    if n is None or sorted(found) != list(range(1, n + 1)):
        missing = next(k for k in range(1, (n or 1) + 1) if k not in found)
        raise RVQError(f"{folder} lacks shard {shard_name(missing - 1, n or 1)}: write every shard before the index")
    weight_map: dict[str, str] = {}
    headers: dict[str, str] = {}
    total = 0
    for k in range(1, n + 1):
        entries, _, header_sum = read_header_only(found[k])
        headers[found[k].name] = header_sum
        for name, e in entries.items():
            if name in weight_map:
                raise RVQError(f"tensor {name!r} is in both {weight_map[name]} and {found[k].name} in {folder}: "
                               "a block's shard and the rest must not overlap; re-create the shards")
            weight_map[name] = found[k].name
            total += e.end - e.begin
    index = {"metadata": {"total_size": total, CONFIG_SUM_KEY: config_digest(config),
                          SHARD_HEADERS_KEY: headers,
                          "format_version": str(config.get("quantization_config", {}).get("format_version")),
                          "quant_method": QUANT_METHOD},
             "weight_map": dict(sorted(weight_map.items()))}
    path = folder / INDEX_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    fsync_path(tmp)
    os.replace(tmp, path)
    return path


def storage_dtype(model: nn.Module) -> torch.dtype | None:
    """The 16-bit dtype the model came in, to store unquantized tensors in: ``model.rvq_source_dtype``
    (set by :func:`rvqllm.models.load_model`) or else its config's ``dtype``; ``None`` (keep them as
    they are) when neither names a 16-bit float."""
    name = getattr(model, "rvq_source_dtype", None) or getattr(model.config, "dtype", None)
    name = str(name).removeprefix("torch.") if name is not None else None
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name)


def _fsync_tree(folder: Path) -> None:
    """Flush every file in ``folder`` and the folder itself to disk (a power cut after the rename then
    finds the complete new checkpoint, not empty files)."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_path(folder)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``). ``False`` where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # filesystem without RENAME_EXCHANGE: caller falls back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporary folders that earlier, killed saves to ``out`` left behind (their process is gone)."""
    for p in out.parent.glob(_tmp_prefix(out) + "*"):
        pid = p.name[len(_tmp_prefix(out)):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass  # alive (or not ours to probe): leave it


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an output path that exists unless ``overwrite``; never overwrite what is not a checkpoint.

    ``--overwrite`` replaces an existing rvqllm checkpoint folder (or an empty folder); anything else
    (a file, a model folder, a home directory) is refused, so a typo cannot delete a user's data.
    """
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise RVQError(f"output folder {out} exists: choose another folder or pass --overwrite")
    if out.is_symlink() or not out.is_dir():
        raise RVQError(f"output path {out} exists and is not a folder: remove it yourself or choose another folder")
    if any(out.iterdir()):
        try:
            config = json.loads((out / "config.json").read_text())
            ok = isinstance(config, dict) and isinstance(config.get("quantization_config"), dict) and \
                config["quantization_config"].get("quant_method") == QUANT_METHOD
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise RVQError(f"refusing to overwrite {out}: it is not an rvqllm checkpoint folder; "
                           "remove it yourself or choose another folder")


# ------------------------------------------------------------------------------------------ publishing
def _reason(err: OSError) -> str:
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        reason += " (the disk is full: free space or choose another folder)"
    return reason


def _config_text(model_config: dict, qcfg: dict, dtype: torch.dtype | None) -> str:
    """``config.json``'s text: the model's config plus ``quantization_config`` (and ``dtype``, the storage dtype)."""
    config = dict(model_config)
    config["quantization_config"] = qcfg
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


#: errors of os.link that mean "this filesystem cannot hard-link here" (then the shard is moved)
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _place(src: Path, dst: Path) -> bool:
    """Put shard ``src`` at ``dst`` without copying its data where possible: a hard link (``src`` stays
    where it is), else a rename (returns ``True``: ``src`` moved), else (another filesystem) a copy."""
    try:
        os.link(src, dst)
        return False
    except OSError as err:
        if err.errno not in _NO_LINK:
            raise
    try:
        os.replace(src, dst)
        return True
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
    shutil.copyfile(src, dst)
    return False


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` is swapped out atomically where
    the filesystem can (``tmp`` then holds the old folder), else moved aside and removed."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_apart(shards_dir: Path, out: Path) -> None:
    s, o = shards_dir.resolve(), out.resolve()
    if s == o or o in s.parents or s in o.parents:
        raise RVQError(f"the shard folder {shards_dir} and the output folder {out} overlap: "
                       "write the shards to a folder beside the output, not in it")


def publish(shards_dir: str | Path, out: str | Path, *, model_config: dict | None = None, qcfg: dict | None = None,
            rest: dict[str, Tensor] | None = None, dtype: torch.dtype | None = None, generation_config=None,
            tokenizer=None, overwrite: bool = False, model: nn.Module | None = None) -> Path:
    """Turn a folder of block shards into the checkpoint folder ``out``, atomically. Returns ``out``.

    Args:
        shards_dir: holds the ``N - 1`` block shards ``model-<k>-of-<N>.safetensors`` (:func:`write_shard`,
            maybe by an earlier process); anything else in it (a run's ``run.json``, activation folders)
            is left alone and does not go into ``out``. No block shards at all means ``N = 1``.
        out: the checkpoint folder; an existing one is replaced only with ``overwrite`` and only if it is
            an rvqllm checkpoint or empty (:func:`check_output_folder`).
        model_config: the model's transformers config as a dict (``model.config.to_dict()``).
        qcfg: the ``quantization_config`` (:func:`quantization_config`): every quantized layer's spec.
        rest: the tensors outside the blocks (:func:`rest_tensors`), written as the last shard; unquantized
            floats among them are cast to ``dtype``.
        dtype: the storage dtype of unquantized tensors, recorded as ``config.json``'s ``dtype``.
        generation_config, tokenizer: saved beside (``save_pretrained``) when given.
        model: the quantized model, instead of the four above: ``model_config``, ``qcfg`` (layers from
            ``model.rvq_layers``, which the pipeline keeps, else from its quantized modules), ``rest``
            (:func:`rest_tensors`: the rest must be loaded; the blocks may be on the meta device),
            ``dtype`` (:func:`storage_dtype`) and ``generation_config`` default to the model's.

    The folder is assembled in a temporary sibling of ``out``: the block shards hard-linked into it (moved
    where the filesystem cannot link; never copied, except across filesystems), the last shard, the
    index (built from the shard headers), ``config.json`` and the rest written, everything flushed and
    validated exactly as :func:`load` validates, and only then renamed into place. On any failure nothing
    appears at ``out`` (an existing checkpoint there is unchanged) and the block shards are in
    ``shards_dir`` as before, so the run can be resumed. After success ``shards_dir`` is no longer needed
    (its shards may still be there, as links to the checkpoint's files): delete it.
    """
    from .validate import validate_checkpoint

    shards_dir, out = Path(shards_dir), Path(out)
    check_output_folder(out, overwrite)
    if model is not None:
        dtype = dtype or storage_dtype(model)
        if qcfg is None:
            qcfg = quantization_config(model)
            qcfg["layers"] = {k: dict(v) for k, v in (getattr(model, "rvq_layers", None) or qcfg["layers"]).items()}
        model_config = model.config.to_dict() if model_config is None else model_config
        rest = rest_tensors(model, dtype) if rest is None else rest
        generation_config = generation_config or getattr(model, "generation_config", None)
    if model_config is None or qcfg is None or rest is None:
        raise TypeError("publish needs model= or all of model_config=, qcfg= and rest=")
    if not isinstance(qcfg.get("layers"), dict) or not qcfg["layers"]:
        raise RVQError("the quantization config lists no quantized layers: there is nothing to publish")
    if not shards_dir.is_dir():
        raise RVQError(f"the shard folder {shards_dir} does not exist: run the quantization first")
    _check_apart(shards_dir, out)
    n, found = _find_shards(shards_dir)
    n = n or 1
    missing = [k for k in range(1, n) if k not in found]
    if missing:
        raise RVQError(f"{shards_dir} lacks {shard_name(missing[0] - 1, n)} (block {missing[0] - 1}): "
                       "finish (or resume) the run that writes the block shards first")
    config_text = _config_text(model_config, qcfg, dtype)
    tmp = None
    moved: list[tuple[Path, Path]] = []
    done = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out)}{os.getpid()}-", dir=out.parent))
        tmp.chmod(0o755)
        for k in range(1, n):
            if _place(found[k], tmp / found[k].name):
                moved.append((found[k], tmp / found[k].name))
        quantized = _kept_as_stored(qcfg["layers"])
        if any(s.get("shared_codebooks") for s in qcfg["layers"].values()) and SHARED_KEY not in rest:
            raise RVQError(f"the quantization config lists layers with a shared codebook but {SHARED_KEY} is not "
                           "among the tensors to save: attach it to the model (rvqllm.nn.attach_shared)")
        last = {name: _stored(name, t, dtype, name in quantized) for name, t in rest.items()}
        _write_shard(tmp / shard_name(n - 1, n), last,
                     {name: s for name, s in qcfg["layers"].items() if f"{name}.codes" in last})
        del last
        write_index(tmp, json.loads(config_text))  # the config exactly as load() will read it back
        (tmp / "config.json").write_text(config_text)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        validate_checkpoint(tmp)  # never publish a checkpoint that would not load
        _swap_into_place(tmp, out)
        done = True
        fsync_path(out.parent)
    except OSError as err:
        state = "the existing checkpoint is unchanged" if out.exists() else "nothing was written"
        raise RVQError(f"could not save the checkpoint to {out}: {_reason(err)}; {state}") from err
    finally:
        kept = done or _move_back(moved)
        if tmp is not None and kept:
            shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the old checkpoint
    return out


def _move_back(moved: list[tuple[Path, Path]]) -> bool:
    """Return moved shards to where they were; ``False`` if one could not be (then keep the temporary folder)."""
    ok = True
    for src, dst in moved:
        try:
            os.replace(dst, src)
        except OSError:
            ok = False
    return ok


def save(model: nn.Module, out_dir: str | Path, tokenizer=None, *, overwrite: bool = False,
         dtype: torch.dtype | None = None) -> Path:
    """Save a quantized model (and its tokenizer) to ``out_dir`` atomically. Returns the folder.

    Unquantized tensors are stored in ``dtype`` (default: the 16-bit dtype the model's config names, so
    a model loaded from fp16 and computed in fp32 is stored in fp16 again, losslessly; else as they are).

    Each block's shard is written into a temporary sibling folder, then :func:`publish` assembles,
    flushes and validates the checkpoint exactly as :func:`load` validates it, and only then renames it
    into place (an existing checkpoint is swapped out atomically). A crash or a full disk at any moment
    leaves either the old folder or the complete new one; a failed write raises :class:`RVQError` and
    removes the temporary folders. A model without a list of decoder blocks is stored as one shard.
    """
    out = Path(out_dir)
    dtype = dtype or storage_dtype(model)
    check_output_folder(out, overwrite)
    qcfg = quantization_config(model)
    if not qcfg["layers"]:
        raise RVQError("the model has no quantized layers to save: run rvqllm.quantize first")
    try:
        prefix, blocks = _blocks(model)
        n_blocks = len(blocks)
    except RVQError:  # no list of decoder blocks: one shard of everything
        prefix, n_blocks = "", 0
    shards = None
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(out)
            shards = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out)}{os.getpid()}-", dir=out.parent))
            for i in range(n_blocks):
                under = f"{prefix}.{i}."
                _write_shard(shards / shard_name(i, n_blocks + 1), block_tensors(model, i, dtype),
                             {name: s for name, s in qcfg["layers"].items() if name.startswith(under)})
        except OSError as err:
            state = "the existing checkpoint is unchanged" if out.exists() else "nothing was written"
            raise RVQError(f"could not save the checkpoint to {out}: {_reason(err)}; {state}") from err
        return publish(shards, out, model_config=model.config.to_dict(), qcfg=qcfg, rest=rest_tensors(model, dtype),
                       dtype=dtype, generation_config=getattr(model, "generation_config", None),
                       tokenizer=tokenizer, overwrite=overwrite)
    finally:
        if shards is not None:
            shutil.rmtree(shards, ignore_errors=True)


def read_quantization_config(folder: str | Path) -> dict:
    """The ``quantization_config`` of a checkpoint folder, checked for method, format version and layer specs
    (the tensors are checked by :func:`load` / :func:`rvqllm.validate.validate_checkpoint`)."""
    from .validate import check_quantization_config, read_config

    return check_quantization_config(read_config(folder), folder)


def load(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Load an rvqllm checkpoint as a ready ``transformers`` model, after validating all of it
    (:func:`rvqllm.validate.validate_checkpoint`: checksums, shapes, dtypes, code ranges, finite values).

    Unquantized parameters (embeddings, norms, lm_head) are cast to ``dtype``; quantized layers keep
    their stored codes, fp16 codebooks and fp16 scales and decode on the fly. Nothing in the folder is
    executed: safetensors only, no pickle, no remote code.
    """
    from transformers import GenerationConfig

    from .validate import validate_checkpoint

    folder = Path(folder)
    checked = validate_checkpoint(folder, dtype)
    model, qcfg, tensors = checked.skeleton, checked.quantization_config, checked.tensors
    quantized_buffers = _kept_as_stored(qcfg["layers"])
    for k, t in tensors.items():
        if k not in quantized_buffers and t.is_floating_point():
            tensors[k] = t.to(dtype)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:  # validate_checkpoint already refused these; kept as a guard
        raise RVQError(f"{folder} holds tensor {result.unexpected_keys[0]!r} that the model has no place for")
    model.tie_weights()
    bind_shared(model)  # the skeleton's layers already point at model.rvq_shared; kept as a guard
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise RVQError(f"{folder} lacks tensor {missing[0]!r}: the checkpoint is incomplete; "
                       "re-create or re-download it")
    mark_quantized(model)
    model.rvq_layers = qcfg["layers"]
    model.rvq_config = RVQConfig.from_dict(qcfg["rvq_config"], strict=False) if qcfg.get("rvq_config") else None
    if (folder / "generation_config.json").exists():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise RVQError(f"{folder}/generation_config.json is invalid ({err.__class__.__name__}): "
                           "fix or delete that file") from None
    return model.to(device).eval()
