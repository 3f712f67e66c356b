"""Evaluation: perplexity and size, side by side with the baseline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from .perplexity import PerplexityResult, perplexity, tokenize_windows
from .report import format_table


def evaluate(
    model: nn.Module,
    tokenizer,
    texts: dict[str, str],
    *,
    context: int = 512,
    windows: int = 64,
    batch_size: int = 4,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, PerplexityResult]:
    """Perplexity of ``model`` on each named text (``{name: full text}``), ppl-``context``x``windows``.

    ``tokenizer``: a tokenizer object, or where to load one from (a folder, a .gguf file or a hub id)."""
    if tokenizer is None or isinstance(tokenizer, str | Path):
        from ..errors import RVQError
        from ..models import load_tokenizer, resolve_tokenizer

        if tokenizer is None:
            raise RVQError("evaluate needs a tokenizer: pass a tokenizer object or where to load one from "
                           "(a folder, a .gguf file or a hub id)")
        tokenizer = load_tokenizer(*resolve_tokenizer(str(tokenizer)))
    results = {}
    for name, text in texts.items():
        ids = tokenize_windows(text, tokenizer, context, windows)
        cb = (lambda done, total, _n=name: progress(_n, done, total)) if progress else None
        results[name] = perplexity(model, ids, batch_size=batch_size, progress=cb)
    return results


__all__ = ["PerplexityResult", "evaluate", "format_table", "perplexity", "tokenize_windows"]
