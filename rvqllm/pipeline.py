"""The quantization pipeline: walk the decoder blocks, one at a time.

Optionally first (``bpw_budget``): measure each layer's loss sensitivity and pick its code shape
(:mod:`rvqllm.mixed`). Then for each block: run the calibration batches through it with hooks that
accumulate each linear layer's input Hessian, code every linear layer with RVQ (:mod:`rvqllm.rvq`:
rotation, weighted k-means, re-fit, error feedback, beam search, as the config says), swap it for a
:class:`QuantizedLinear`, optionally fine-tune the block's continuous parameters towards the float
activations (:mod:`rvqllm.finetune`), then run the block again so that its *quantized* outputs become
the next block's inputs (later blocks learn to live with the earlier blocks' errors). Optionally last
(``distill_epochs``): tune all quantized layers and norms together towards the float model's logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .arch import check_causal_lm, find_blocks, find_linears, linear_weight, set_module
from .calibration import HessianCollector, capture_block_inputs
from .checkpoint import storage_dtype
from .config import RVQConfig
from .errors import RVQError
from .finetune import distill_model, finetune_block, teacher_topk
from .mixed import allocate, fisher_sensitivity
from .nn import QuantizedLinear
from .resume import MemoryActivations, RunDir, run_fingerprint
from .rvq import quantize_weight
from .validate import check_causal_behaviour, check_finite_parameters, check_vector_dim_fits


@dataclass
class QuantizeReport:
    """What a quantization run did: per-layer specs and timings."""

    layers: dict[str, dict] = field(default_factory=dict)
    blocks: dict[int, dict] = field(default_factory=dict)  #: per block: fine-tuning errors and time
    distill: dict = field(default_factory=dict)  #: whole-model distillation: KL before/after, time
    seconds: float = 0.0
    calib_tokens: int = 0


def _check_weight(name: str, w: Tensor) -> None:
    if not torch.isfinite(w).all():
        raise RVQError(f"layer {name} has NaN/Inf weights: the input model is corrupt; re-download or re-convert it")


def _same_kwargs(a: object, b: object) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype \
            and torch.equal(a, b)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(_same_kwargs(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_kwargs(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _capture(model: nn.Module, first_block: nn.Module, batches: list[Tensor], store) -> list[dict]:
    """Block 0's inputs, one batch at a time: hidden states go to ``store`` (unless it is ``None``), the
    other block arguments (positions, masks; equal for same-shaped batches, so shared) are returned."""
    kwargs: list[dict] = []
    for j, ids in enumerate(batches):
        (inp,) = capture_block_inputs(model, first_block, [ids])
        if store is not None:
            store.put(j, inp.hidden)
        same = next((k for k in kwargs if _same_kwargs(k, inp.kwargs)), None)
        kwargs.append(same if same is not None else inp.kwargs)
    return kwargs


def _forward_block(block: nn.Module, inputs, kwargs: list[dict], outputs) -> None:
    """Run every batch of ``inputs`` through ``block``; its outputs go to ``outputs`` (one batch in memory)."""
    with torch.no_grad():
        for j, kw in enumerate(kwargs):
            out = block(inputs.get(j), **kw)
            outputs.put(j, (out[0] if isinstance(out, tuple | list) else out).detach())


def block_params(block: nn.Module, prefix: str) -> dict[str, Tensor]:
    """The float parameters of a block (norm weights...), by their model-level names."""
    return {f"{prefix}.{n}": p.detach() for n, p in block.named_parameters() if p.is_floating_point()}


def _mixed_plan(model: nn.Module, config: RVQConfig, all_layers: dict[int, dict], batches: list[Tensor]
                ) -> dict[str, dict]:
    """Code shape per layer for ``config.bpw_budget`` (:mod:`rvqllm.mixed`), from the loss sensitivity
    measured on the first calibration batch with the float model, before any layer is replaced (a
    resumed run measures it again on the same float model and data, so it gets the same plan)."""
    layers = {n: m for v in all_layers.values() for n, m in v.items()}
    sens = fisher_sensitivity(model, layers, batches[:1])
    shapes = {n: tuple(linear_weight(m).shape) for n, m in layers.items()}
    return allocate(shapes, sens, config.mixed_candidates, float(config.bpw_budget), rotate=config.rotate)


def quantize(
    model: nn.Module,
    config: RVQConfig,
    calibration: Tensor,
    progress: Callable[[str, int, int], None] | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> QuantizeReport:
    """Quantize ``model``'s decoder-block linear layers in place.

    Args:
        model: a Hugging Face causal LM (float weights, on CPU).
        config: the :class:`RVQConfig`.
        calibration: ``[n_sequences, seq_len]`` int64 token ids.
        progress: optional ``callback(layer_name, done, total)``.
        run_dir: optional run folder (:mod:`rvqllm.resume`). With it, progress is committed after every
            decoder block and the calibration activations live on disk (memory holds one batch of them,
            whatever ``calib_sequences``); without it, activations stay in memory.
        resume: continue the run that ``run_dir`` holds (same model, config and calibration, else
            :class:`RVQError`); the result is bit-identical to an uninterrupted run. Without it,
            ``run_dir`` is wiped first.
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
    check_finite_parameters(model)
    widths = {n: linear_weight(m).shape[1] for v in all_layers.values() for n, m in v.items()}
    for c in config.mixed_candidates if config.bpw_budget is not None else [config.to_dict()]:
        check_vector_dim_fits(c["vector_dim"], widths)
    check_causal_behaviour(model)

    bs = config.calib_batch_size
    batches = [calibration[i : i + bs] for i in range(0, calibration.shape[0], bs)]
    run = None
    if run_dir is not None:
        names = [list(all_layers[i]) for i in range(len(blocks))]
        run = RunDir.open(run_dir, run_fingerprint(model, config, calibration, names), resume=resume)
    start_block = run.blocks_done if run is not None else 0
    resumed = run.resumable_inputs(len(batches)) if run is not None else None
    store = resumed if resumed is not None else (run.inputs(0) if run is not None else MemoryActivations())
    kwargs = _capture(model, blocks[0], batches, None if resumed is not None else store)
    # the float model's activations, followed alongside the quantized ones when fine-tuning aims at them
    fp_store = None
    if config.finetune_epochs > 0 and config.finetune_target == "model":
        fp_store = run.resumable_inputs(len(batches), "fp") if resumed is not None else store
    report = QuantizeReport(calib_tokens=int(calibration.numel()))
    plan = _mixed_plan(model, config, all_layers, batches) if config.bpw_budget is not None else {}
    teacher = teacher_topk(model, batches) if config.distill_epochs > 0 else None  # float model, before any change
    specs: dict[str, dict] = dict(getattr(model, "rvq_layers", {}))
    done = 0
    layer_index = 0
    for i in range(start_block):  # blocks an interrupted run already committed
        restored, params = run.restore_block(i, all_layers[i])
        for name, t in params.items():  # float parameters that block fine-tuning changed
            with torch.no_grad():
                model.get_parameter(name).copy_(t)
        for name, qlayer in restored.items():
            set_module(model, name, qlayer)
            specs[name] = qlayer.spec()
            report.layers[name] = {**qlayer.spec(), "seconds": 0.0, "resumed": True}
            layer_index += 1
            done += 1
            if progress is not None:
                progress(name, done, total)
    for i, block in enumerate(blocks):
        if i < start_block:
            continue
        layers = all_layers[i]
        targets = None
        if fp_store is not None:  # the float block on the float model's inputs: also the next fp inputs
            targets = run.inputs(i + 1, "fp") if run is not None else MemoryActivations()
            _forward_block(block, fp_store, kwargs, targets)
        elif config.finetune_epochs > 0:
            targets = MemoryActivations()
        with HessianCollector(layers) as collector:
            with torch.no_grad():
                for j, kw in enumerate(kwargs):
                    collector.new_pass()
                    out = block(store.get(j), **kw)
                    if targets is not None and fp_store is None:  # the float block on these same inputs
                        targets.put(j, (out[0] if isinstance(out, tuple | list) else out).detach())
        for name, module in layers.items():
            t0 = time.perf_counter()
            weight = linear_weight(module).detach()
            shape = plan.get(name, {"vector_dim": config.vector_dim, "stages": config.stages, "bits": config.bits})
            q = quantize_weight(
                weight,
                collector.hessians.get(name),
                vector_dim=shape["vector_dim"],
                stages=shape["stages"],
                bits=shape["bits"],
                kmeans_iters=config.kmeans_iters,
                kmeans_points=config.kmeans_points,
                beam=config.beam_width,
                hessian_weighted=config.hessian_weighted,
                error_feedback=config.error_feedback,
                refits=config.codebook_refits,
                seed=config.seed * 100_003 + layer_index,
                rotate=config.rotate,
            )
            bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
            qlayer = QuantizedLinear.from_rvq(q, shape["bits"], bias).to(weight.device)
            set_module(model, name, qlayer)
            specs[name] = qlayer.spec()
            report.layers[name] = {**qlayer.spec(), "seconds": round(time.perf_counter() - t0, 3)}
            layer_index += 1
            done += 1
            if progress is not None:
                progress(name, done, total)
        del collector
        last = i + 1 == len(blocks)
        outputs = None if last else run.inputs(i + 1) if run is not None else MemoryActivations()
        if targets is not None:  # fine-tuning also writes the next block's inputs (its last evaluation)
            t0 = time.perf_counter()
            before, after = finetune_block(block, store, targets, kwargs, epochs=config.finetune_epochs,
                                           lr=config.finetune_lr, micro_batch=config.finetune_batch,
                                           storage_dtype=storage_dtype(model), outputs=outputs)
            report.blocks[i] = {"error_before": before, "error_after": after,
                                "finetune_seconds": round(time.perf_counter() - t0, 3)}
            fp_store = targets if fp_store is not None else None
            del targets
        elif outputs is not None:
            _forward_block(block, store, kwargs, outputs)
        if outputs is not None:
            store = outputs
        if run is not None:
            run.commit_block(i, {name: model.get_submodule(name) for name in layers},
                             block_params(block, f"{prefix}.{i}") if config.finetune_epochs > 0 else {})
        all_layers[i] = dict.fromkeys(layers)  # let the replaced float layers (and their weights) go
    if teacher is not None:
        t0 = time.perf_counter()
        before, after = distill_model(model, list(blocks), batches, teacher, epochs=config.distill_epochs,
                                      lr=config.distill_lr, micro_batch=config.finetune_batch,
                                      storage_dtype=storage_dtype(model))
        report.distill = {"kl_before": before, "kl_after": after, "seconds": round(time.perf_counter() - t0, 3)}
    model.rvq_layers = specs
    model.rvq_config = config
    report.seconds = time.perf_counter() - start
    return report
