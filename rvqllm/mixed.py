"""Mixed precision: spend a whole-model bits-per-weight budget where quantization error hurts most.

Sensitivity of a layer is measured on the calibration text with the float model: the diagonal
empirical Fisher of the language-model loss, ``F = sum_sequences (dL_s/dW)^2`` (``L_s``: one sequence's
mean token loss; each sequence's gradient squared on its own, not the batch's mean gradient, whose square
is a noisier and smaller estimate), weighted by the weight itself, ``S = sum_ij F_ij W_ij^2``: to second
order, coding ``W`` with relative error ``rho`` raises the loss by about ``S * rho / 2`` (HAWQ-style; the
Fisher stands in for the loss Hessian's diagonal).
:func:`fisher_sensitivity` measures it on a model in memory; :func:`blockwise_sensitivity` measures the
same quantity with one float decoder block in memory at a time (the pipeline's way, for models of any
size): the batch runs forward block by block (each block's input kept), the loss gradient comes from the
model's own head and loss (:func:`rvqllm.standin.loss_grad`), and the backward then walks the blocks in
reverse, each one loaded again and recomputed from its kept input.

A candidate code shape ``c`` (vector_dim, stages, bits) is expected to leave relative error
``rho(c) = 2 ** (-2 * code_bits_per_weight(c))`` (the Gaussian rate-distortion law; only ratios between
candidates matter). :func:`allocate` starts every layer at the cheapest candidate and repeatedly takes
the upgrade with the largest loss reduction per extra stored bit (codes, codebooks and scales all
counted, as :mod:`rvqllm.size` counts them) while the whole model stays within the budget.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .arch import find_linears, only_weight_grads
from .errors import RVQError
from .finetune import _hidden, _slice
from .size import layer_bits
from .standin import loss_grad


def code_shape_key(c: dict) -> tuple[int, int, int]:
    return (int(c["vector_dim"]), int(c["stages"]), int(c["bits"]))


def fisher_sensitivity(model: nn.Module, layers: dict[str, nn.Module], batches: list[Tensor]) -> dict[str, float]:
    """``{layer name: S}`` from the loss gradients of ``model`` on ``[batch, seq]`` token batches, one
    sequence at a time (see the module docstring).

    Only the named layers' weights get gradients (everything else is frozen for the pass); the
    model's ``requires_grad`` flags are restored afterwards.
    """
    sens = dict.fromkeys(layers, 0.0)
    with only_weight_grads(model, layers.values()), torch.enable_grad():
        for seq in (row[None] for ids in batches for row in ids):
            model.zero_grad(set_to_none=True)
            out = model(input_ids=seq, labels=seq, use_cache=False)
            out.loss.backward()
            for name, m in layers.items():
                sens[name] += _share(m)
        model.zero_grad(set_to_none=True)
    return sens


def _share(m: nn.Module) -> float:
    """One sequence's share of ``S = sum_ij F_ij W_ij^2`` from the gradient now in ``m.weight.grad`` (a
    Conv1D's weight is stored [in, out], like its gradient: the sum is the same)."""
    g = m.weight.grad
    return 0.0 if g is None else float((g.float() * m.weight.detach().float()).pow(2).sum())


def blockwise_sensitivity(model: nn.Module, source, ids: Tensor, hidden: Tensor, kwargs: dict,
                          device: torch.device, skip: list[str], store, micro_batch: int) -> dict[str, float]:
    """``{layer name: S}`` of every quantizable linear layer, as :func:`fisher_sensitivity` measures it on
    the one token batch ``ids [batch, seq]``, but holding one float decoder block at a time.

    Args:
        model: the model (its blocks may be empty skeletons: only ``source`` fills them).
        source: a :mod:`rvqllm.source` source of ``model``'s blocks (``load_block``/``release_block``).
        ids: the token batch, on ``device``.
        hidden, kwargs: block 0's input ``[batch, seq, hidden_size]`` for ``ids`` and its other arguments
            (:func:`rvqllm.calibration.capture_block_inputs`).
        device: where the blocks run.
        skip: layer-name patterns not quantized (config ``skip``).
        store: where each block's input is kept between the two passes (``put(k, t)``/``get(k)``: memory,
            or a run folder's disk store for a model too large for that).
        micro_batch: sequences per step of the top gradient's pass through the head (that many sequences'
            logits exist at once; the result does not depend on it beyond float rounding). The backward through
            the blocks takes one sequence at a time: each sequence's weight gradient is squared on its own.
    """
    n = len(source)
    batch = ids.shape[0]
    as_tuple = False
    with torch.no_grad():
        h = hidden
        for k in range(n):
            store.put(k, h)
            block = source.load_block(k, device)
            out = block(h.to(device), **kwargs)
            as_tuple = isinstance(out, tuple | list)
            h = _hidden(out).detach()
            source.release_block(k)
    _, grad = loss_grad(model, source.blocks, ids, h, micro_batch, as_tuple)
    del h
    sens: dict[str, float] = {}
    for k in reversed(range(n)):
        block = source.load_block(k, device)
        layers = find_linears(block, f"{source.prefix}.{k}", skip)
        x_all = store.get(k).to(device)
        grad_in = torch.empty_like(x_all) if k > 0 else None
        sens.update(dict.fromkeys(layers, 0.0))
        with only_weight_grads(block, layers.values()), torch.enable_grad():
            for a in range(batch):
                block.zero_grad(set_to_none=True)
                x = x_all[a : a + 1].detach().requires_grad_(k > 0)
                out = _hidden(block(x, **{key: _slice(v, a, a + 1, batch) for key, v in kwargs.items()}))
                if out.requires_grad:
                    # the batch loss's gradient at sequence a is its own mean loss's over the batch size
                    out.backward(grad[a : a + 1] * batch)
                if grad_in is not None:
                    grad_in[a : a + 1] = x.grad / batch if x.grad is not None else 0
                for name, m in layers.items():
                    sens[name] += _share(m)
            block.zero_grad(set_to_none=True)
        source.release_block(k)
        grad = grad_in
    return {name: sens[name] for k in range(n) for name in source.layers(k, skip)}


