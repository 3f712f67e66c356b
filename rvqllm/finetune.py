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

Whole-model distillation (:func:`distill_model`) tunes the same parameters of all blocks at once
towards the float model's top-k next-token distribution (:func:`teacher_topk`). Its memory does not
grow with vocabulary x calibration tokens: full-vocabulary logits exist for at most ``chunk_tokens``
tokens at a time (``RVQConfig.distill_chunk_tokens``), see the "distillation" section below.
Everything runs on the device the model (or block) is on; inputs from CPU stores are moved there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import RVQConfig
from .errors import RVQError
from .kernels.cpu_build import warn_once
from .nn import TRELLIS_KEY, QuantizedLinear, TrellisLinear
from .placement import Placement
from .rvq import pack, rotation, unpack
from .rvq.lookup import lookup_sum
from .rvq.residual import encode_rvq_chunked


class _TrainableRVQ(nn.Module):
    """Stands in for a :class:`QuantizedLinear` during tuning: decodes its weight with autograd.

    ``codebooks [S, K, d]`` fp32 and ``log_gain [out]`` (scales = coded scales * exp(log_gain)) are
    trained; the codes ``[out, G, S]`` stay fixed unless a ``shadow`` is kept (codes that move, :meth:`recode`:
    it costs a float copy of the decoded weight plus its two Adam moments).
    """

    def __init__(self, layer: QuantizedLinear, shadow: bool = False) -> None:
        super().__init__()
        self._layer = (layer,)  # held outside the module tree: the swap must not see it as a child
        self.in_features = layer.op_in_features  # the coded width in a rotated layer (forward rotates x)
        self.out_features = layer.out_features
        self.codebooks = nn.Parameter(layer.codebooks.detach().float().clone())
        self.log_gain = nn.Parameter(torch.zeros(layer.out_features, device=layer.scales.device))
        self.bias = nn.Parameter(layer.bias.detach().float().clone()) if layer.bias is not None else None
        self.register_buffer("base_scales", layer.scales.detach().float().clone(), persistent=False)
        # a trellis layer: its table index per weight [out * in, 1], decoded from the walks once (uint8: the
        # walks never change during tuning, and 1 byte a weight for one layer's wrapper at a time)
        self.indices = (layer.table_indices().to(torch.uint8).reshape(-1, 1)
                        if isinstance(layer, TrellisLinear) else None)
        # codes that move (distill_code_fraction): a float shadow of every coded vector [out*G, d], in the
        # codebooks' units; it takes the decoded weight's gradient (straight through) and leads re-encoding
        self.shadow = nn.Parameter(self.vectors().detach().clone()) if shadow else None

    def scales(self) -> Tensor:
        return self.base_scales * self.log_gain.exp()

    def vectors(self) -> Tensor:
        """``[out*G, d]`` float32: every group's decoded vector (before its row's scale)."""
        if self.indices is not None:
            return self._decode(self.indices)
        # int64 codes [out*G, S] made here, not kept: 8x the stored codes' bytes, for one layer at a time
        return self._decode(unpack(self._layer[0].codes).reshape(-1, self.codebooks.shape[0]))

    def _decode(self, codes: Tensor) -> Tensor:
        """``codes [n, S]`` integer → their vectors ``[n, d]`` under the current codebooks (differentiable in
        them: :func:`rvqllm.rvq.lookup.lookup_sum`)."""
        return lookup_sum(self.codebooks, codes)

    def coded_weight(self) -> Tensor:
        """``[out, in_features]`` float32 (the coded basis: ``W R`` in a rotated layer), differentiable in
        codebooks and scales (and, straight through, in the shadow: its value is the decoded one, its
        gradient the decoded weight's)."""
        vecs = self.vectors()
        if self.shadow is not None:
            vecs = vecs + (self.shadow - self.shadow.detach())
        w = vecs.reshape(self._layer[0].out_features, -1)[:, : self.in_features]
        return w * self.scales()[:, None]

    @torch.no_grad()
    def recode(self, fraction: float, fisher: Tensor | None) -> int:
        """Re-encode the ``fraction`` of groups whose shadow lies farthest from their decoded vector.

        Distances are weighted by ``fisher [out*G, d]`` (the optimizer's running mean of squared
        gradients, a diagonal Fisher estimate of the tuning loss) or plain when it is ``None``. Each
        chosen group gets the beam-searched code (:data:`RECODE_BEAM`) nearest to its shadow under the
        current codebooks, kept only where it is strictly nearer than the group's current code.
        Returns how many groups changed code."""
        vecs = self.vectors()
        wt = None if fisher is None else fisher.float()
        diff = (self.shadow - vecs).pow(2)
        gap = (diff if wt is None else diff * wt).sum(1)
        n = int(fraction * gap.numel())
        if n < 1:
            return 0
        idx = gap.topk(n).indices
        target = self.shadow[idx]
        new = encode_rvq_chunked(target, self.codebooks.detach(), RECODE_BEAM, None if wt is None else wt[idx])
        err = (target - self._decode(new)).pow(2)
        better = (err if wt is None else err * wt[idx]).sum(1) < gap[idx]  # the current code scores gap: strictly better only
        chosen = idx[better]
        self._layer[0].codes.view(-1, new.shape[1])[chosen] = pack(new[better], self._layer[0].bits)
        return int(chosen.numel())

    def forward(self, x: Tensor) -> Tensor:
        x = self._layer[0].rotate_input(x)
        return nn.functional.linear(x, self.coded_weight().to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))

    @property
    def weight(self) -> Tensor:
        """``[out, in]`` in the original basis and the layer's ``compute_dtype``, differentiable: for model
        code that reads the matrix instead of calling the layer (see :class:`QuantizedLinear`)."""
        layer = self._layer[0]
        w = self.coded_weight()
        if layer.signs is not None:
            w = rotation.unrotate(w, layer.signs, layer.hadamard_block)[:, : layer.in_features]
        return w.to(layer.compute_dtype)

    @torch.no_grad()
    def write_back(self) -> None:
        """Round the trained values to the stored precision and put them in the wrapped layer."""
        self._layer[0].write_codebooks(self.codebooks.clamp(-65504, 65504).half())
        self._layer[0].scales.copy_(self.scales().clamp(-65504, 65504).half())
        if self.bias is not None:
            self._layer[0].bias.copy_(self.bias.to(self._layer[0].bias.dtype))


