"""Perplexity, the ``ppl-512x64`` protocol (shared/PROTOCOL.md).

Tokenize the whole text without special tokens (BOS prepended for models that need one, e.g. Gemma),
take the first ``windows * context`` tokens as non-overlapping windows, run an fp32 forward and
average the cross-entropy of every predicted token (``context - 1`` per window).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import RVQError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  #: mean cross-entropy in nats
    tokens: int  #: predicted tokens scored
    context: int
    windows: int

    def __str__(self) -> str:
        return f"ppl {self.ppl:.3f} (context {self.context}, {self.windows} windows, {self.tokens} tokens)"


def needs_bos(tokenizer) -> bool:
    """Models trained to always see BOS first (Gemma) degrade badly without it."""
    name = type(tokenizer).__name__.lower() + str(getattr(tokenizer, "name_or_path", "")).lower()
    return "gemma" in name and tokenizer.bos_token_id is not None


def tokenize_windows(text: str, tokenizer, context: int = 512, windows: int = 64) -> Tensor:
    """``[windows, context]`` int64 token ids from the start of ``text``.

    Raises :class:`RVQError` if the text has fewer than ``windows * context`` tokens.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors=None)["input_ids"]
    if needs_bos(tokenizer):
        ids = [tokenizer.bos_token_id, *ids]
    need = windows * context
    if len(ids) < need:
        raise RVQError(
            f"the text has {len(ids)} tokens but {windows} windows x {context} need {need}: "
            "give a longer text or fewer/shorter windows"
        )
    return torch.tensor(ids[:need], dtype=torch.long).reshape(windows, context)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: Tensor,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows [n, context]`` (fp32 logits, every predicted token counted)."""
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    count = 0
    n, context = windows.shape
    for start in range(0, n, batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        count += ids[:, 1:].numel()
        if progress is not None:
            progress(min(start + batch_size, n), n)
    mean = total_nll / count
    return PerplexityResult(math.exp(mean), mean, count, context, n)
