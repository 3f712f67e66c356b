"""The quantization pipeline: walk the decoder blocks, one at a time.

For each block: run the calibration batches through it with hooks that accumulate each linear
layer's input Hessian, code every linear layer with RVQ, swap it for a :class:`QuantizedLinear`, then
run the block again so that its *quantized* outputs become the next block's inputs (later blocks
learn to live with the earlier blocks' errors).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .arch import check_causal_lm, find_blocks, find_linears, linear_weight, set_module
from .calibration import HessianCollector, capture_block_inputs, run_block
from .config import RVQConfig
from .errors import RVQError
from .nn import QuantizedLinear
from .rvq import quantize_weight


@dataclass
class QuantizeReport:
    """What a quantization run did: per-layer specs and timings."""

    layers: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    calib_tokens: int = 0


def _check_weight(name: str, w: Tensor) -> None:
    if not torch.isfinite(w).all():
        raise RVQError(f"layer {name} has NaN/Inf weights: the input model is corrupt; re-download or re-convert it")


def quantize(
    model: nn.Module,
    config: RVQConfig,
    calibration: Tensor,
    progress: Callable[[str, int, int], None] | None = None,
) -> QuantizeReport:
    """Quantize ``model``'s decoder-block linear layers in place.

    Args:
        model: a Hugging Face causal LM (float weights, on CPU).
        config: the :class:`RVQConfig`.
        calibration: ``[n_sequences, seq_len]`` int64 token ids.
        progress: optional ``callback(layer_name, done, total)``.
    Returns:
        a :class:`QuantizeReport`; the quantization parameters of each layer are also kept on the model
        as ``model.rvq_layers`` (used by :func:`rvqllm.checkpoint.save`).
    """
    check_causal_lm(model)
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise RVQError("calibration must be a non-empty [n_sequences, seq_len] tensor of token ids")
    start = time.perf_counter()
    model.eval()
    prefix, blocks = find_blocks(model)
    all_layers = {
        i: find_linears(block, f"{prefix}.{i}", config.skip) for i, block in enumerate(blocks)
    }
    total = sum(len(v) for v in all_layers.values())
    if total == 0:
        raise RVQError(f"{type(model).__name__}: no linear layers left to quantize (check `skip` in the config)")
    for layers in all_layers.values():
        for name, module in layers.items():
            _check_weight(name, linear_weight(module))

    bs = config.calib_batch_size
    batches = [calibration[i : i + bs] for i in range(0, calibration.shape[0], bs)]
    inputs = capture_block_inputs(model, blocks[0], batches)
    report = QuantizeReport(calib_tokens=int(calibration.numel()))
    specs: dict[str, dict] = dict(getattr(model, "rvq_layers", {}))
    done = 0
    layer_index = 0
    for i, block in enumerate(blocks):
        layers = all_layers[i]
        with HessianCollector(layers) as collector:
            with torch.no_grad():
                for inp in inputs:
                    collector.new_pass()
                    block(inp.hidden, **inp.kwargs)
        for name, module in layers.items():
            t0 = time.perf_counter()
            weight = linear_weight(module).detach()
            q = quantize_weight(
                weight,
                collector.hessians.get(name),
                vector_dim=config.vector_dim,
                stages=config.stages,
                bits=config.bits,
                kmeans_iters=config.kmeans_iters,
                kmeans_points=config.kmeans_points,
                beam=config.beam_width,
                hessian_weighted=config.hessian_weighted,
                error_feedback=config.error_feedback,
                seed=config.seed * 100_003 + layer_index,
            )
            bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
            qlayer = QuantizedLinear.from_rvq(q, config.bits, bias).to(weight.device)
            set_module(model, name, qlayer)
            specs[name] = qlayer.spec()
            report.layers[name] = {**qlayer.spec(), "seconds": round(time.perf_counter() - t0, 3)}
            layer_index += 1
            done += 1
            if progress is not None:
                progress(name, done, total)
        del collector
        inputs = run_block(block, inputs)
    model.rvq_layers = specs
    model.rvq_config = config
    report.seconds = time.perf_counter() - start
    return report
