"""Text sources and token batches for calibration and evaluation.

A text source is one string:

- ``kjv`` / ``shakespeare`` / ``fortunes`` / ``django`` / ``code`` / ``wiki`` / ``news`` (optionally
  ``reference:kjv``): the offline reference texts (:mod:`rvqllm.reference`); the split (``test`` for
  evaluation, ``calib`` for calibration) is chosen by the caller;
- a path to a local ``.txt``, ``.jsonl`` (a ``text`` field per line) or ``.parquet`` (a ``text`` column);
- a local folder of data files (``.parquet``/``.jsonl``/``.csv``), read with ``datasets``;
- a ``datasets`` name with optional config and split: ``wikitext:wikitext-2-raw-v1``,
  ``wikitext:wikitext-2-raw-v1:test`` or ``allenai/c4:en:validation`` (the ``text`` column, or the one
  named by ``text_column``, is read and joined with blank lines).

The same three numbers choose the tokens everywhere (:func:`token_batches`): how many sequences, how
long, and the seed that places them; calibration draws them at seeded offsets, evaluation takes them
contiguous from the start (the ``ppl-512x64`` protocol, where the seed plays no part).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .errors import RVQError
from .reference import TEXTS, reference_texts


def load_text(source: str, split: str = "test", cache_dir: Path | None = None, text_column: str = "text") -> str:
    """The whole text of ``source`` (see module doc). ``split`` is ``test`` or ``calib`` for the reference
    texts and the default ``datasets`` split (``calib`` maps to ``train``)."""
    name = source.removeprefix("reference:")
    if name in TEXTS:
        return reference_texts(cache_dir)[name]["calib" if split in ("calib", "train") else "test"].read_text()
    path = Path(source)
    if path.is_dir():
        return _read_folder(path, split, text_column)
    if path.exists():
        return _read_file(path, text_column)
    if source.endswith((".txt", ".jsonl", ".parquet", ".json")) or source.startswith((".", "/", "~")):
        raise RVQError(f"text file {source} not found: check the path")
    return _read_dataset(source, split, text_column)


def source_label(source: str) -> str:
    """Short name of a source for tables: ``kjv``, a file's stem, or the ``datasets`` name and config."""
    path = Path(source)
    if path.exists():
        return path.stem or path.name
    parts = source.removeprefix("reference:").split(":")
    label = parts[0].split("/")[-1]
    return f"{label}-{parts[1]}" if len(parts) > 1 and parts[1] else label


def _column(ds, where: str, text_column: str) -> str:
    if text_column not in ds.column_names:
        raise RVQError(f"{where} has no {text_column!r} column (columns: {ds.column_names}): "
                       "name the text column with --text-column")
    return "\n\n".join(t for t in ds[text_column] if t)


def _read_folder(path: Path, split: str, text_column: str) -> str:
    from datasets import load_dataset

    kinds = {f.suffix for f in path.iterdir() if f.suffix in (".parquet", ".jsonl", ".json", ".csv", ".txt")}
    if not kinds:
        raise RVQError(f"{path} is a folder without .parquet/.jsonl/.csv/.txt files: give a text file or a data folder")
    try:
        ds = load_dataset(str(path), split="train")
    except Exception as err:  # datasets raises many types for unreadable folders
        raise RVQError(f"could not read data folder {path} ({err.__class__.__name__}): check its files") from None
    return _column(ds, str(path), text_column)


def _read_file(path: Path, text_column: str = "text") -> str:
    if path.suffix in (".jsonl", ".json"):
        texts = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)[text_column])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise RVQError(f"{path}:{i} is not a JSON object with a {text_column!r} field: fix that line "
                                   "or name the field with --text-column") from None
        return "\n\n".join(texts)
    if path.suffix == ".parquet":
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=str(path), split="train")
        return _column(ds, str(path), text_column)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RVQError(f"{path} is not UTF-8 text: convert it or give a .jsonl/.parquet file") from None


def _read_dataset(spec: str, split: str, text_column: str = "text") -> str:
    from datasets import load_dataset

    parts = spec.split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    ds_split = parts[2] if len(parts) > 2 else ("train" if split in ("calib", "train") else split)
    try:
        ds = load_dataset(name, config, split=ds_split)
    except Exception as err:  # datasets raises many types (network, missing config, ...)
        raise RVQError(
            f"could not load dataset {spec!r} ({err.__class__.__name__}: {str(err).splitlines()[0][:160]}): "
            "check the name/config/split or give a local text file"
        ) from None
    return _column(ds, f"dataset {spec!r}", text_column)