def _warn_if_emulated(dtype: torch.dtype | None, device: torch.device) -> None:
    """Say once, loudly, when tuning in ``dtype`` on ``device`` is emulated (a CPU without AVX512-BF16/AMX,
    a GPU before Ampere): slower than float32."""
    if dtype is not None and not native_bf16(device):
        warn_once(f"autocast-{device.type}", f"this {device.type.upper()} has no native {dtype} arithmetic: "
                  "tuning in it is emulated and slower than in float32; set tune_dtype: float32 in the config")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (CUDA: compute capability 8+; CPU: oneDNN's check
    for AVX512-BF16 / AMX); other devices are trusted."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def _swap(block: nn.Module, old_to_new: dict[nn.Module, nn.Module]) -> None:
    found = [(parent, name, old_to_new[child]) for parent in block.modules()
             for name, child in parent.named_children() if child in old_to_new]
    for parent, name, new in found:
        setattr(parent, name, new)


def _device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the device of its first parameter (or buffer); CPU if it has neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _relative_error(block: nn.Module, inputs, targets, kwargs: dict[int, dict], outputs=None,
                    placement: Placement | None = None) -> float:
    """``||block(inputs) - targets||^2 / ||targets||^2`` over all batches (of every rank); the block's
    outputs also go to ``outputs`` (a store, one batch at a time) when given. Stored batches are moved to
    the block's device (a disk store hands back CPU tensors)."""
    num = den = 0.0
    device = _device(block)
    with torch.no_grad():
        for j, kw in kwargs.items():
            out = _hidden(block(inputs.get(j).to(device), **kw))
            if outputs is not None:
                outputs.put(j, out.detach())
            tgt = targets.get(j).to(device)
            num += float((out.float() - tgt.float()).pow(2).sum())
            den += float(tgt.float().pow(2).sum())
    if placement is not None:
        num, den = placement.all_reduce_float(num), placement.all_reduce_float(den)
    return num / max(den, 1e-30)


def _hidden(out: object) -> Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _slice(value: object, start: int, stop: int, batch: int) -> object:
    """``value`` cut to sequences ``start:stop`` where it has a batch dimension (dim 0 == ``batch``);
    tensors broadcast over the batch (dim 0 == 1) and non-tensors pass through. A tensor of 3 or more
    dimensions whose dim 0 is ``k * batch`` (``k > 1``) has the batch folded with another dimension, batch
    first (BLOOM's and Falcon's ALiBi biases, ``[batch * heads, 1, seq]``): its rows ``start * k:stop * k``."""
    if isinstance(value, Tensor):
        n = value.shape[0] if value.dim() > 0 else 0
        if n == batch:
            return value[start:stop]
        if value.dim() >= 3 and batch > 1 and n > batch and n % batch == 0:
            k = n // batch
            return value[start * k : stop * k]
        return value
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


def _share_codebooks(wrappers: dict[QuantizedLinear, _TrainableRVQ]) -> None:
    """Layers whose ``codebooks`` are one tensor (the model's shared codebook, or one buffer) get one
    trainable codebook: every wrapper of such a layer takes the first one's parameter, so the shared
    codebook is tuned once, by every layer's gradient together, and stays shared when written back."""
    first: dict[tuple, nn.Parameter] = {}
    for m, w in wrappers.items():
        owner = m.shared_owner  # one shared codebook, whatever device each layer reads its copy on
        key = ("shared", id(owner)) if owner is not None else (m.codebooks.device, m.codebooks.data_ptr())
        if key in first:
            w.codebooks = first[key]
        else:
            first[key] = w.codebooks


