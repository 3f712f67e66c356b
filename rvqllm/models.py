"""Loading the model to quantize (or the baseline): the built-in reference, a local folder, a GGUF file,
or a Hugging Face hub id."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import RVQError
from .reference import reference_model_dir

REFERENCE_NAMES = ("reference", "smollm2-135m", "SmolLM2-135M-Instruct")


def resolve(spec: str, cache_dir: Path | None = None) -> tuple[str, str | None]:
    """``(folder or hub id, gguf file name or None)`` for a model spec."""
    if spec in REFERENCE_NAMES:
        return str(reference_model_dir(cache_dir)), None
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RVQError(f"GGUF file {spec} not found: check the path")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise RVQError(f"{spec} is not a model folder (no config.json): give a Hugging Face model folder, a .gguf file or a hub id")
        return str(path), None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise RVQError(f"model path {spec} not found: check the path")
    return spec, None


def load_model(spec: str, dtype: torch.dtype = torch.float32, cache_dir: Path | None = None):
    """``(model, tokenizer)`` for a model spec, on CPU in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve(spec, cache_dir)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        source_dtype = getattr(AutoConfig.from_pretrained(where, **kwargs), "dtype", None)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else err.__class__.__name__
        raise RVQError(f"could not load model {spec!r}: {first}") from None
    # transformers rewrites config.dtype to the dtype we compute in; remember what the weights came in,
    # so a checkpoint stores its unquantized tensors (embeddings, norms) at that precision again.
    model.rvq_source_dtype = source_dtype
    return model.eval(), tokenizer
