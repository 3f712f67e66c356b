"""The model's own code around a walk over its blocks: every decoder block replaced by a stand-in.

A block-by-block walk holds one block at a time, but what a model does after its last block (the final
norm, the LM head, logit scaling, the loss) is the model's code, different in each family. Running the
model with its blocks replaced by :class:`_Injector` stand-ins (the first returns a given hidden state,
the others pass it on) reuses that code as it is:

- :func:`final_normed_hidden`: what the LM head is fed when the last block outputs a given hidden state
  (distillation's teacher, :mod:`rvqllm.pipeline`);
- :func:`loss_grad`: the language-model loss for a given last-block output and its gradient with
  respect to that output (the top of the block-by-block backward of :mod:`rvqllm.mixed`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .arch import only_weight_grads
from .errors import RVQError


class _Injector(nn.Module):
    """Stands in for a decoder block: returns a stored hidden state (first block) or its input unchanged,
    as a one-element tuple where the real blocks return tuples (``as_tuple``: Falcon, BLOOM), since the
    model's code then takes element 0 of what a block returns.

    Plain attributes of the block it replaces (e.g. ``attention_type``) are copied so model code that
    reads them still works."""

    def __init__(self, like: nn.Module, value: Tensor | None, as_tuple: bool = False) -> None:
        super().__init__()
        for k, v in vars(like).items():
            if not k.startswith("_") and not isinstance(v, nn.Module | Tensor):
                setattr(self, k, v)
        self.value = value
        self.as_tuple = as_tuple

    def forward(self, hidden: Tensor, *args, **kwargs) -> Tensor | tuple[Tensor]:
        out = hidden if self.value is None else self.value
        return (out,) if self.as_tuple else out


class _StopAtHead(Exception):
    pass


def final_normed_hidden(model: nn.Module, blocks: nn.ModuleList, ids: Tensor, hidden: Tensor,
                        with_logits: bool = False, as_tuple: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """What the model feeds its LM head when its last block outputs ``hidden [batch, seq, hidden]`` on
    token batch ``ids``: the final norm (and whatever else the model does after its blocks), run by the
    model's own code with every block replaced by a stand-in, stopped at the head. ``with_logits``: run
    on to the end and also return the model's logits ``[batch, seq, vocab]`` (keep the batch small).
    ``as_tuple``: the model's blocks return tuples (see :class:`_Injector`)."""
    head = model.get_output_embeddings()
    captured: list[Tensor] = []

    def grab(_m, args):
        captured.append(args[0].detach())
        if not with_logits:
            raise _StopAtHead

    handle = head.register_forward_pre_hook(grab)
    logits = None
    try:
        with _stand_ins(blocks, hidden, as_tuple), torch.no_grad():
            try:
                logits = model(input_ids=ids, use_cache=False).logits
            except _StopAtHead:
                pass
    finally:
        handle.remove()
    if not captured:
        raise RVQError(f"{type(model).__name__}: could not find what its LM head is fed; distillation is not "
                       "supported for this architecture (set distill_epochs: 0)")
    return (captured[0], logits) if with_logits else captured[0]


@contextmanager
def _stand_ins(blocks: nn.ModuleList, hidden: Tensor, as_tuple: bool):
    """``blocks`` replaced by stand-ins for the duration: the first returns ``hidden``."""
    saved = list(blocks)
    try:
        for k, b in enumerate(saved):
            blocks[k] = _Injector(b, hidden if k == 0 else None, as_tuple)
        yield
    finally:
        for k, b in enumerate(saved):
            blocks[k] = b


def loss_grad(model: nn.Module, blocks: nn.ModuleList, ids: Tensor, hidden: Tensor, micro_batch: int,
              as_tuple: bool = False) -> tuple[float, Tensor]:
    """The model's next-token loss on ``ids [batch, seq]`` when its last block outputs ``hidden [batch, seq,
    hidden_size]``, and the loss's gradient with respect to ``hidden`` (same shape and dtype).

    The loss is the model's own (``model(input_ids=ids, labels=ids).loss``: the mean over the batch's
    tokens), computed ``micro_batch`` sequences at a time so that only that many sequences' logits exist
    at once; the pieces are weighted by their share of the batch, so the result is the whole batch's.
    No parameter of ``model`` gets a gradient (their ``requires_grad`` flags are restored afterwards).
    ``as_tuple``: the model's blocks return tuples (see :class:`_Injector`).
    """
    batch = ids.shape[0]
    grad = torch.empty_like(hidden)
    total = 0.0
    with only_weight_grads(model):
        for a in range(0, batch, micro_batch):
            b = min(a + micro_batch, batch)
            h = hidden[a:b].detach().requires_grad_(True)
            with _stand_ins(blocks, h, as_tuple), torch.enable_grad():
                out = model(input_ids=ids[a:b], labels=ids[a:b], use_cache=False)
                if getattr(out, "loss", None) is None:
                    raise RVQError(f"{type(model).__name__} computes no loss from labels: mixed precision "
                                   "(bpw_budget) cannot measure sensitivity for it; use a uniform preset")
                loss = out.loss * ((b - a) / batch)
                loss.backward()
            grad[a:b] = h.grad
            total += float(loss.detach())
    return total, grad