def _tune(root: nn.Module, float_params: list[nn.Parameter], evaluate: Callable[[], float],
          losses: Callable[[], Iterator[Tensor]], *, epochs: int, lr: float,
          storage_dtype: torch.dtype | None, evaluate_after: Callable[[], float] | None = None,
          placement: Placement | None = None, code_fraction: float = 0.0,
          code_every: int = RVQConfig.distill_code_every, code_lr: float = RVQConfig.distill_code_lr,
          stats: dict | None = None, lr_decay: bool = False, lr_tail: float = 0.0,
          total_steps: int = 0, autocast: torch.dtype | None = None) -> tuple[float, float, bool]:
    """Adam on every :class:`QuantizedLinear` under ``root`` (codebooks, scale gains, biases) and on
    ``float_params``, one step per loss that ``losses()`` yields, ``epochs`` times; then round to the
    stored precision and keep the result only if ``evaluate_after()`` (default ``evaluate``; lower is
    better) did not get worse than ``evaluate()`` before tuning. Every other parameter under ``root``
    (embeddings, LM head, ...) is frozen meanwhile, so no gradient is computed or kept for it (for a
    tied LM head that would be a ``[vocab, hidden]`` tensor).
    With several ranks (``placement``), each rank yields the losses of its own batches and every step
    averages the gradients of the ranks that still had a loss for it (data parallel, as DDP does): a step
    then sees ``world`` micro-batches at once, so N ranks take about N times fewer, larger steps than one
    process; ``evaluate`` must already combine the ranks' batches.
    With ``code_fraction > 0`` the codes move too (PV-style): every layer keeps a straight-through float
    shadow of its coded vectors, trained by Adam at ``code_lr`` (it must move by a fair part of the distance
    between codewords to change a code: larger than ``lr``), and every ``code_every`` steps re-encodes that
    fraction of its groups (:meth:`_TrainableRVQ.recode`, weighted by Adam's squared-gradient average);
    ``stats`` (a dict, when given) then gets ``codes_changed`` (the fraction of groups whose final code
    differs from the one they had), ``recoded`` (accepted re-encodings, all updates), ``code_updates`` and
    ``loss_per_epoch`` (``evaluate()`` after each epoch, before rounding to the stored precision).
    With ``lr_decay`` the first epoch runs at the full learning rates and the later ones decay them to zero
    along a cosine (a warm-stable-decay schedule: the first epoch counts the steps an epoch takes, so
    nothing needs to know it in advance); with one epoch the rates stay constant.
    With ``lr_tail`` in (0, 1] the last that share of ``total_steps`` (every step of every epoch, the same
    count on every rank) decays the learning rates to zero along a cosine, the steps before it at the full
    rates; it works within a single epoch.
    With ``autocast`` (``torch.bfloat16``) the training steps' forward passes (and so their backward)
    multiply in that dtype (``torch.autocast``; :func:`_warn_if_emulated`); parameters, Adam's state, the losses' reductions and the
    evaluations that decide what is kept stay float32.
    Returns ``(before, after, tuned)``: ``tuned`` is False when nothing changed (no epochs, or reverted)."""
    before = evaluate()
    if epochs <= 0:
        return before, before, False
    moving = code_fraction > 0
    wrappers = {m: _TrainableRVQ(m, shadow=moving) for m in root.modules() if isinstance(m, QuantizedLinear)}
    _share_codebooks(wrappers)
    saved_float = [p.detach().clone() for p in float_params]
    saved_layers = {m: (m.codebooks.clone(), m.scales.clone(), None if m.bias is None else m.bias.clone())
                    for m in wrappers}
    saved_codes = {m: m.codes.clone() for m in wrappers} if moving else {}
    step = recoded = updates = 0
    requires = [p.requires_grad for p in float_params]
    trained = {id(p) for p in float_params}
    frozen = [p for p in root.parameters() if p.requires_grad and id(p) not in trained]
    _swap(root, wrappers)
    try:
        shadows = [w.shadow for w in wrappers.values() if w.shadow is not None]
        params = list({id(p): p for w in wrappers.values() for p in w.parameters() if p is not w.shadow}.values())
        for p in frozen:
            p.requires_grad_(False)
        for p in float_params:
            p.requires_grad_(True)
        param_groups = [{"params": params}, {"params": float_params}]
        if shadows:
            param_groups.append({"params": shadows, "lr": code_lr})
        opt = torch.optim.Adam(param_groups, lr=lr, betas=(0.9, 0.95))
        base_lrs = [g["lr"] for g in opt.param_groups]
        ranks = placement is not None and placement.world > 1
        every = params + list(float_params) + shadows
        per_epoch = 0  # steps of the first epoch (the same on every rank: the loop runs in step)
        device = _device(root)
        _warn_if_emulated(autocast, device)
        with torch.enable_grad():
            for epoch in range(epochs):
                steps = iter(losses())
                while True:
                    with torch.autocast(device.type, dtype=autocast) if autocast else nullcontext():
                        loss = next(steps, None)
                    active = placement.all_reduce_float(float(loss is not None)) if ranks else float(loss is not None)
                    if active == 0:
                        break
                    done = None  # of the decay phase, in [0, 1)
                    if lr_decay and epoch > 0 and per_epoch > 0:
                        done = (step - per_epoch) / (per_epoch * (epochs - 1))
                    elif lr_tail > 0 and total_steps > 0:
                        start = total_steps * (1.0 - lr_tail)
                        done = max(step - start, 0.0) / (total_steps - start)
                    if done is not None:
                        for g, base in zip(opt.param_groups, base_lrs, strict=True):
                            g["lr"] = base * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
                    opt.zero_grad(set_to_none=True)
                    if loss is not None:
                        loss.backward()
                    if ranks:
                        placement.all_reduce_grads(every)
                        for p in every:
                            p.grad.div_(active)
                    opt.step()
                    step += 1
                    if moving and step % code_every == 0:
                        updates += 1
                        for w in wrappers.values():
                            recoded += w.recode(code_fraction, opt.state[w.shadow].get("exp_avg_sq"))
                if epoch == 0:
                    per_epoch = step
                if moving and stats is not None:  # the gain per epoch (float values, before rounding)
                    stats.setdefault("loss_per_epoch", []).append(evaluate())
    finally:
        for p, r in zip(float_params, requires, strict=True):
            p.requires_grad_(r)
        for p in frozen:
            p.requires_grad_(True)
        _swap(root, {w: m for m, w in wrappers.items()})
    with torch.no_grad():
        for w in wrappers.values():
            w.write_back()
        if storage_dtype is not None:
            for p in float_params:
                p.copy_(p.to(storage_dtype))
    if moving and stats is not None:
        groups = sum(c[..., 0].numel() for c in saved_codes.values())
        changed = sum(int((m.codes != c).any(-1).sum()) for m, c in saved_codes.items())
        stats.update(codes_changed=changed / max(groups, 1), recoded=recoded, code_updates=updates)
    after = (evaluate_after or evaluate)()
    if not after <= before:  # also catches NaN: keep what the model had
        with torch.no_grad():
            for p, v in zip(float_params, saved_float, strict=True):
                p.copy_(v)
            for m, (cb, sc, b) in saved_layers.items():
                m.write_codebooks(cb)
                m.scales.copy_(sc)
                if b is not None:
                    m.bias.copy_(b)
            for m, c in saved_codes.items():
                m.codes.copy_(c)
        if stats is not None:
            stats["reverted"] = True
        return before, before, False
    return before, after, True