def expected_error(c: dict) -> float:
    """Relative coding error a code shape is expected to leave (see the module docstring)."""
    d, s, b = code_shape_key(c)
    return 2.0 ** (-2.0 * s * b / d)


def layer_cost(out: int, inp: int, c: dict, rotate: bool = False) -> int:
    """Stored bits of an ``[out, inp]`` layer coded with shape ``c`` (codes, codebooks, scales, rotation
    signs: all of it, as :mod:`rvqllm.size` counts it)."""
    spec = {"out_features": out, "in_features": inp, "vector_dim": c["vector_dim"], "stages": c["stages"],
            "bits": c["bits"], **({"hadamard_block": 1} if rotate else {})}
    p = layer_bits(spec)
    return p["codes"] + p["codebooks"] + p["scales"] + p["signs"]


def budget_bpw(config, shapes: dict[str, tuple[int, int]]) -> float:
    """The all-in bpw ``config.bpw_budget`` allows over layers ``shapes`` (``{name: (out, in)}``): the number,
    or for ``"auto"`` what the config's own ``vector_dim``/``stages``/``bits`` would cost on every layer, so
    the mixed model is no larger than the uniform one on any model."""
    if config.bpw_budget != "auto":
        return float(config.bpw_budget)
    own = {"vector_dim": config.vector_dim, "stages": config.stages, "bits": config.bits}
    return sum(layer_cost(o, i, own, config.rotate) for o, i in shapes.values()) / sum(o * i for o, i in shapes.values())


def allocate(
    shapes: dict[str, tuple[int, int]],
    sensitivity: dict[str, float],
    candidates: list[dict],
    budget_bpw: float,
    rotate: bool = False,
) -> dict[str, dict]:
    """Pick a candidate code shape per layer so the total bpw stays within ``budget_bpw``.

    Args:
        shapes: ``{layer: (out_features, in_features)}``.
        sensitivity: ``{layer: S}`` (:func:`fisher_sensitivity`).
        candidates: code shapes, each ``{"vector_dim", "stages", "bits"}``.
        budget_bpw: all-in bits per weight over these layers.
        rotate: the layers will be rotated (their stored signs count against the budget).
    Returns:
        ``{layer: candidate}`` (the dicts of ``candidates``).
    Raises:
        RVQError: when even the cheapest candidate everywhere exceeds the budget.
    """
    if not candidates:
        raise RVQError("mixed precision needs at least one candidate code shape in `mixed_candidates`")

    def bits(name: str, c: dict) -> int:
        return layer_cost(*shapes[name], c, rotate)

    weights = sum(o * i for o, i in shapes.values())
    budget = budget_bpw * weights
    options = {name: sorted(candidates, key=lambda c, n=name: bits(n, c)) for name in shapes}
    choice = {name: 0 for name in shapes}
    used = sum(bits(n, options[n][0]) for n in shapes)
    if used > budget:
        raise RVQError(f"bpw_budget={budget_bpw} is below what the cheapest candidate costs "
                       f"({used / weights:.3f} bpw): raise the budget or add a cheaper candidate")
    while True:
        best, best_gain = None, 0.0
        for name in shapes:
            i = choice[name]
            cur = options[name][i]
            for j in range(i + 1, len(options[name])):
                nxt = options[name][j]
                extra = bits(name, nxt) - bits(name, cur)
                gain = sensitivity[name] * (expected_error(cur) - expected_error(nxt))
                if extra <= 0 or gain <= 0 or used + extra > budget:
                    continue
                if gain / extra > best_gain:
                    best, best_gain = (name, j, extra), gain / extra
        if best is None:
            break
        name, j, extra = best
        choice[name] = j
        used += extra
    return {name: options[name][choice[name]] for name in shapes}
