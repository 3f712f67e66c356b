"""Block fine-tuning: tune a quantized block's continuous parameters so its output matches the float block's.

After every linear layer of a decoder block is coded, the codes are frozen and the block's continuous
parameters are trained with Adam on the calibration batches to minimise the relative squared error

    ||block_q(X) - block_fp(X)||^2 / ||block_fp(X)||^2

where ``X`` are the inputs the quantized model feeds this block and ``block_fp(X)`` were recorded from
the float block before its layers were replaced. Trained: every codebook (fp32 master copy), every
per-row scale (as a multiplier on the coded scale) and bias of the quantized layers, and the block's
own float parameters (norm weights). At the end codebooks and scales are rounded to fp16 (what the
checkpoint stores), and the float parameters to the model's storage dtype, so the model in memory is
exactly what is saved. If a step makes the error worse than it was before tuning, the block keeps its
pre-tuning values (fine-tuning never hurts the calibration objective).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .nn import QuantizedLinear
from .rvq import unpack


class _TrainableRVQ(nn.Module):
    """Stands in for a :class:`QuantizedLinear` during tuning: decodes its weight with autograd.

    ``codebooks [S, K, d]`` fp32 and ``log_gain [out]`` (scales = coded scales * exp(log_gain)) are
    trained; the codes ``[out, G, S]`` are fixed.
    """

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self._layer = (layer,)  # held outside the module tree: the swap must not see it as a child
        self.in_features = layer.op_in_features  # the coded width in a rotated layer (forward rotates x)
        self.out_features = layer.out_features
        self.codebooks = nn.Parameter(layer.codebooks.detach().float().clone())
        self.log_gain = nn.Parameter(torch.zeros(layer.out_features))
        self.bias = nn.Parameter(layer.bias.detach().float().clone()) if layer.bias is not None else None
        self.register_buffer("base_scales", layer.scales.detach().float().clone(), persistent=False)
        out, groups, stages = layer.codes.shape
        k = layer.codebooks.shape[1]
        # flat indices into codebooks.reshape(S*K, d): stage s's codes are offset by s*K
        self.register_buffer("flat_idx", (unpack(layer.codes) + torch.arange(stages) * k).reshape(-1, stages),
                             persistent=False)

    def scales(self) -> Tensor:
        return self.base_scales * self.log_gain.exp()

    def weight(self) -> Tensor:
        """``[out, in_features]`` float32, differentiable in codebooks and scales."""
        stages, k, d = self.codebooks.shape
        out = self._layer[0].out_features
        vecs = self.codebooks.reshape(stages * k, d)[self.flat_idx].sum(1)  # [out*G, d]
        w = vecs.reshape(out, -1)[:, : self.in_features]
        return w * self.scales()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        x = self._layer[0].rotate_input(x)
        return nn.functional.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def write_back(self) -> None:
        """Round the trained values to the stored precision and put them in the wrapped layer."""
        self._layer[0].codebooks.copy_(self.codebooks.clamp(-65504, 65504).half())
        self._layer[0].scales.copy_(self.scales().clamp(-65504, 65504).half())
        if self.bias is not None:
            self._layer[0].bias.copy_(self.bias.to(self._layer[0].bias.dtype))


def _swap(block: nn.Module, old_to_new: dict[nn.Module, nn.Module]) -> None:
    found = [(parent, name, old_to_new[child]) for parent in block.modules()
             for name, child in parent.named_children() if child in old_to_new]
    for parent, name, new in found:
        setattr(parent, name, new)


def _relative_error(block: nn.Module, inputs, targets, kwargs: list[dict], outputs=None) -> float:
    """``||block(inputs) - targets||^2 / ||targets||^2`` over all batches; the block's outputs also go
    to ``outputs`` (a store, one batch at a time) when given."""
    num = den = 0.0
    with torch.no_grad():
        for j, kw in enumerate(kwargs):
            out = _hidden(block(inputs.get(j), **kw))
            if outputs is not None:
                outputs.put(j, out.detach())
            tgt = targets.get(j)
            num += float((out.float() - tgt.float()).pow(2).sum())
            den += float(tgt.float().pow(2).sum())
    return num / max(den, 1e-30)


def _hidden(out: object) -> Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _slice(value: object, start: int, stop: int, batch: int) -> object:
    """``value`` cut to sequences ``start:stop`` where it has a batch dimension (dim 0 == ``batch``);
    tensors broadcast over the batch (dim 0 == 1) and non-tensors pass through."""
    if isinstance(value, Tensor):
        return value[start:stop] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple | list):
        return type(value)(_slice(v, start, stop, batch) for v in value)
    return value


def _micro_batches(x: Tensor, tgt: Tensor, kw: dict, size: int):
    batch = x.shape[0]
    if batch <= size:
        yield x, tgt, kw
        return
    for a in range(0, batch, size):
        b = min(a + size, batch)
        yield x[a:b], tgt[a:b], {k: _slice(v, a, b, batch) for k, v in kw.items()}


def _tune(root: nn.Module, float_params: list[nn.Parameter], evaluate: Callable[[], float],
          losses: Callable[[], Iterator[Tensor]], *, epochs: int, lr: float,
          storage_dtype: torch.dtype | None, evaluate_after: Callable[[], float] | None = None,
          ) -> tuple[float, float, bool]:
    """Adam on every :class:`QuantizedLinear` under ``root`` (codebooks, scale gains, biases) and on
    ``float_params``, one step per loss that ``losses()`` yields, ``epochs`` times; then round to the
    stored precision and keep the result only if ``evaluate_after()`` (default ``evaluate``; lower is
    better) did not get worse than ``evaluate()`` before tuning.
    Returns ``(before, after, tuned)``: ``tuned`` is False when nothing changed (no epochs, or reverted)."""
    before = evaluate()
    if epochs <= 0:
        return before, before, False
    wrappers = {m: _TrainableRVQ(m) for m in root.modules() if isinstance(m, QuantizedLinear)}
    saved_float = [p.detach().clone() for p in float_params]
    saved_layers = {m: (m.codebooks.clone(), m.scales.clone(), None if m.bias is None else m.bias.clone())
                    for m in wrappers}
    requires = [p.requires_grad for p in float_params]
    _swap(root, wrappers)
    try:
        params = [p for w in wrappers.values() for p in w.parameters()]
        for p in float_params:
            p.requires_grad_(True)
        opt = torch.optim.Adam([{"params": params}, {"params": float_params}], lr=lr, betas=(0.9, 0.95))
        with torch.enable_grad():
            for _ in range(epochs):
                for loss in losses():
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
    finally:
        for p, r in zip(float_params, requires, strict=True):
            p.requires_grad_(r)
        _swap(root, {w: m for m, w in wrappers.items()})
    with torch.no_grad():
        for w in wrappers.values():
            w.write_back()
        if storage_dtype is not None:
            for p in float_params:
                p.copy_(p.to(storage_dtype))
    after = (evaluate_after or evaluate)()
    if not after <= before:  # also catches NaN: keep what the model had
        with torch.no_grad():
            for p, v in zip(float_params, saved_float, strict=True):
                p.copy_(v)
            for m, (cb, sc, b) in saved_layers.items():
                m.codebooks.copy_(cb)
                m.scales.copy_(sc)
                if b is not None:
                    m.bias.copy_(b)
        return before, before, False
    return before, after, True


def finetune_block(
    block: nn.Module,
    inputs,
    targets,
    kwargs: list[dict],
    *,
    epochs: int,
    lr: float,
    micro_batch: int = 2,
    storage_dtype: torch.dtype | None = None,
    outputs=None,
) -> tuple[float, float]:
    """Tune ``block``'s quantized layers' codebooks/scales/biases and its float parameters in place.

    Args:
        block: a decoder block whose linear layers are :class:`QuantizedLinear`.
        inputs, targets: activation stores (``.get(j)`` → ``[batch, seq, hidden]``), one per batch of
            ``kwargs``; ``targets`` are what the block should output on ``inputs``.
        kwargs: the block's other forward arguments, per batch.
        epochs: passes over the batches. ``lr``: Adam learning rate.
        micro_batch: sequences per Adam step (batches are cut along dim 0; block arguments with that
            batch dimension are cut alike, those of batch 1 are shared).
        storage_dtype: the dtype unquantized tensors are saved in (float params are rounded to it).
        outputs: optional store that gets the tuned block's outputs on ``inputs`` (the next block's
            inputs), taken from the final error evaluation rather than from one more forward pass.
    Returns:
        ``(error_before, error_after)``: relative output error on the calibration batches.
    """

    def losses() -> Iterator[Tensor]:
        for j, kw in enumerate(kwargs):
            for x, tgt, mkw in _micro_batches(inputs.get(j), targets.get(j), kw, micro_batch):
                out = _hidden(block(x, **mkw)).float()
                tgt = tgt.float()
                yield (out - tgt).pow(2).sum() / tgt.pow(2).sum().clamp_min(1e-30)

    float_params = [p for p in block.parameters() if p.is_floating_point()]
    before, after, tuned = _tune(
        block, float_params, lambda: _relative_error(block, inputs, targets, kwargs), losses,
        epochs=epochs if kwargs else 0, lr=lr, storage_dtype=storage_dtype,
        evaluate_after=None if outputs is None else lambda: _relative_error(block, inputs, targets, kwargs, outputs))
    if outputs is not None and not tuned:  # reverted (or never tuned): the outputs of the kept values
        _relative_error(block, inputs, targets, kwargs, outputs)
    return before, after


# ---------------------------------------------------------------------------------------- distillation
#: teacher log-probabilities kept per token (the rest of the vocabulary is one "tail" bucket)
TEACHER_TOP_K = 64


def teacher_topk(model: nn.Module, batches: list[Tensor], k: int = TEACHER_TOP_K) -> list[tuple[Tensor, Tensor]]:
    """The float model's top-``k`` next-token log-probabilities on each ``[batch, seq]`` token batch:
    ``[(logp [batch, seq, k] float32, index [batch, seq, k] int64)]`` (a few MB where full logits would
    take GBs)."""
    out = []
    with torch.no_grad():
        for ids in batches:
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            out.append(tuple(logp.topk(k, dim=-1)))
    return out


def _topk_kl(logits: Tensor, teacher: tuple[Tensor, Tensor]) -> Tensor:
    """Mean per-token KL(teacher || student) over the teacher's top-k words plus one bucket for the rest."""
    t_logp, idx = teacher
    s_logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, idx)
    t_p = t_logp.exp()
    kl = (t_p * (t_logp - s_logp)).sum(-1)
    t_tail = (1 - t_p.sum(-1)).clamp_min(1e-8)
    s_tail = (1 - s_logp.exp().sum(-1)).clamp_min(1e-8)
    return (kl + t_tail * (t_tail.log() - s_tail.log())).mean()


