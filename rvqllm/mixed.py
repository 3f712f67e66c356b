"""Mixed precision: spend a whole-model bits-per-weight budget where quantization error hurts most.

Sensitivity of a layer is measured on the calibration text with the float model: the diagonal
empirical Fisher of the language-model loss, ``F = sum_batches (dL/dW)^2``, weighted by the weight
itself, ``S = sum_ij F_ij W_ij^2``: to second order, coding ``W`` with relative error ``rho`` raises the
loss by about ``S * rho / 2`` (HAWQ-style; the Fisher stands in for the loss Hessian's diagonal).

A candidate code shape ``c`` (vector_dim, stages, bits) is expected to leave relative error
``rho(c) = 2 ** (-2 * code_bits_per_weight(c))`` (the Gaussian rate-distortion law; only ratios between
candidates matter). :func:`allocate` starts every layer at the cheapest candidate and repeatedly takes
the upgrade with the largest loss reduction per extra stored bit (codes, codebooks and scales all
counted, as :mod:`rvqllm.size` counts them) while the whole model stays within the budget.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import RVQError
from .size import layer_bits


def code_shape_key(c: dict) -> tuple[int, int, int]:
    return (int(c["vector_dim"]), int(c["stages"]), int(c["bits"]))


def fisher_sensitivity(model: nn.Module, layers: dict[str, nn.Module], batches: list[Tensor]) -> dict[str, float]:
    """``{layer name: S}`` from the loss gradients of ``model`` on ``[batch, seq]`` token batches.

    Only the named layers' weights get gradients (everything else is frozen for the pass); the
    model's ``requires_grad`` flags are restored afterwards.
    """
    from .arch import linear_weight

    weights = {name: linear_weight(m) for name, m in layers.items()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    try:
        for p in params:
            p.requires_grad_(False)
        for m in layers.values():
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            for ids in batches:
                model.zero_grad(set_to_none=True)
                out = model(input_ids=ids, labels=ids, use_cache=False)
                out.loss.backward()
                for name, w in weights.items():
                    g = layers[name].weight.grad
                    if g is not None:
                        g = g.T if g.shape != w.shape else g
                        fisher[name] += g.float().pow(2)
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    return {name: float((fisher[name] * weights[name].detach().float().pow(2)).sum()) for name in weights}


def expected_error(c: dict) -> float:
    """Relative coding error a code shape is expected to leave (see the module docstring)."""
    d, s, b = code_shape_key(c)
    return 2.0 ** (-2.0 * s * b / d)


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
        out, inp = shapes[name]
        spec = {"out_features": out, "in_features": inp, "vector_dim": c["vector_dim"], "stages": c["stages"],
                "bits": c["bits"], **({"hadamard_block": 1} if rotate else {})}
        p = layer_bits(spec)
        return p["codes"] + p["codebooks"] + p["scales"] + p["signs"]

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