#: a block whose tuning was undone is tuned again at the previous learning rate divided by this
RETRY_LR_DIVISOR = 3.0


def finetune_block(
    block: nn.Module,
    inputs,
    targets,
    kwargs: dict[int, dict],
    *,
    epochs: int,
    lr: float,
    micro_batch: int = 2,
    storage_dtype: torch.dtype | None = None,
    outputs=None,
    placement: Placement | None = None,
    tuned_batches: list[int] | None = None,
    autocast: torch.dtype | None = None,
    retries: int = 0,
    stats: dict | None = None,
) -> tuple[float, float]:
    """Tune ``block``'s quantized layers' codebooks/scales/biases and its float parameters in place.

    Args:
        block: a decoder block whose linear layers are :class:`QuantizedLinear`.
        inputs, targets: activation stores (``.get(j)`` → ``[batch, seq, hidden]``), one per batch of
            ``kwargs``; ``targets`` are what the block should output on ``inputs``.
        kwargs: the block's other forward arguments, by batch index (this rank's batches).
        epochs: passes over the batches. ``lr``: Adam learning rate.
        micro_batch: sequences per Adam step (batches are cut along dim 0; block arguments with that
            batch dimension are cut alike, those of batch 1 are shared).
        storage_dtype: the dtype unquantized tensors are saved in (float params are rounded to it).
        outputs: optional store that gets the tuned block's outputs on ``inputs`` (the next block's
            inputs), taken from the final error evaluation rather than from one more forward pass.
        placement: with several ranks, gradients and errors are combined across them (see :func:`_tune`).
        tuned_batches: the batches of ``kwargs`` to tune on (None: all); only they need ``targets``. The
            others still get their outputs, from the tuned block.
        autocast: ``torch.bfloat16`` to train in it (see :func:`_tune`); None: float32.
        retries: when the tuning made the error worse (and so was undone), tune again from the same
            values at a third of the previous rate, up to this many times (:data:`RETRY_LR_DIVISOR`).
        stats: a dict that gets ``attempts`` (tunings run, 1 + retries used), ``lr`` (the rate of the
            last one) and ``tuned`` (whether a tuning was kept).
    Returns:
        ``(error_before, error_after)``: relative output error on the tuned batches.
    """

    device = _device(block)
    rest = {}
    if tuned_batches is not None:
        chosen = set(tuned_batches)
        rest = {j: kw for j, kw in kwargs.items() if j not in chosen}
        kwargs = {j: kw for j, kw in kwargs.items() if j in chosen}

    def losses() -> Iterator[Tensor]:
        for j, kw in kwargs.items():
            batch_in, batch_tgt = inputs.get(j).to(device), targets.get(j).to(device)
            for x, tgt, mkw in _micro_batches(batch_in, batch_tgt, kw, micro_batch):
                out = _hidden(block(x, **mkw)).float()
                tgt = tgt.float()
                yield (out - tgt).pow(2).sum() / tgt.pow(2).sum().clamp_min(1e-30)

    float_params = [p for p in block.parameters() if p.is_floating_point()]
    rate, attempts = lr, 0
    while True:  # an undone tuning restores every value exactly, so a retry starts where the first did
        attempts += 1
        before, after, tuned = _tune(
            block, float_params, lambda: _relative_error(block, inputs, targets, kwargs, None, placement), losses,
            epochs=epochs, lr=rate, storage_dtype=storage_dtype, placement=placement, autocast=autocast,
            evaluate_after=None if outputs is None else
            lambda: _relative_error(block, inputs, targets, kwargs, outputs, placement))
        if tuned or epochs <= 0 or attempts > retries:
            break
        rate /= RETRY_LR_DIVISOR
    if stats is not None:
        stats.update(attempts=attempts, lr=rate, tuned=tuned)
    if outputs is not None and not tuned:  # reverted (or never tuned): the outputs of the kept values
        _relative_error(block, inputs, targets, kwargs, outputs, placement)
    if outputs is not None:  # the batches not tuned on: outputs of the kept values
        with torch.no_grad():
            for j, kw in rest.items():
                outputs.put(j, _hidden(block(inputs.get(j).to(device), **kw)).detach())
    return before, after


