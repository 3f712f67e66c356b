"""Text sources and token batches for calibration and evaluation.

A text source is one string:

- ``kjv`` / ``shakespeare`` (optionally ``reference:kjv``): the offline reference texts; the split
  (``test`` for evaluation, ``calib`` for calibration) is chosen by the caller;
- a path to a local ``.txt``, ``.jsonl`` (a ``text`` field per line) or ``.parquet`` (a ``text`` column);
- a ``datasets`` name with optional config and split: ``wikitext:wikitext-2-raw-v1`` or
  ``wikitext:wikitext-2-raw-v1:test`` (a ``text`` column is read and joined with blank lines).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .errors import RVQError
from .reference import TEXTS, reference_texts


def load_text(source: str, split: str = "test", cache_dir: Path | None = None) -> str:
    """The whole text of ``source`` (see module doc). ``split`` is ``test`` or ``calib`` for the reference
    texts and the default ``datasets`` split (``calib`` maps to ``train``)."""
    name = source.removeprefix("reference:")
    if name in TEXTS:
        return reference_texts(cache_dir)[name]["calib" if split in ("calib", "train") else "test"].read_text()
    path = Path(source)
    if path.exists():
        return _read_file(path)
    if source.endswith((".txt", ".jsonl", ".parquet", ".json")) or "/" in source and not source.count(":"):
        raise RVQError(f"text file {source} not found: check the path")
    return _read_dataset(source, split)


def _read_file(path: Path) -> str:
    if path.is_dir():
        raise RVQError(f"{path} is a folder: give a .txt, .jsonl or .parquet file")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise RVQError(f"{path}:{i} is not a JSON object with a 'text' field: fix that line") from None
        return "\n\n".join(texts)
    if path.suffix == ".parquet":
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=str(path), split="train")
        if "text" not in ds.column_names:
            raise RVQError(f"{path} has no 'text' column (columns: {ds.column_names})")
        return "\n\n".join(ds["text"])
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RVQError(f"{path} is not UTF-8 text: convert it or give a .jsonl/.parquet file") from None


def _read_dataset(spec: str, split: str) -> str:
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
    if "text" not in ds.column_names:
        raise RVQError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return "\n\n".join(t for t in ds["text"] if t)


def calibration_tokens(texts: list[str], tokenizer, n_sequences: int, seq_len: int, seed: int = 0) -> Tensor:
    """``[n_sequences, seq_len]`` int64: windows drawn at seeded random offsets, spread evenly over ``texts``.

    Raises :class:`RVQError` if the texts together are too short.
    """
    gen = torch.Generator().manual_seed(seed)
    streams = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts if t and t.strip()]
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
