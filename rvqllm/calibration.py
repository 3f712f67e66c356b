"""Calibration: what each decoder block and each linear layer sees on real text.

:func:`capture_block_inputs` runs the model up to its first decoder block and keeps that block's
inputs (hidden states plus the keyword arguments the model passes, e.g. rotary position embeddings
and masks). :class:`HessianCollector` hooks the linear layers of one block and accumulates, per layer,
``H = sum_t x_t^T x_t`` over every calibration token in float64, streaming: memory is ``[in, in]`` per
layer whatever the number of samples. Layers fed the very same tensor (q/k/v, gate/up) share one
accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .arch import is_conv1d


class _Stop(Exception):
    pass


@dataclass
class BlockInput:
    """One calibration batch as the first decoder block receives it.

    ``hidden`` is ``[batch, seq, hidden]``; ``kwargs`` are the other arguments of the block's forward.
    """

    hidden: Tensor
    kwargs: dict[str, Any]


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[Tensor]) -> list[BlockInput]:
    """Run ``model`` on each ``[batch, seq]`` int64 token batch until ``first_block`` and record its inputs."""
    captured: list[BlockInput] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append(BlockInput(hidden.detach(), rest))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """Forward every batch through ``block``; the outputs become the next block's inputs."""
    outs = []
    with torch.no_grad():
        for inp in inputs:
            out = block(inp.hidden, **inp.kwargs)
            hidden = out[0] if isinstance(out, tuple | list) else out
            outs.append(BlockInput(hidden.detach(), inp.kwargs))
    return outs


class HessianCollector:
    """Accumulate ``H = sum x^T x`` (float64, ``[in, in]``) for each named linear layer while it runs.

    Use as a context manager around forward passes; read :attr:`hessians` and :attr:`tokens` after.
    Each ``H`` lives on the device of the layer's inputs (a GPU for a model on a GPU) and is accumulated
    there: ``x^T x`` is formed in float32 (or, inside ``torch.autocast``, as autocast multiplies: bfloat16
    inputs with float32 accumulation, as ``calib_dtype: bfloat16`` runs it) and added into the float64 sum
    in place, with no float64 copy of the product and no trip to the host.
    """

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.hessians: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles: list = []
        # (data_ptr, shape) of this pass's inputs -> (layer that owns H, the tensor). Holding the tensor
        # keeps its memory from being reused by a later, different input within the same pass.
        self._seen: dict[tuple, tuple[str, Tensor]] = {}

    def __enter__(self) -> HessianCollector:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def new_pass(self) -> None:
        """Call before each forward pass: inputs are only shared within one pass."""
        self._seen.clear()

    def _make_hook(self, name: str):
        module = self.layers[name]
        in_features = module.weight.shape[0] if is_conv1d(module) else module.in_features

        def hook(_m: nn.Module, args: tuple, _out: Tensor) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            seen = self._seen.get(key)
            if seen is not None and seen[0] != name:
                owner = seen[0]
                self.hessians[name] = self.hessians[owner]  # same input tensor: same H object
                self.tokens[name] = self.tokens[owner]
                return
            self._seen[key] = (name, x)
            flat = x.detach().reshape(-1, in_features).float()
            if name not in self.hessians:
                self.hessians[name] = torch.zeros(in_features, in_features, dtype=torch.float64, device=x.device)
                self.tokens[name] = 0
            self.hessians[name].add_(flat.T @ flat)  # fp32 (bf16 under autocast) product, widened inside the fp64 add
            self.tokens[name] += flat.shape[0]

        return hook
