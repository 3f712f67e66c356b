"""Loading the model to quantize (or the baseline): the built-in reference, a local folder, a GGUF file,
or a Hugging Face hub id."""

from __future__ import annotations

import json
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


def one_line(err: BaseException, limit: int = 300) -> str:
    """``err``'s message as one line (whitespace collapsed): whole when short, else its first sentences up to
    ``limit`` characters, so that a library's multi-line message is never shown cut at a line break."""
    text = " ".join(str(err).split()) or err.__class__.__name__
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > 0 else text[:limit].rsplit(" ", 1)[0] + " ..."


def check_not_checkpoint(spec: str, where: str) -> None:
    """Refuse an rvqllm checkpoint where an unquantized model is expected (to quantize, or as a baseline)."""
    config = Path(where) / "config.json"
    try:
        q = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return  # not readable as a checkpoint's config: loading it says what is wrong
    if isinstance(q, dict) and q.get("quant_method") == "rvq":
        raise RVQError(f"{spec} is an rvqllm checkpoint (already quantized), not an unquantized model: give the "
                       "original model it was made from (`rvqllm eval` and `rvqllm report` take checkpoints as "
                       "their positional arguments)")


#: the files a tokenizer folder holds at least one of (named in the error when none is there)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json + merges.txt")
_TOKENIZER_FIX = ("give one with --tokenizer PATH_OR_ID (a folder holding those files, e.g. the original model's, "
                  "a .gguf file or a hub id)")
#: files from which transformers can build a tokenizer's vocabulary (tokenizer_config.json alone cannot)
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.txt")


def tokenizer_files(folder: str | Path) -> list[str]:
    """The tokenizer files present in ``folder`` (empty when it has none, or is not a folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = [n for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.txt",
                         "vocab.json", "merges.txt") if (folder / n).is_file()]
    return names + sorted(p.name for p in folder.glob("*.tiktoken") if p.is_file())


def _no_tokenizer(where: str) -> RVQError:
    return RVQError(f"no tokenizer in {where}: none of {', '.join(TOKENIZER_FILES)} found there; {_TOKENIZER_FIX}")


def resolve_tokenizer(spec: str, cache_dir: Path | None = None) -> tuple[str, str | None]:
    """``(folder or hub id, gguf file name or None)`` for a ``--tokenizer`` value."""
    if spec in REFERENCE_NAMES:
        return str(reference_model_dir(cache_dir)), None
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RVQError(f"--tokenizer {spec}: GGUF file not found: check the path")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise RVQError(f"--tokenizer {spec} is a file: give the folder holding the tokenizer files "
                       f"({', '.join(TOKENIZER_FILES)}), a .gguf file or a hub id")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise RVQError(f"--tokenizer {spec}: no such folder: check the path")
    return spec, None


def load_tokenizer(where: str | Path, gguf: str | None = None):
    """The tokenizer in folder (or hub id) ``where``, or in GGUF file ``gguf`` inside it.

    A local folder without tokenizer files is refused before transformers is asked (its message would
    not say which files are missing)."""
    from transformers import AutoTokenizer

    where = str(where)
    local = Path(where).is_dir()
    present = tokenizer_files(where) if local and not gguf else []
    if local and not gguf and not present:
        raise _no_tokenizer(where)
    try:
        return AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as err:
        why = one_line(err)
        if why.startswith("Couldn't instantiate the backend tokenizer"):  # five lines listing what it tried
            vocab = set(present) & {*_VOCAB_FILES, "vocab.json"}
            why = (f"transformers cannot build a tokenizer from {', '.join(present)} alone: none of "
                   f"{', '.join(_VOCAB_FILES[:3])}, vocab.json + merges.txt is there" if present and not vocab
                   else "transformers cannot build a tokenizer from its files")
        elif not local and not gguf:
            why = f"there is no local folder of that name, and the hub says: {why}"
        raise RVQError(f"could not load the tokenizer {where!r} ({why}); {_TOKENIZER_FIX}") from None


def tokenizer_for(spec: str | Path, tokenizer=None, cache_dir: Path | None = None):
    """The tokenizer to use with model or checkpoint ``spec``: ``tokenizer`` when given (a tokenizer object,
    or a folder, .gguf file or hub id to load one from), else the one in ``spec``'s folder (or hub repo).

    Raises :class:`RVQError` naming the missing files and ``--tokenizer`` when there is none."""
    if tokenizer is not None and not isinstance(tokenizer, str | Path):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(*resolve_tokenizer(str(tokenizer), cache_dir))
    path = Path(spec)
    if path.suffix != ".gguf" and path.is_dir() and (path / "config.json").is_file():
        return load_tokenizer(path)  # a checkpoint folder too (resolve() would take it as a model)
    return load_tokenizer(*resolve(str(spec), cache_dir))


def load_model(spec: str, dtype: torch.dtype = torch.float32, cache_dir: Path | None = None,
               tokenizer=None):
    """``(model, tokenizer)`` for a model spec, on CPU in ``dtype``. ``tokenizer``: a tokenizer object, or
    where to load one from (a folder, a .gguf or a hub id) instead of the model's own (needed for a model
    folder that has none). An rvqllm checkpoint is refused: load it with :func:`rvqllm.load`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where, gguf = resolve(spec, cache_dir)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if not gguf:
        check_not_checkpoint(spec, where)
    tokenizer = tokenizer_for(spec, tokenizer, cache_dir) if tokenizer is not None else load_tokenizer(where, gguf)
    try:
        source_dtype = getattr(AutoConfig.from_pretrained(where, **kwargs), "dtype", None)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise RVQError(f"could not load model {spec!r}: {one_line(err)}") from None
    # transformers rewrites config.dtype to the dtype we compute in; remember what the weights came in,
    # so a checkpoint stores its unquantized tensors (embeddings, norms) at that precision again.
    model.rvq_source_dtype = source_dtype
    return model.eval(), tokenizer


