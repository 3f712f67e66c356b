"""The on-disk format: one safetensors file + ``config.json`` with a ``quantization_config``.

Folder layout::

    model.safetensors       every tensor of the model; for each quantized layer NAME:
                            NAME.codes [out, in_groups, stages] uint8|int16,
                            NAME.codebooks [stages, 2**bits, vector_dim] fp16,
                            NAME.scales [out] fp16, NAME.bias [out] (if any)
    config.json             the model's transformers config plus
                            quantization_config = {quant_method: "rvq", format_version, rvq_config, layers}
                            where layers maps NAME -> {in_features, out_features, vector_dim, stages, bits, bias}
    generation_config.json, tokenizer files

A save writes into a temporary sibling folder and renames it into place, so a crash never leaves a
folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .arch import prepare_for_layers, set_module
from .config import RVQConfig
from .errors import RVQError
from .nn import QuantizedLinear
from .size import model_specs

FORMAT_VERSION = 1
QUANT_METHOD = "rvq"
WEIGHTS_NAME = "model.safetensors"


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


def save(model: nn.Module, out_dir: str | Path, tokenizer=None, *, overwrite: bool = False,
         dtype: torch.dtype | None = None) -> Path:
    """Save a quantized model (and its tokenizer) to ``out_dir`` atomically. Returns the folder.

    Unquantized tensors are stored in ``dtype`` (default: the 16-bit dtype the model's config names, so
    a model loaded from fp16 and computed in fp32 is stored in fp16 again, losslessly; else as they are).
    """
    out = Path(out_dir)
    dtype = dtype or storage_dtype(model)
    if out.exists() and not overwrite:
        raise RVQError(f"output folder {out} exists: choose another folder or pass --overwrite")
    qcfg = quantization_config(model)
    if not qcfg["layers"]:
        raise RVQError("the model has no quantized layers to save: run rvqllm.quantize first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        tensors = _state_dict_for_save(model, dtype)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "quant_method": QUANT_METHOD,
                                                            "format_version": str(FORMAT_VERSION)})
        config = model.config.to_dict()
        config["quantization_config"] = qcfg
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_quantization_config(folder: str | Path) -> dict:
    """The ``quantization_config`` of a checkpoint folder, checked for method and format version."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise RVQError(f"{folder} is not an rvqllm checkpoint (no config.json): give a folder written by `rvqllm quantize`")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RVQError(f"{path} is not valid JSON: the checkpoint is corrupt; re-create or re-download it") from None
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise RVQError(f"{folder} is not an rvqllm checkpoint (no quantization_config with quant_method 'rvq')")
    version = q.get("format_version")
    if version != FORMAT_VERSION:
        raise RVQError(
            f"{folder} has checkpoint format version {version!r}; this rvqllm reads version {FORMAT_VERSION}: "
            "upgrade rvqllm or re-quantize the model"
        )
    return q


def load(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Load an rvqllm checkpoint as a ready ``transformers`` model.

    Unquantized parameters (embeddings, norms, lm_head) are cast to ``dtype``; quantized layers keep
    their stored codes, fp16 codebooks and fp16 scales and decode on the fly.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    qcfg = read_quantization_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise RVQError(f"{weights} is missing: the checkpoint is incomplete; re-create or re-download it")
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prepare_for_layers(model, list(qcfg["layers"]))  # e.g. split fused MoE experts (rvqllm.arch)
    for name, spec in qcfg["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise RVQError(f"checkpoint lists quantized layer {name!r}, which this model has not: the config is corrupt") from None
        args = {k: spec[k] for k in ("vector_dim", "stages", "bits", "bias")}
        set_module(model, name, QuantizedLinear(spec["in_features"], spec["out_features"], bias_dtype=dtype, **args))
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for damaged files
        raise RVQError(f"{weights} cannot be read ({err.__class__.__name__}): the file is corrupt; re-create or re-download it") from None
    quantized_buffers = {f"{n}.{b}" for n in qcfg["layers"] for b in ("codes", "codebooks", "scales")}
    for k, t in tensors.items():
        if k not in quantized_buffers and t.is_floating_point():
            tensors[k] = t.to(dtype)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise RVQError(f"{weights} holds tensor {result.unexpected_keys[0]!r} that the model has no place for: the checkpoint does not match its config")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RVQError(f"{weights} lacks tensor {missing[0]!r}: the checkpoint is incomplete; re-create or re-download it")
    model.rvq_layers = qcfg["layers"]
    model.rvq_config = RVQConfig.from_dict(qcfg["rvq_config"]) if qcfg.get("rvq_config") else None
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.to(device).eval()