# ---------------------------------------------------------------------------------------- distillation
# Whole-model distillation never holds full-vocabulary logits for more than ``chunk_tokens`` tokens at
# once. The decoder runs once per batch (micro-batch when training) up to its last hidden state
# ``[batch, seq, hidden]``, which is small; the LM head, log-softmax and loss then run on chunks of at
# most ``chunk_tokens`` tokens (chunks may straddle sequences). When training, each chunk runs under
# ``torch.utils.checkpoint``: its ``[chunk, vocab]`` tensors are recomputed in backward rather than
# kept, so forward and backward each hold a few of them for one chunk at a time.

#: teacher log-probabilities kept per token (the rest of the vocabulary is one "tail" bucket)
TEACHER_TOP_K = 64
#: tokens whose full-vocabulary logits exist at once (the default of ``RVQConfig.distill_chunk_tokens``)
DISTILL_CHUNK_TOKENS: int = RVQConfig.distill_chunk_tokens


def _check_chunk(chunk_tokens: object) -> None:
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise RVQError(f"chunk_tokens={chunk_tokens!r} must be a positive integer (tokens per logit chunk)")


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder (base model) of a causal LM: what turns token ids into the last hidden state."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if not isinstance(decoder, nn.Module) or decoder is model:
        raise RVQError(f"{type(model).__name__} has no decoder (get_decoder()) to take the last hidden state "
                       "from: distillation needs a Hugging Face *ForCausalLM model")
    return decoder