def open_source(spec: str, *, tokenizer=None, say=lambda *_: None, cache_dir: Path | None = None):
    """``(source, tokenizer)`` for quantizing model ``spec`` (:mod:`rvqllm.source`).

    A folder (or hub snapshot) of safetensors weights is streamed block by block (:class:`ShardSource`);
    a GGUF file or a folder without safetensors loads the whole model in float32
    (:class:`MemorySource`), and ``say`` is told so with the memory that takes.
    """
    from .source import INDEX_NAME, SINGLE_NAME, MemorySource, ShardSource

    where, gguf = resolve(spec, cache_dir)
    if not gguf and not Path(where).exists():  # a hub id: fetch the files streaming reads (safetensors only)
        where = _snapshot(spec)
    folder = Path(where)
    if not gguf:
        check_not_checkpoint(spec, where)
    streamable = not gguf and ((folder / INDEX_NAME).is_file() or (folder / SINGLE_NAME).is_file())
    if streamable:
        tok = tokenizer_for(spec, tokenizer, cache_dir) if tokenizer is not None else load_tokenizer(folder)
        return ShardSource(folder, spec), tok
    why = "it is a GGUF file" if gguf else "it has no safetensors weights"
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
        raise RVQError(f"there is no local folder {repo_id!r}, and it could not be fetched as a model from the hub "
                       f"({_hub_reason(err)}): check the path, or the id, your network and `hf auth login` for "
                       "gated models") from None


def _hub_reason(err: Exception) -> str:
    """Why a hub download failed, in a few words (the library's messages run over several lines)."""
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        return "a gated model: log in with `hf auth login` and accept its terms on its page"
    if isinstance(err, errors.RepositoryNotFoundError | errors.HFValidationError):
        return "no such model on the hub, or a private one"
    if isinstance(err, errors.LocalEntryNotFoundError):
        return "the hub cannot be reached and the model is not in the local cache"
    return one_line(err, 200)
