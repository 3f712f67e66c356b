"""The on-disk format: one safetensors file + ``config.json`` with a ``quantization_config``.

Folder layout::

    model.safetensors       every tensor of the model; for each quantized layer NAME:
                            NAME.codes [out, in_groups, stages] uint8|int16,
                            NAME.codebooks [stages, 2**bits, vector_dim] fp16,
                            NAME.scales [out] fp16, NAME.bias [out] (if any),
                            NAME.signs [in_groups * vector_dim] int8 ±1 (rotated layers only)
    config.json             the model's transformers config plus
                            quantization_config = {quant_method: "rvq", format_version, rvq_config, layers}
                            where layers maps NAME -> {in_features, out_features, vector_dim, stages, bits, bias}
                            plus hadamard_block (power of two) for a rotated layer (docs/ROTATION.md)
    generation_config.json, tokenizer files

model.safetensors' metadata also holds checksums (sha256 of config.json's canonical JSON and of every
tensor's bytes); :mod:`rvqllm.validate` checks them and everything else before a tensor is used.

A save writes into a temporary sibling folder, flushes and validates it, then renames it into place,
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
from torch import nn

from .config import RVQConfig
from .errors import RVQError
from .fsutil import fsync_path
from .nn import QuantizedLinear
from .size import model_specs
from .validate import FORMAT_VERSION, QUANT_METHOD, WEIGHTS_NAME, write_safetensors


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` dict describing ``model``'s quantized layers."""
    cfg = getattr(model, "rvq_config", None)
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "rvq_config": cfg.to_dict() if isinstance(cfg, RVQConfig) else {},
        "layers": model_specs(model),
    }


def _state_dict_for_save(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tied duplicates dropped; unquantized floats cast to ``dtype``."""
    quantized = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QuantizedLinear) for b in ("codes", "codebooks", "scales")}
    seen: dict[tuple, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue  # tied to an earlier tensor (e.g. lm_head <- embed_tokens); transformers re-ties it
        if key is not None:
            seen[key] = name
        t = t.detach().cpu()
        if dtype is not None and name not in quantized and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


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


def save(model: nn.Module, out_dir: str | Path, tokenizer=None, *, overwrite: bool = False,
         dtype: torch.dtype | None = None) -> Path:
    """Save a quantized model (and its tokenizer) to ``out_dir`` atomically. Returns the folder.

    Unquantized tensors are stored in ``dtype`` (default: the 16-bit dtype the model's config names, so
    a model loaded from fp16 and computed in fp32 is stored in fp16 again, losslessly; else as they are).

    Everything is written to a temporary sibling folder, flushed to disk, validated exactly as
    :func:`load` validates it, and only then renamed into place (an existing checkpoint is swapped out
    atomically). A crash or a full disk at any moment leaves either the old folder or the complete new
    one; a failed write raises :class:`RVQError` and removes the temporary folder.
    """
    from .validate import checksum_metadata, validate_checkpoint

    out = Path(out_dir)
    dtype = dtype or storage_dtype(model)
    check_output_folder(out, overwrite)
    qcfg = quantization_config(model)
    if not qcfg["layers"]:
        raise RVQError("the model has no quantized layers to save: run rvqllm.quantize first")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out)}{os.getpid()}-", dir=out.parent))
        tmp.chmod(0o755)
        tensors = _state_dict_for_save(model, dtype)
        config = model.config.to_dict()
        config["quantization_config"] = qcfg
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        config = json.loads(config_text)  # exactly what load() will read back
        metadata = {"format": "pt", "quant_method": QUANT_METHOD, "format_version": str(FORMAT_VERSION),
                    **checksum_metadata(tensors, config)}
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata)
        del tensors
        (tmp / "config.json").write_text(config_text)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        validate_checkpoint(tmp)  # never publish a checkpoint that would not load
        if out.exists():
            if _exchange(tmp, out):
                pass  # tmp now holds the old checkpoint; removed below
            else:
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_path(out.parent)
    except OSError as err:
        reason = err.strerror or str(err)
        if err.errno == errno.ENOSPC:
            reason += " (the disk is full: free space or choose another folder)"
        state = "the existing checkpoint is unchanged" if out.exists() else "nothing was written"
        raise RVQError(f"could not save the checkpoint to {out}: {reason}; {state}") from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    quantized_buffers = {f"{n}.{b}" for n in qcfg["layers"] for b in ("codes", "codebooks", "scales")}
    for k, t in tensors.items():
        if k not in quantized_buffers and t.is_floating_point():
            tensors[k] = t.to(dtype)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:  # validate_checkpoint already refused these; kept as a guard
        raise RVQError(f"{folder} holds tensor {result.unexpected_keys[0]!r} that the model has no place for")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise RVQError(f"{folder}/{WEIGHTS_NAME} lacks tensor {missing[0]!r}: the checkpoint is incomplete; "
                       "re-create or re-download it")
    model.rvq_layers = qcfg["layers"]
    model.rvq_config = RVQConfig.from_dict(qcfg["rvq_config"], strict=False) if qcfg.get("rvq_config") else None
    if (folder / "generation_config.json").exists():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise RVQError(f"{folder}/generation_config.json is invalid ({err.__class__.__name__}): "
                           "fix or delete that file") from None
    return model.to(device).eval()