def token_streams(texts: list[str], tokenizer) -> list[list[int]]:
    """Each non-blank text of ``texts`` tokenized whole, without special tokens: one id list per text."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts if t and t.strip()]


def calibration_tokens(texts: list[str], tokenizer, n_sequences: int, seq_len: int, seed: int = 0) -> Tensor:
    """``[n_sequences, seq_len]`` int64: windows drawn at seeded random offsets, spread evenly over ``texts``.

    Raises :class:`RVQError` if the texts together are too short.
    """
    return calibration_windows(token_streams(texts, tokenizer), n_sequences, seq_len, seed)


def calibration_windows(streams: list[list[int]], n_sequences: int, seq_len: int, seed: int = 0) -> Tensor:
    """:func:`calibration_tokens` from texts already tokenized (:func:`token_streams`): the same windows, for
    callers that draw several calibration sets from the same texts and tokenize them once."""
    gen = torch.Generator().manual_seed(seed)
    streams = [s for s in streams if len(s) >= seq_len]
    if not streams:
        raise RVQError(
            f"calibration text is empty or shorter than one sequence of {seq_len} tokens: "
            "give more text or lower calib_seq_len"
        )
    total = sum(len(s) for s in streams)
    if total < n_sequences * seq_len // 4:
        raise RVQError(
            f"calibration text has {total} tokens, too few for {n_sequences} x {seq_len}: "
            "give more text or lower calib_sequences / calib_seq_len"
        )
    rows = []
    for i in range(n_sequences):
        s = streams[i % len(streams)]
        start = int(torch.randint(len(s) - seq_len + 1, (1,), generator=gen))
        rows.append(s[start : start + seq_len])
    return torch.tensor(rows, dtype=torch.long)


#: the calibration source name that stands for text sampled from the model itself (:func:`sampled_tokens`)
SAMPLED = "sampled"


def sampled_tokens(model, tokenizer, n_sequences: int, seq_len: int, seed: int = 0, batch: int = 8) -> Tensor:
    """``[n_sequences, seq_len]`` int64: text the (float) model writes itself, for calibration and
    distillation that follow the model's own distribution rather than one corpus's.

    Each sequence starts from a token drawn uniformly from the vocabulary (special tokens excluded: the
    start decides the topic, so the draws spread over prose, code, markup, ...) and continues by plain
    sampling (temperature 1, no truncation, end-of-text suppressed) with the KV cache, ``batch`` sequences
    at a time on the model's device. Seeded: the same ``seed`` gives the same tokens on the same machine.
    Needs the whole model in memory; one forward pass per token (``seq_len`` passes per batch).
    """
    if n_sequences < 1 or seq_len < 2:
        raise RVQError(f"sampled calibration needs n_sequences >= 1 and seq_len >= 2 (got {n_sequences}, {seq_len})")
    special = set(tokenizer.all_special_ids)
    vocab = min(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for a in range(0, n_sequences, batch):
            b = min(batch, n_sequences - a)
            first = allowed[torch.randint(len(allowed), (b, 1), generator=gen)].to(device)
            out = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, min_new_tokens=seq_len - 1, max_new_tokens=seq_len - 1,
                                 pad_token_id=eos)
            rows.append(out[:, :seq_len].cpu())
    return torch.cat(rows).long()


def token_batches(texts: list[str], tokenizer, n_sequences: int, seq_len: int, seed: int = 0,
                  purpose: str = "calib") -> Tensor:
    """``[n_sequences, seq_len]`` int64, the one entry point for both uses with the same three options.

    ``purpose="calib"``: :func:`calibration_tokens` (seeded offsets, spread over ``texts``);
    ``purpose="eval"``: the first ``n_sequences * seq_len`` tokens of the single text, contiguous
    (:func:`rvqllm.eval.perplexity.tokenize_windows`; ``seed`` unused).
    """
    if purpose == "calib":
        return calibration_tokens(texts, tokenizer, n_sequences, seq_len, seed)
    if purpose == "eval":
        from .eval.perplexity import tokenize_windows

        if len(texts) != 1:
            raise RVQError("evaluation windows come from one text at a time: pass a list of one text")
        return tokenize_windows(texts[0], tokenizer, seq_len, n_sequences)
    raise RVQError(f"purpose must be 'calib' or 'eval', not {purpose!r}")
