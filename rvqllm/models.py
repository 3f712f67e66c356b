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


def load_model(spec: str, dtype: torch.dtype = torch.float32, cache_dir: Path | None = None,
               tokenizer: str | None = None):
    """``(model, tokenizer)`` for a model spec, on CPU in ``dtype``; ``tokenizer`` names another one's
    source (a folder, a .gguf or a hub id) for a model folder that has none."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where, gguf = resolve(spec, cache_dir)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = load_tokenizer(*resolve(tokenizer, cache_dir)) if tokenizer else load_tokenizer(where, gguf)
    try:
        source_dtype = getattr(AutoConfig.from_pretrained(where, **kwargs), "dtype", None)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else err.__class__.__name__
        raise RVQError(f"could not load model {spec!r}: {first}") from None
    # transformers rewrites config.dtype to the dtype we compute in; remember what the weights came in,
    # so a checkpoint stores its unquantized tensors (embeddings, norms) at that precision again.
    model.rvq_source_dtype = source_dtype
    return model.eval(), tokenizer


def load_tokenizer(where: str, gguf: str | None = None):
    """The tokenizer in folder (or hub id) ``where``, or in GGUF file ``gguf`` inside it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:120]
        raise RVQError(f"could not load a tokenizer from {where!r} ({first}): give one with --tokenizer PATH_OR_ID "
                       "(a folder with tokenizer.json / tokenizer_config.json, or a hub id)") from None


def open_source(spec: str, *, tokenizer: str | None = None, in_memory: bool = False,
                say=lambda *_: None, cache_dir: Path | None = None):
    """``(source, tokenizer)`` for quantizing model ``spec`` (:mod:`rvqllm.source`).

    A folder (or hub snapshot) of safetensors weights is streamed block by block (:class:`ShardSource`);
    a GGUF file, a folder without safetensors, or ``in_memory`` loads the whole model in float32
    (:class:`MemorySource`), and ``say`` is told so with the memory that takes.
    """
    from .source import INDEX_NAME, SINGLE_NAME, MemorySource, ShardSource

    where, gguf = resolve(spec, cache_dir)
    if not gguf and not Path(where).exists():  # a hub id: fetch the files streaming reads (safetensors only)
        where = _snapshot(spec)
    folder = Path(where)
    streamable = not gguf and ((folder / INDEX_NAME).is_file() or (folder / SINGLE_NAME).is_file())
    if streamable and not in_memory:
        tok = load_tokenizer(*resolve(tokenizer, cache_dir)) if tokenizer else load_tokenizer(str(folder))
        return ShardSource(folder, spec), tok
    why = "it is a GGUF file" if gguf else "it was asked for" if in_memory else "it has no safetensors weights"
    model, model_tok = load_model(spec, cache_dir=cache_dir, tokenizer=tokenizer)
    gib = sum(p.numel() for p in model.parameters()) * 4 / 2**30
    say(f"note: {spec} is loaded whole in memory in float32 ({gib:.1f} GiB) because {why}; "
        "a folder of safetensors shards is streamed one block at a time instead")
    return MemorySource(model), model_tok


def _snapshot(repo_id: str) -> str:
    """Download a hub model's config, safetensors and tokenizer files (cached by huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                           "*.tiktoken"])
    except Exception as err:  # network, auth, missing repo: all one line for the user
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:160]
        raise RVQError(f"could not fetch model {repo_id!r} from the hub ({first}): check the id, your network "
                       "and `hf auth login` for gated models, or give a local folder") from None