def _input_device(model: nn.Module) -> torch.device:
    """Where ``model`` wants its token ids: the device of its input embedding."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return _device(emb) if isinstance(emb, nn.Module) else _device(model)


def _last_hidden(decoder: nn.Module, ids: Tensor) -> Tensor:
    """The decoder's ``last_hidden_state [batch, seq, hidden]`` on ``ids [batch, seq]`` (after its final norm)."""
    out = decoder(input_ids=ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def lm_head_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """What ``model`` applies after its decoder to get next-token logits, as a function
    ``hidden [..., hidden_size] -> logits [..., vocab]`` (in the model's dtype, like ``model(ids).logits``).

    ``hidden`` is the decoder's ``last_hidden_state`` (``model.get_decoder()(input_ids=ids)``): it has been
    through the decoder's final norm (and, in OPT, its ``project_out``), which belong to the decoder, not
    to the head. A caller that runs the decoder blocks itself must apply that final norm to the last
    block's output before calling the head. The head is ``model.get_output_embeddings()`` (``lm_head``;
    ``embed_out`` in GPT-NeoX) followed by what the transformers ``*ForCausalLM.forward`` does to it:
    ``final_logit_softcapping`` (Gemma 2/3): ``tanh(logits / cap) * cap``; Cohere: ``logits * logit_scale``;
    Granite: ``logits / config.logits_scaling``. For these families (and every family that only applies
    its LM head: Llama, Mistral, Qwen, Phi-3, GPT-2, OPT, GPT-NeoX, ...)
    ``lm_head_fn(model)(decoder(ids).last_hidden_state)`` equals ``model(ids).logits`` exactly; for any
    other, :func:`check_lm_head_fn` says whether it does. Raises :class:`RVQError` for a model without an
    output embedding.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise RVQError(f"{type(model).__name__} has no output embedding (lm_head): distillation needs a causal LM")
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)  # Cohere keeps it on the *ForCausalLM
    scale = scale if isinstance(scale, int | float) and not isinstance(scale, bool) else None
    divisor = getattr(text, "logits_scaling", None) if str(getattr(text, "model_type", "")).startswith("granite") \
        else None
    if cap is None and scale is None and divisor is None:
        return head

    def logits(hidden: Tensor) -> Tensor:
        out = head(hidden)
        if scale is not None:
            out = out * scale
        if divisor is not None:
            out = out / divisor
        if cap is not None:  # the same three operations as transformers, for bit-identical logits
            out = out / cap
            out = torch.tanh(out)
            out = out * cap
        return out

    return logits


def check_lm_head_fn(model: nn.Module, ids: Tensor | None, head: Callable[[Tensor], Tensor] | None = None,
                     hidden: Tensor | None = None, logits: Tensor | None = None) -> None:
    """Raise :class:`RVQError` unless ``head`` (default :func:`lm_head_fn` of ``model``) applied to the
    decoder's last hidden state gives the model's logits (to within 1e-4 of their largest magnitude).

    Either ``ids [batch, seq]`` (the model is run whole) or, for a model streamed block by block, the
    ``hidden`` state the head is fed and the ``logits`` the model made from it. Both are ``[batch, seq,
    vocab]``, so keep them short."""
    head = lm_head_fn(model) if head is None else head
    with torch.no_grad():
        if hidden is None:
            ids = ids.to(_input_device(model))
            logits = model(input_ids=ids, use_cache=False).logits
            hidden = _last_hidden(_decoder(model), ids)
        want, got = logits.float(), head(hidden).float()
    if got.shape != want.shape or not float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-6:
        raise RVQError(f"{type(model).__name__}: distillation cannot reproduce this model's logits from its last "
                       "hidden state (an unknown head); quantize it with distill_epochs=0")


def teacher_topk_from_hidden(hidden: Tensor, head: Callable[[Tensor], Tensor], k: int = TEACHER_TOP_K,
                             chunk_tokens: int = DISTILL_CHUNK_TOKENS) -> tuple[Tensor, Tensor]:
    """The top-``k`` next-token log-probabilities of the final hidden states ``hidden [batch, seq, hidden]``.

    ``head`` maps ``[tokens, hidden] -> [tokens, vocab]`` logits; ``hidden`` must be what it expects,
    i.e. for :func:`lm_head_fn` the decoder's ``last_hidden_state`` (after the final norm). Logits exist
    for at most ``chunk_tokens`` tokens at a time; the log-softmax is over the full vocabulary, in float32.
    Returns ``(logp [batch, seq, k] float32, index [batch, seq, k] int64)`` on ``hidden``'s device,
    sorted by decreasing probability.
    """
    _check_chunk(chunk_tokens)
    if hidden.dim() != 3:
        raise RVQError(f"hidden must be [batch, seq, hidden], got shape {tuple(hidden.shape)}")
    batch, seq, width = hidden.shape
    flat = hidden.reshape(-1, width)
    n = flat.shape[0]
    logp = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    idx = torch.empty(n, k, dtype=torch.int64, device=hidden.device)
    with torch.no_grad():
        for a in range(0, n, chunk_tokens):
            b = min(a + chunk_tokens, n)
            logp[a:b], idx[a:b] = torch.log_softmax(head(flat[a:b]).float(), dim=-1).topk(k, dim=-1)
    return logp.reshape(batch, seq, k), idx.reshape(batch, seq, k)


def teacher_topk(model: nn.Module, batches: list[Tensor], k: int = TEACHER_TOP_K,
                 chunk_tokens: int = DISTILL_CHUNK_TOKENS) -> list[tuple[Tensor, Tensor]]:
    """The float model's top-``k`` next-token log-probabilities on each ``[batch, seq]`` token batch:
    ``[(logp [batch, seq, k] float32, index [batch, seq, k] int64)]``, kept on the CPU (a few MB where
    full logits would take GBs). The decoder runs on the model's device, one batch at a time; the head
    (:func:`lm_head_fn`, checked once against ``model(ids).logits`` on a few tokens) on at most
    ``chunk_tokens`` tokens at a time (:func:`teacher_topk_from_hidden`)."""
    _check_chunk(chunk_tokens)
    decoder, head, device = _decoder(model), lm_head_fn(model), _input_device(model)
    if batches:
        check_lm_head_fn(model, batches[0][:1, :16], head)
    out = []
    with torch.no_grad():
        for ids in batches:
            logp, idx = teacher_topk_from_hidden(_last_hidden(decoder, ids.to(device)), head, k, chunk_tokens)
            out.append((logp.cpu(), idx.cpu()))  # stored for the whole run: keep device memory free
    return out


def _token_kl(logits: Tensor, t_logp: Tensor, idx: Tensor) -> Tensor:
    """Per-token KL(teacher || student) over the teacher's top-k words plus one bucket for the rest:
    ``logits [..., vocab]``, ``t_logp``/``idx [..., k]`` → ``[...]`` float32."""
    s_logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, idx)
    t_p = t_logp.exp()
    kl = (t_p * (t_logp - s_logp)).sum(-1)
    t_tail = (1 - t_p.sum(-1)).clamp_min(1e-8)
    s_tail = (1 - s_logp.exp().sum(-1)).clamp_min(1e-8)
    return kl + t_tail * (t_tail.log() - s_tail.log())


def _topk_kl(logits: Tensor, teacher: tuple[Tensor, Tensor]) -> Tensor:
    """Mean per-token KL(teacher || student) over the teacher's top-k words plus one bucket for the rest
    (``logits [batch, seq, vocab]``, teacher ``[batch, seq, k]``); materialises the full logits."""
    return _token_kl(logits, *teacher).mean()


def _chunk_kl_sum(head: Callable[[Tensor], Tensor], hidden: Tensor, t_logp: Tensor, idx: Tensor) -> Tensor:
    """Summed per-token KL of one chunk: ``hidden [n, hidden]``, teacher ``[n, k]`` → scalar float32 (on
    the logits' device, which is the LM head's when a model is split over devices)."""
    logits = head(hidden)
    return _token_kl(logits, t_logp.to(logits.device), idx.to(logits.device)).sum()


def _kl_sum(hidden: Tensor, head: Callable[[Tensor], Tensor], t_logp: Tensor, idx: Tensor,
            chunk_tokens: int) -> Tensor:
    """Per-token KL (:func:`_token_kl`) summed over all tokens of ``hidden [batch, seq, hidden]`` against
    the teacher's ``[batch, seq, k]`` (moved to ``hidden``'s device), with the logits of at most
    ``chunk_tokens`` tokens at once. Under autograd every chunk but the last is checkpointed (recomputed in
    backward); the last one's backward runs first, so keeping its logits costs no more memory than
    recomputing them would, and a step of one chunk runs its LM head once forward, not twice."""
    width, k = hidden.shape[-1], t_logp.shape[-1]
    flat = hidden.reshape(-1, width)
    t_logp = t_logp.reshape(-1, k).to(flat.device)
    idx = idx.reshape(-1, k).to(flat.device)
    grad = torch.is_grad_enabled() and flat.requires_grad
    total = None
    starts = range(0, flat.shape[0], chunk_tokens)
    for a in starts:
        args = (head, flat[a : a + chunk_tokens], t_logp[a : a + chunk_tokens], idx[a : a + chunk_tokens])
        recompute = grad and a != starts[-1]
        part = checkpoint(_chunk_kl_sum, *args, use_reentrant=False) if recompute else _chunk_kl_sum(*args)
        total = part if total is None else total + part
    return total


def _distill_kl(decoder: nn.Module, head: Callable[[Tensor], Tensor], ids: Tensor, t_logp: Tensor, idx: Tensor,
                chunk_tokens: int) -> Tensor:
    """Mean per-token KL of the student on ``ids [batch, seq]`` (on the model's device) against the
    teacher's ``[batch, seq, k]``: what :func:`_topk_kl` gives on the full logits, up to float rounding."""
    return _kl_sum(_last_hidden(decoder, ids), head, t_logp, idx, chunk_tokens) / ids.numel()


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
    chunk_tokens: int = DISTILL_CHUNK_TOKENS,
    placement: Placement | None = None,
    code_fraction: float = 0.0,
    code_every: int = RVQConfig.distill_code_every,
    code_lr: float = RVQConfig.distill_code_lr,
    stats: dict | None = None,
    lr_decay: bool = False,
    lr_tail: float = 0.0,
    autocast: torch.dtype | None = None,
) -> tuple[float, float]:
    """Tune every quantized layer and the blocks' float parameters (norms) of ``model`` at once so its
    next-token distribution matches the float model's (:func:`teacher_topk`) on the calibration batches.
    Embeddings, final norm and LM head stay as they are (and get no gradient).

    ``batches``: ``[batch, seq]`` token ids (any device: moved to the model's); ``teacher``: per batch
    ``(logp, index) [batch, seq, k]``. One Adam step per ``micro_batch`` sequences; the loss is the mean
    per-token top-k KL (:func:`_topk_kl`), computed with the full-vocabulary logits of at most
    ``chunk_tokens`` tokens in memory at once (forward and backward). Returns ``(kl_before, kl_after)``,
    each measured on the first ``EVAL_SEQUENCES`` sequences (per rank; the tuned state is kept only if
    it lowered that KL). With several ranks (``placement``),
    ``batches`` are this rank's, and gradients and the KL are combined across ranks (see :func:`_tune`).
    ``code_fraction`` / ``code_every`` / ``code_lr``: codes that move during the distillation (PV-style,
    see :func:`_tune`; fraction 0 keeps them frozen); ``stats`` gets the code-change figures.
    ``lr_decay``: the epochs after the first decay the learning rates to zero (:func:`_tune`).
    ``lr_tail``: the last that share of all steps decays them to zero, within one epoch too (:func:`_tune`).
    ``autocast``: ``torch.bfloat16`` to train in it (:func:`_tune`; the KL itself is float32).
    """
    _check_chunk(chunk_tokens)
    decoder, head, device = _decoder(model), lm_head_fn(model), _input_device(model)

    def evaluate() -> float:  # on the first EVAL_SEQUENCES sequences: a check, not a second epoch
        kls, left = [], EVAL_SEQUENCES
        with torch.no_grad():
            for ids, (t_logp, idx) in zip(batches, teacher, strict=True):
                if left <= 0:
                    break
                n = min(left, ids.shape[0])
                kls.append(float(_distill_kl(decoder, head, ids[:n].to(device), t_logp[:n], idx[:n], chunk_tokens)))
                left -= n
        total, count = sum(kls), float(len(kls))
        if placement is not None:
            total, count = placement.all_reduce_float(total), placement.all_reduce_float(count)
        return total / max(count, 1.0)

    def losses() -> Iterator[Tensor]:
        for ids, (t_logp, idx) in zip(batches, teacher, strict=True):
            for a in range(0, ids.shape[0], micro_batch):
                sl = slice(a, a + micro_batch)
                yield _distill_kl(decoder, head, ids[sl].to(device), t_logp[sl], idx[sl], chunk_tokens)

    float_params = [p for b in blocks for p in b.parameters() if p.is_floating_point()]
    with _recomputed_in_backward(blocks) if _needs_recompute(blocks) else nullcontext():
        before, after, _ = _tune(model, float_params, evaluate, losses, epochs=epochs, lr=lr,
                                 storage_dtype=storage_dtype, placement=placement, code_fraction=code_fraction,
                                 code_every=code_every, code_lr=code_lr, stats=stats, lr_decay=lr_decay,
                                 lr_tail=lr_tail,
                                 total_steps=epochs * _steps_per_epoch(batches, micro_batch, placement) if lr_tail > 0 else 0,
                                 autocast=autocast)
    return before, after


