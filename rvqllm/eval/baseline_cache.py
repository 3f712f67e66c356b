"""Baseline perplexities, measured once per machine and reused.

The unquantized model's perplexity on a text does not change from one evaluation to the next, yet it
costs as much time as a checkpoint's (minutes on a CPU). ``rvqllm eval`` / ``report`` / ``demo`` keep it
in ``<cache>/baselines/<key>.json`` (``~/.cache/rvqllm`` unless ``XDG_CACHE_HOME`` says otherwise),
(or the folder ``RVQLLM_BASELINE_CACHE`` names), keyed by everything the number depends on: the model's files (name, size, modification time), the
tokenizer given instead of the model's own, the exact text (sha256), the protocol (context, windows),
the compute dtype and the versions of torch, transformers and rvqllm. Anything else, and a hub id
(whose files are not local), is measured again. ``--no-cache`` measures again and replaces the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def _files(where: Path) -> list[list]:
    paths = [where] if where.is_file() else sorted(p for p in where.iterdir() if p.is_file())
    return [[p.name, (s := p.stat()).st_size, s.st_mtime_ns] for p in paths]


def key(where: str, gguf: str | None, tokenizer: str | None, texts: dict[str, str], context: int,
        windows: int) -> str | None:
    """The cache key of a baseline evaluation, or ``None`` when it is not cacheable (not a local model)."""
    import torch
    import transformers

    from .. import __version__

    path = Path(where) / gguf if gguf else Path(where)
    if not path.exists():
        return None
    parts: dict[str, Any] = {
        "model": [str(path.resolve()), _files(path)],
        "tokenizer": [str(Path(tokenizer).resolve()), _files(Path(tokenizer))] if tokenizer and Path(tokenizer).exists()
        else tokenizer,
        "texts": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(texts.items())},
        "context": context, "windows": windows, "dtype": "float32",
        "versions": [torch.__version__, transformers.__version__, __version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _path(k: str) -> Path:
    from ..reference import default_cache_dir

    folder = os.environ.get("RVQLLM_BASELINE_CACHE") or default_cache_dir() / "baselines"
    return Path(folder) / f"{k}.json"


def get(k: str | None) -> dict | None:
    """The cached ``{"ppl": {text: ppl}, "tokens": {text: n}, "measured": iso time}`` for key ``k``, if any."""
    if k is None:
        return None
    try:
        entry = json.loads(_path(k).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(entry, dict) and isinstance(entry.get("ppl"), dict) and isinstance(entry.get("tokens"), dict)
    return entry if ok else None


def put(k: str | None, ppl: dict[str, float], tokens: dict[str, int]) -> None:
    """Store an entry (atomically; a cache that cannot be written is skipped silently: it only saves time)."""
    import time

    if k is None:
        return
    path = _path(k)
    entry = {"ppl": ppl, "tokens": tokens, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)
    except OSError:
        pass