def distill_model(
    model: nn.Module,
    blocks: list[nn.Module],
    batches: list[Tensor],
    teacher: list[tuple[Tensor, Tensor]],
    *,
    epochs: int,
    lr: float,
    micro_batch: int = 2,
    storage_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Tune every quantized layer and the blocks' float parameters (norms) of ``model`` at once so its
    next-token distribution matches the float model's (:func:`teacher_topk`) on the calibration batches.
    Embeddings and the LM head stay as they are. Returns ``(kl_before, kl_after)`` (mean per token)."""

    def evaluate() -> float:
        with torch.no_grad():
            kls = [float(_topk_kl(model(input_ids=ids, use_cache=False).logits, t)) for ids, t in zip(batches, teacher,
                                                                                                     strict=True)]
        return sum(kls) / max(len(kls), 1)

    def losses() -> Iterator[Tensor]:
        for ids, (t_logp, idx) in zip(batches, teacher, strict=True):
            for a in range(0, ids.shape[0], micro_batch):
                sl = slice(a, a + micro_batch)
                yield _topk_kl(model(input_ids=ids[sl], use_cache=False).logits, (t_logp[sl], idx[sl]))

    float_params = [p for b in blocks for p in b.parameters() if p.is_floating_point()]
    before, after, _ = _tune(model, float_params, evaluate, losses, epochs=epochs, lr=lr, storage_dtype=storage_dtype)
    return before, after