def _steps_per_epoch(batches: list[Tensor], micro_batch: int, placement: Placement | None) -> int:
    """Adam steps one epoch of :func:`distill_model` takes: the most micro-batches any rank has (the ranks
    step together until the last one runs out)."""
    mine = sum(-(-ids.shape[0] // micro_batch) for ids in batches)
    if placement is None or placement.world <= 1:
        return mine
    counts = torch.zeros(placement.world, dtype=torch.float64, device=placement.device)
    counts[placement.rank] = mine
    return int(placement.all_reduce_sum(counts).max().item())


def distill_rate(code_bpw: float) -> float:
    """The distillation's Adam learning rate for codes of ``code_bpw`` bits per weight (codebooks and scales
    not counted), ``distill_lr: auto``: ``1e-3 * 10 ** (-(code_bpw - 2) / 2)``, about a factor 3 less per
    bit, with ``code_bpw`` held to [1, 8]. The rule runs through the best rates measured on SmolLM2-135M
    (docs/RESULTS.md, session 15): 1e-3 at 2 bits (5e-4 and 3e-4 worse, 2e-3 worse), 1e-4 at 4 (3e-4 and
    3e-5 worse), and 1e-4 and 3e-4 equal within 0.5 % at 3. A finer code leaves a smaller residual error
    for the distillation to correct, and a rate fit for a coarser code then overshoots it."""
    bpw = min(max(float(code_bpw), 1.0), 8.0)
    return 1e-3 * 10.0 ** (-(bpw - 2.0) / 2.0)


def code_bits_per_weight(specs: dict[str, dict]) -> float:
    """Bits per weight the codes carry over quantized layers' specs (:meth:`QuantizedLinear.spec`), weighted
    by each layer's weight count: ``stages * bits / vector_dim`` for a uniform preset, a trellis layer's
    ``trellis_step_bits``. Information, not storage (:func:`rvqllm.size.summarize`'s ``codes_bpw`` counts a
    3-bit code as its uint8)."""
    def per_weight(s: dict) -> float:
        return s["trellis_step_bits"] if TRELLIS_KEY in s else s["stages"] * s["bits"] / s["vector_dim"]

    weights = sum(s["in_features"] * s["out_features"] for s in specs.values())
    bits = sum(s["in_features"] * s["out_features"] * per_weight(s) for s in specs.values())
    return bits / max(weights, 1)


#: beam width of the re-encoding when codes move during tuning (:meth:`_TrainableRVQ.recode`)
RECODE_BEAM = 8
#: sequences the KL before and after distillation is measured on (each measurement costs a forward pass each)
EVAL_SEQUENCES = 4
#: decoded fp32 bytes of all blocks' quantized weights above which distillation recomputes blocks in backward
RECOMPUTE_ABOVE_BYTES = 2 << 30


def _needs_recompute(blocks: list[nn.Module]) -> bool:
    """Recompute blocks in backward (:func:`_recomputed_in_backward`) only when keeping every block's decoded
    weights for backward would cost more than ``RECOMPUTE_ABOVE_BYTES`` (models above ~0.5B parameters):
    below that the extra forward pass (~20 % of a step) buys nothing."""
    from .nn import QuantizedLinear

    decoded = sum(4 * m.out_features * m.in_features for b in blocks for m in b.modules()
                  if isinstance(m, QuantizedLinear))
    return decoded > RECOMPUTE_ABOVE_BYTES


@contextmanager
def _recomputed_in_backward(blocks: list[nn.Module]):
    """While active, each block's forward with gradients on runs under ``torch.utils.checkpoint``: autograd
    keeps only the block's inputs ``[batch, seq, hidden]`` and runs the block again in backward, so a
    distillation step holds one block's decoded weights and activations at a time, not the whole model's
    (an 8B model's decoded fp32 weights alone are 32 GB). Costs one more forward pass per step."""
    for b in blocks:
        def forward(*args, _forward=b.forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        b.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        yield
    finally:
        for b in blocks:
            del b.forward
