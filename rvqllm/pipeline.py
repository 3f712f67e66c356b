"""The quantization pipeline: a short walk over the decoder blocks, one block at a time.

For each block::

    load block  →  calibrate  →  code layers  →  tune  →  forward  →  write

- **load**: the block's float weights come from a *source* (:mod:`rvqllm.source`: a model in memory, or
  the model's safetensors shards read block by block) onto the working device, in float32.
- **calibrate**: the calibration batches run through the float block with hooks that accumulate each
  linear layer's input Hessian (:mod:`rvqllm.calibration`); with several ranks each rank runs its own
  batches and the Hessians are reduced to the rank that codes the layer. When fine-tuning aims at the
  float model, or distillation needs a teacher, the float block also runs on the float model's own
  activations (the "fp" stream), so the float model is followed block by block and never held whole.
- **code**: each linear layer is coded with RVQ (:mod:`rvqllm.rvq`: rotation, weighted k-means, error
  feedback, beam search, as the config says) by the rank that owns it, broadcast to the others, and
  swapped in as a :class:`QuantizedLinear`.
- **tune** (``finetune_epochs``): the block's codebooks, scales and norms are tuned towards the float
  activations (:mod:`rvqllm.finetune`); it also produces the next block's inputs.
- **forward**: otherwise the quantized block runs once more so that its *quantized* outputs become the
  next block's inputs (later blocks learn to live with the earlier blocks' errors).
- **write**: the block is committed (:mod:`rvqllm.resume`: one safetensors shard per block, the shards
  of the final checkpoint) and given back to the source (a streamed block goes back to the meta device).

Optionally first (``bpw_budget``): each layer's code shape from its measured loss sensitivity
(:mod:`rvqllm.mixed`: one float block in memory at a time, like the walk). Optionally last
(``distill_epochs``): all quantized layers and norms tuned together towards the float model's next-token
distribution; the teacher's top-k log-probabilities come from the fp stream after the last block (chunked
over tokens, kept on disk in a run folder).

Where the work runs (device, rank) is one :class:`~rvqllm.placement.Placement`; where weights come from
is one source; where finished blocks and activations go is one run folder (or memory): the loop below has
no branches for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .arch import find_linears, is_linear, linear_weight, set_module
from .calibration import HessianCollector, capture_block_inputs
from .checkpoint import storage_dtype
from .config import RVQConfig
from .errors import ResumableError, RVQError
from .finetune import (
    TEACHER_TOP_K,
    check_lm_head_fn,
    code_bits_per_weight,
    distill_model,
    distill_rate,
    finetune_block,
    lm_head_fn,
    native_bf16,
    teacher_topk_from_hidden,
)
from .kernels.cpu_build import warn_once
from .meter import Meter, trim_host_memory
from .mixed import allocate, blockwise_sensitivity, budget_bpw
from .nn import (
    QuantizedLinear,
    SharedCodebooks,
    TrellisLinear,
    attach_shared,
    decoded_linears,
    mark_quantized,
)
from .placement import Placement, oom_errors
from .resume import MemoryActivations, RunDir, run_fingerprint
from .rvq import quantize_weight, trellis
from .rvq.residual import to_fp16_exact
from .rvq.trellis_layer import quantize_weight_trellis
from .source import MemorySource, ShardSource
from .standin import final_normed_hidden
from .validate import (
    check_causal_behaviour,
    check_causal_first_block,
    check_finite_parameters,
    check_vector_dim_fits,
)


@dataclass
class QuantizeReport:
    """What a quantization run did: per-layer specs and timings, per-block accounting."""

    layers: dict[str, dict] = field(default_factory=dict)
    #: per block: {"seconds": {stage: s}, "total_seconds", "peak_rss_mib", "peak_device_mib"} and, with
    #: fine-tuning, "error_before", "error_after", "finetune_seconds", "finetune_attempts" (1 + retries used),
    #: "finetune_lr" (the last attempt's rate) and "finetune_kept" (False: every attempt was undone)
    blocks: dict[int, dict] = field(default_factory=dict)
    distill: dict = field(default_factory=dict)  #: whole-model distillation: KL before/after, time, memory
    #: mixed precision (``bpw_budget``): {"seconds": the sensitivity pass (0 when a resumed run read its plan),
    #: "shapes": {"d6 s2 b8": layers given that code shape, ...}}
    mixed: dict = field(default_factory=dict)
    seconds: float = 0.0
    calib_tokens: int = 0


ProgressFn = Callable[[str, int, int], None]
BlockFn = Callable[[int, int, dict], None]


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


def _hidden(out: object) -> Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _capture(model: nn.Module, first_block: nn.Module, batches: dict[int, Tensor], stores: list) -> dict[int, dict]:
    """Block 0's inputs for each batch: hidden states go to every store in ``stores``; the other block
    arguments (positions, masks; equal for same-shaped batches, so shared) are returned by batch index."""
    kwargs: dict[int, dict] = {}
    for j, ids in batches.items():
        (inp,) = capture_block_inputs(model, first_block, [ids])
        for store in stores:
            store.put(j, inp.hidden)
        same = next((k for k in kwargs.values() if _same_kwargs(k, inp.kwargs)), None)
        kwargs[j] = same if same is not None else inp.kwargs
    return kwargs


def _forward(block: nn.Module, inputs, kwargs: dict[int, dict], outputs, device: torch.device) -> bool:
    """Run every batch of ``inputs`` through ``block`` on ``device``; its outputs go to ``outputs`` (one
    batch in memory; a disk store hands batches back on the host). Returns whether the block returns a
    tuple (hidden state first) rather than the hidden state itself."""
    as_tuple = False
    with torch.no_grad():
        for j, kw in kwargs.items():
            out = block(inputs.get(j).to(device), **kw)
            as_tuple = isinstance(out, tuple | list)
            outputs.put(j, _hidden(out).detach())
    return as_tuple


class _TeacherStore:
    """The teacher's top-k log-probabilities per batch: in memory, or on disk in a run folder."""

    def __init__(self, store) -> None:
        self.store = store  # put(j, Tensor) / get(j) -> Tensor

    def put(self, j: int, teacher: tuple[Tensor, Tensor]) -> None:
        logp, idx = teacher
        self.store.put(j, torch.cat([logp.float(), idx.float()], dim=-1))  # idx < 2**24: exact in float32

    def get(self, j: int) -> tuple[Tensor, Tensor]:
        t = self.store.get(j)
        k = t.shape[-1] // 2
        return t[..., :k], t[..., k:].long()


def _hessian_groups(layers: dict[str, nn.Module], hessians: dict[str, Tensor]) -> list[list[str]]:
    """Layers that share one Hessian object (fed the same input), in layer order."""
    groups: dict[int, list[str]] = {}
    for name in layers:
        groups.setdefault(id(hessians.get(name)), []).append(name)
    return list(groups.values())


def quantize(
    model: nn.Module,
    config: RVQConfig,
    calibration: Tensor,
    progress: ProgressFn | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
) -> QuantizeReport:
    """Quantize ``model``'s decoder-block linear layers in place.

    Args:
        model: a Hugging Face causal LM in memory (float weights).
        config: the :class:`RVQConfig`.
        calibration: ``[n_sequences, seq_len]`` int64 token ids.
        progress: optional ``callback(layer_name, done, total)``.
        run_dir: optional run folder (:mod:`rvqllm.resume`). With it, progress is committed after every
            decoder block and the calibration activations live on disk (memory holds one batch of them,
            whatever ``calib_sequences``); without it, activations stay in memory.
        resume: continue the run that ``run_dir`` holds (same model, config and calibration, else
            :class:`RVQError`); the result is bit-identical to an uninterrupted run. Without it,
            ``run_dir`` is wiped first.
        device: where the work runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``; default: where the model is).
            Blocks visit the device one at a time and the model ends where it started.
    Returns:
        a :class:`QuantizeReport`; the quantization parameters of each layer are also kept on the model
        as ``model.rvq_layers`` (used by :func:`rvqllm.checkpoint.save`).
    """
    source = MemorySource(model)
    where = torch.device(device) if device is not None else source.home
    return run(source, config, calibration, Placement(where), progress=progress, run_dir=run_dir, resume=resume)


def run(
    source: MemorySource | ShardSource,
    config: RVQConfig,
    calibration: Tensor,
    placement: Placement,
    *,
    progress: ProgressFn | None = None,
    on_block: BlockFn | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    reset_host_peak: bool = False,
) -> QuantizeReport:
    """Walk ``source``'s blocks (see the module doc). ``on_block(i, n_blocks, accounting)`` is called as
    each block finishes. With a :class:`ShardSource` a ``run_dir`` is required: it receives the shards.
    ``reset_host_peak``: reset the process's peak-RSS mark at each block so each reports its own (a change
    to the whole process: for the process's owner, the CLI; :mod:`rvqllm.meter`)."""
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise RVQError("calibration must be a non-empty [n_sequences, seq_len] tensor of token ids")
    _check_token_ids(source.model, calibration)
    if source.streaming and run_dir is None:
        raise RVQError("a streamed model needs a run folder for its finished blocks (run_dir)")
    start = time.perf_counter()
    walk = _Walk(source, config, calibration, placement, progress, on_block, reset_host_peak)
    walk.prepare(run_dir, resume)
    for i in range(len(source)):
        walk.block(i)
    walk.finish()
    walk.report.seconds = time.perf_counter() - start
    return walk.report


def _check_token_ids(model: nn.Module, calibration: Tensor) -> None:
    """Every calibration token id has a row in the model's input embedding (a tokenizer that is not the
    model's yields ids past its vocabulary: an index error deep in the first forward otherwise)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is None or weight.dim() != 2:
        return
    rows = weight.shape[0]
    low, high = int(calibration.min()), int(calibration.max())
    if low < 0 or high >= rows:
        raise RVQError(f"the calibration tokens reach id {high if high >= rows else low}, but the model's embedding "
                       f"has {rows} rows (ids 0..{rows - 1}): the tokenizer is not this model's; give the model's "
                       "own tokenizer (--tokenizer)")


class _Walk:
    """The state of one walk over the blocks: streams of activations, the run folder, the report."""

    def __init__(self, source, config: RVQConfig, calibration: Tensor, placement: Placement,
                 progress: ProgressFn | None, on_block: BlockFn | None, reset_host_peak: bool = False) -> None:
        self.source, self.config, self.place = source, config, placement
        self.reset_host_peak = reset_host_peak
        self.calibration = calibration
        self.progress, self.on_block = progress, on_block
        self.model = source.model
        self.device = placement.device
        self.report = QuantizeReport(calib_tokens=int(calibration.numel()))
        bs = config.calib_batch_size
        self.all_batches = [calibration[i : i + bs] for i in range(0, calibration.shape[0], bs)]
        if len(self.all_batches) < placement.world:
            raise RVQError(f"{len(self.all_batches)} calibration batches cannot be shared by {placement.world} ranks: "
                           "lower calib_batch_size (--calib-batch-size), add calibration sequences or use fewer ranks")
        self.batches = {j: self.all_batches[j].to(self.device) for j in placement.my_batches(len(self.all_batches))}
        self.shapes = [source.layers(i, config.skip) for i in range(len(source))]  # {name: (out, in)} per block
        self.names = [list(v) for v in self.shapes]
        self.total = sum(len(v) for v in self.names)
        if self.total == 0:
            raise RVQError(f"{type(self.model).__name__}: no linear layers left to quantize (check `skip` in the config)")
        self.offsets = [sum(len(v) for v in self.names[:i]) for i in range(len(source))]  # layer index of each block's first
        self.done = 0
        self.teacher: _TeacherStore | None = None
        self.fp = None  # the float model's activations (fine-tuning towards them, or distillation's teacher)
        self.plan: dict[str, dict] = {}
        self.specs: dict[str, dict] = dict(getattr(self.model, "rvq_layers", {}))
        self.shared: SharedCodebooks | None = None
        self.shared_float: Tensor | None = None  # its float32 copy, what every layer is coded against

    # -- before the first block ------------------------------------------------------------------
    def prepare(self, run_dir, resume: bool) -> None:
        cfg, source = self.config, self.source
        widths = {n: s[1] for shapes in self.shapes for n, s in shapes.items()}
        # bpw_budget: a candidate vector_dim need not divide any width (d 6 and 9 on 4096-wide layers): a layer
        # it does not divide is zero-padded, and the allocator counts the padded codes against the budget
        if cfg.bpw_budget is None and cfg.coder == "rvq":  # each vector_dim against the widths of the layers that take it
            by_dim: dict[int, dict[str, int]] = {}
            for n, w in widths.items():
                by_dim.setdefault(cfg.shape_for(n)["vector_dim"], {})[n] = w
            for d, ws in by_dim.items():
                check_vector_dim_fits(d, ws)
            unused = [k for k in cfg.layer_shapes if not any(k in n for n in widths)]
            if unused and self.place.is_main:
                warn_once(f"layer-shapes-{unused}", f"layer_shapes: no layer of this model has {', '.join(map(repr, unused))} "
                          f"in its name (e.g. {next(iter(widths))}), so those rules change nothing here: the layers "
                          "they were meant for keep the config's code shape")
        if not source.streaming:  # an in-memory model: check all of it up front (cheap at that size)
            for i in range(len(source)):
                for name, module in find_linears(source.blocks[i], f"{source.prefix}.{i}", cfg.skip).items():
                    _check_weight(name, linear_weight(module))
            check_finite_parameters(self.model)
            check_causal_behaviour(self.model)
        self.model.eval()
        shared = None
        if cfg.shared_codebook is not None:  # every layer codes against it; the model keeps it (stored once)
            from .rvq.universal import load_shared_codebook

            shared = load_shared_codebook(cfg.shared_codebook, cfg.stages, cfg.bits, cfg.vector_dim)
        self.run = None
        if run_dir is not None:
            fingerprint = run_fingerprint(source.fingerprint(), cfg, self.calibration, self.names, shared)
            if self.place.is_main:
                self.run = RunDir.open(run_dir, fingerprint, resume=resume)
            self.place.barrier()
            if not self.place.is_main:  # the other ranks join the folder rank 0 prepared, as it is
                self.run = RunDir.open(run_dir, fingerprint, resume=True, clean=False)
        source.load_rest(self.device)
        if shared is not None:
            tuned = self.run.shared_codebook() if self.run is not None else None  # a resumed, distilled run's
            self.shared = attach_shared(self.model, (tuned if tuned is not None else shared).to(self.device))
            self.shared_float = self.shared.codebooks.float()
        self.start_block = self.run.blocks_done if self.run is not None else 0
        if source.streaming and self.start_block == 0:  # streamed: the embeddings and the first block tell
            check_causal_first_block(self.model, source.load_block(0, self.device), self.device)
            source.release_block(0)
        follow_fp = cfg.distill_epochs > 0 or (cfg.finetune_epochs > 0 and cfg.finetune_target == "model")
        n_all = len(self.all_batches)
        resumed = self.run.resumable_inputs(n_all, mine=list(self.batches)) if self.run is not None else None
        self.store = resumed if resumed is not None else (self.run.inputs(0) if self.run else MemoryActivations())
        if follow_fp:
            self.fp = (self.run.resumable_inputs(n_all, "fp", mine=self._fp_batches()) if resumed is not None
                       else self.run.inputs(0, "fp") if self.run else MemoryActivations())
        stores = [] if resumed is not None else [self.store] + ([self.fp] if self.fp is not None else [])
        self.kwargs = _capture(self.model, source.blocks[0], self.batches, stores)
        if cfg.distill_epochs > 0:
            self.teacher = _TeacherStore(self.run.inputs(len(source), "teacher") if self.run else MemoryActivations())
        if cfg.bpw_budget is not None:
            self.plan = self._mixed_plan()

    def _mixed_plan(self) -> dict[str, dict]:
        """Code shape per layer for ``config.bpw_budget`` (:mod:`rvqllm.mixed`), from each layer's loss
        sensitivity measured on the first ``sensitivity_sequences`` calibration sequences (all when there are
        fewer) with the float model, one calibration batch at a time, block by block, before any layer is
        replaced. Rank 0 measures and every rank gets its plan; a run folder keeps it, so a
        resumed run reads it instead of measuring again."""
        t0 = time.perf_counter()
        plan = None
        if self.place.is_main:  # the others only receive, so no rank can race rank 0 to the saved plan
            plan = self.run.plan() if self.run is not None else None
            if plan is None:
                plan = self._measure_plan()
        plan = self.place.broadcast_object(plan, src=0)
        counts: dict[str, int] = {}
        for c in plan.values():
            key = f"d{c['vector_dim']} s{c['stages']} b{c['bits']}"
            counts[key] = counts.get(key, 0) + 1
        self.report.mixed = {"seconds": round(time.perf_counter() - t0, 3), "shapes": dict(sorted(counts.items()))}
        return plan

    def _measure_plan(self) -> dict[str, dict]:
        """The plan measured (rank 0's work; see :meth:`_mixed_plan`), kept in the run folder if any."""
        cfg, source = self.config, self.source
        sens: dict[str, float] = {}
        left = cfg.sensitivity_sequences
        for batch in self.all_batches:  # one batch's block inputs kept at a time; per-sequence sums add up
            if left <= 0:
                break
            ids = batch[:left].to(self.device)
            left -= ids.shape[0]
            (inp,) = capture_block_inputs(self.model, source.blocks[0], [ids])
            store = self.run.scratch("sens") if self.run is not None else MemoryActivations()
            try:
                part = blockwise_sensitivity(self.model, source, ids, inp.hidden, inp.kwargs, self.device, cfg.skip,
                                             store, cfg.finetune_batch)
            finally:
                if self.run is not None:
                    self.run.drop(store)
            sens = {n: sens.get(n, 0.0) + v for n, v in part.items()}
        shapes = {n: s for block in self.shapes for n, s in block.items()}
        plan = allocate(shapes, sens, cfg.mixed_candidates, budget_bpw(cfg, shapes), rotate=cfg.rotate)
        if self.run is not None:
            self.run.save_plan(plan)
        return plan

    # -- one block ---------------------------------------------------------------------------------
    def block(self, i: int) -> None:
        if i < self.start_block:
            self._restore(i)
            return
        meter = Meter(self.device, self.reset_host_peak)
        try:
            self._block(i, meter)
        except oom_errors() as err:
            raise ResumableError(
                f"out of memory on {self.device} in block {i} ({meter.current}): lower calib_batch_size "
                f"(now {self.config.calib_batch_size}; --calib-batch-size) or finetune_batch / distill_chunk_tokens "
                "in the config; the finished blocks are kept: rerun with --resume") from err
        trim_host_memory()
        acc = meter.result()
        self.report.blocks[i] = {**self.report.blocks.get(i, {}), **acc}
        if self.on_block is not None:
            self.on_block(i, len(self.source), self.report.blocks[i])

    def _block(self, i: int, meter: Meter) -> None:
        cfg, source, place = self.config, self.source, self.place
        prefix = f"{source.prefix}.{i}"
        last = i + 1 == len(source)
        with meter.stage("load"):
            block = source.load_block(i, self.device)
            layers = find_linears(block, prefix, cfg.skip)
            if source.streaming:
                for name, module in layers.items():
                    _check_weight(name, linear_weight(module))
        calib = self._calib_dtype(block)  # decided on the float block

        def calib_context():
            return nullcontext() if calib is None else torch.autocast(self.device.type, dtype=calib)

        with meter.stage("calibrate"):
            fp_next = None
            if self.fp is not None:  # the float block on the float model's inputs: the next fp inputs
                fp_next = MemoryActivations() if last or self.run is None else self.run.inputs(i + 1, "fp")
                fp_kwargs = {j: self.kwargs[j] for j in self._fp_batches()}
                with calib_context():
                    as_tuple = _forward(block, self.fp, fp_kwargs, fp_next, self.device)
                if last and self.teacher is not None:
                    self._teacher(fp_next, calib_context, bool(as_tuple))
            targets, tuned = None, set(self._finetuned_batches())
            if cfg.finetune_epochs > 0:
                targets = fp_next if cfg.finetune_target == "model" else MemoryActivations()
            with HessianCollector(layers) as collector, torch.no_grad(), calib_context():
                for j, kw in self.kwargs.items():
                    collector.new_pass()
                    out = block(self.store.get(j).to(self.device), **kw)
                    if targets is not None and cfg.finetune_target == "block" and j in tuned:  # the float block
                        targets.put(j, _hidden(out).detach())
            hessians = collector.hessians
            groups = _hessian_groups(layers, hessians)
            sizes = {n: linear_weight(m).numel() for n, m in layers.items()}
            owners = place.assign(groups, sizes)
            place.reduce_hessians(hessians, collector.tokens, owners)
        with meter.stage("code"):  # each rank codes the layers it owns, then every layer goes to every rank
            coded: dict[str, tuple[QuantizedLinear, float]] = {}
            if cfg.coder == "trellis":
                coded = self._code_trellis(i, [(k, n, m) for k, (n, m) in enumerate(layers.items())
                                               if owners[n] == place.rank], hessians)
            for k, (name, module) in enumerate(layers.items()):
                if owners[name] != place.rank or name in coded:
                    continue
                t0 = time.perf_counter()
                bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
                shape = self.plan.get(name) or cfg.shape_for(name)
                q = quantize_weight(
                    linear_weight(module).detach(), hessians.get(name), vector_dim=shape["vector_dim"],
                    stages=shape["stages"], bits=shape["bits"], kmeans_iters=cfg.kmeans_iters,
                    kmeans_points=cfg.kmeans_points, beam=cfg.beam_width, hessian_weighted=cfg.hessian_weighted,
                    error_feedback=cfg.error_feedback, refits=cfg.codebook_refits,
                    seed=cfg.seed * 100_003 + self.offsets[i] + k, rotate=cfg.rotate, damp=cfg.hessian_damp,
                    codebooks=self.shared_float,
                )
                qlayer = QuantizedLinear.from_rvq(q, shape["bits"], bias, linear_weight(module).dtype).to(self.device)
                if self.shared is not None:
                    qlayer.share(self.shared)
                coded[name] = (qlayer, time.perf_counter() - t0)
            for name in layers:
                mine, seconds = coded.get(name, (None, 0.0))
                qlayer = place.broadcast_layer(mine, None if mine is None else mine.spec(), owners[name])
                if qlayer.shared and qlayer.shared_owner is None:  # another rank's layer: the same codebook here
                    qlayer.share(self.shared)
                set_module(self.model, name, qlayer)
                self.specs[name] = qlayer.spec()
                self.report.layers[name] = {**qlayer.spec(), "seconds": round(seconds, 3), "rank": owners[name]}
                self._tick(name)
            del collector, hessians
        outputs = None if last else self.run.inputs(i + 1) if self.run is not None else MemoryActivations()
        if targets is not None:
            with meter.stage("tune"):  # fine-tuning also writes the next block's inputs (its last evaluation)
                t0 = time.perf_counter()
                tune_stats: dict = {}
                before, after = finetune_block(block, self.store, targets, self.kwargs, epochs=cfg.finetune_epochs,
                                               lr=cfg.finetune_lr, micro_batch=cfg.finetune_batch,
                                               storage_dtype=self._storage_dtype(), outputs=outputs,
                                               placement=place, tuned_batches=sorted(tuned),
                                               autocast=self._autocast(), retries=cfg.finetune_retries,
                                               stats=tune_stats)
                self.report.blocks[i] = {"error_before": before, "error_after": after,
                                         "finetune_seconds": round(time.perf_counter() - t0, 3),
                                         "finetune_attempts": tune_stats["attempts"],
                                         "finetune_lr": tune_stats["lr"], "finetune_kept": tune_stats["tuned"]}
        elif outputs is not None:
            with meter.stage("forward"), decoded_linears(block), calib_context():
                _forward(block, self.store, self.kwargs, outputs, self.device)
        if outputs is not None:
            self.store = outputs
        if fp_next is not None:
            self.fp = fp_next
        with meter.stage("write"):
            if self.run is not None:  # every rank is done with this block's inputs and has written the next's
                place.barrier()
                self.run.commit_block(i, self.model, self._storage_dtype(), write=place.is_main)
            source.release_block(i)

    def _code_trellis(self, i: int, mine: list[tuple[int, str, nn.Module]], hessians: dict[str, Tensor]
                      ) -> dict[str, tuple[TrellisLinear, float]]:
        """Block ``i``'s layers ``mine`` (``(index in block, name, module)``) coded by the trellis: ``{name:
        (layer, seconds)}``. One walk's Viterbi is a chain of steps that runs on one core, so the layers are
        coded side by side, one per thread, as many at once as torch has threads (each layer's result does
        not depend on the others: the same bytes as one at a time; the Hessians are only read)."""
        cfg = self.config
        table = to_fp16_exact(trellis.trained_lut(cfg.trellis_state_bits, cfg.trellis_step_bits, cfg.trellis_lut_bits,
                                                  cfg.trellis_table_iters))  # once, before the threads

        def code(item: tuple[int, str, nn.Module]) -> tuple[str, tuple[TrellisLinear, float]]:
            k, name, module = item
            t0 = time.perf_counter()
            bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
            layer = self._trellis_layer(module, hessians.get(name), bias, cfg.seed * 100_003 + self.offsets[i] + k,
                                        table)
            return name, (layer, time.perf_counter() - t0)

        workers = min(torch.get_num_threads(), len(mine))
        if workers <= 1:
            return dict(map(code, mine))
        with ThreadPoolExecutor(workers, thread_name_prefix="rvqllm-trellis") as pool:
            return dict(pool.map(code, mine))

    def _trellis_layer(self, module: nn.Module, hessian: Tensor | None, bias: Tensor | None,
                       seed: int, table: Tensor) -> TrellisLinear:
        """``module`` coded by the trellis (config ``coder: trellis``) against its input Hessian (the identity
        for a layer no calibration token reached), as a :class:`TrellisLinear` on the run's device; ``table``
        ``[2**Q]`` the starting codeword table (fp16-exact float32; tuning may move it later)."""
        cfg = self.config
        w = linear_weight(module).detach()
        if hessian is None:
            hessian = torch.eye(w.shape[1], device=w.device)
        table = table.to(w.device)
        values = trellis.packed_values(table, cfg.trellis_state_bits, cfg.trellis_step_bits, cfg.trellis_lut_bits)
        q = quantize_weight_trellis(w, hessian, state_bits=cfg.trellis_state_bits, step_bits=cfg.trellis_step_bits,
                                    seed=seed, damp=cfg.hessian_damp, pad_to=1, values=values)
        return TrellisLinear.from_trellis(q, table, cfg.trellis_lut_bits, bias, w.dtype).to(self.device)

    def _restore(self, i: int) -> None:
        """A block an interrupted run already committed: into the model (in memory), or nothing (streamed)."""
        if not self.source.streaming:
            restored, params = self.run.restore_block(i)
            for name, t in params.items():
                with torch.no_grad():
                    self.model.get_parameter(name).copy_(t)
            for name, qlayer in restored.items():
                old = self.model.get_submodule(name)
                if is_linear(old):  # the float layer it replaces computes in the model's dtype
                    qlayer.compute_dtype = linear_weight(old).dtype
                if qlayer.shared:
                    qlayer.share(self.shared)
                set_module(self.model, name, qlayer)
        for name in self.names[i]:
            spec = self.run.layer_spec(i, name)
            self.specs[name] = spec
            self.report.layers[name] = {**spec, "seconds": 0.0, "resumed": True}
            self._tick(name)

    def _tick(self, name: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(name, self.done, self.total)

    def _teacher(self, final: object, context: Callable[[], AbstractContextManager], as_tuple: bool) -> None:
        """Top-k next-token log-probabilities of the float model from its last block's outputs, computed
        under ``context()`` (the calibration's autocast); the check that the head is the model's runs as the
        model computes. ``as_tuple``: the blocks return tuples (:class:`rvqllm.standin._Injector`)."""
        blocks = self.source.blocks
        head = lm_head_fn(self.model)
        chosen = self._distilled_batches()
        if chosen:  # the head must give what the model gives, on a few tokens
            j = chosen[0]
            normed, logits = final_normed_hidden(self.model, blocks, self.batches[j][:1, :16],
                                                 final.get(j)[:1, :16].to(self.device), True, as_tuple)
            check_lm_head_fn(self.model, None, head, normed, logits)
        for j in chosen:
            with context():
                normed = final_normed_hidden(self.model, blocks, self.batches[j], final.get(j).to(self.device),
                                             as_tuple=as_tuple)
                top = teacher_topk_from_hidden(normed, head, TEACHER_TOP_K, self.config.distill_chunk_tokens)
            self.teacher.put(j, top)

    def _distilled_batches(self) -> list[int]:
        """Indices of this rank's batches the distillation uses: those holding the first
        ``distill_sequences`` calibration sequences (all when 0 or at least all there are). The
        calibration interleaves its texts sequence by sequence, so a prefix keeps their mix."""
        return self._prefix_batches(self.config.distill_sequences)

    def _finetuned_batches(self) -> list[int]:
        """Indices of this rank's batches the block fine-tuning uses: those holding the first
        ``finetune_sequences`` calibration sequences (whole batches; all when 0 or at least all there are)."""
        return self._prefix_batches(self.config.finetune_sequences)

    def _prefix_batches(self, n: int) -> list[int]:
        bs = self.config.calib_batch_size
        if n <= 0 or n >= self.calibration.shape[0]:
            return list(self.batches)
        return [j for j in self.batches if j * bs < n]

    def _fp_batches(self) -> list[int]:
        """This rank's batches the float model is followed on, block by block: those block fine-tuning
        aims at when it aims at its activations, and those whose teacher the distillation needs."""
        cfg = self.config
        chosen = set(self._distilled_batches()) if cfg.distill_epochs > 0 else set()
        if cfg.finetune_epochs > 0 and cfg.finetune_target == "model":
            chosen |= set(self._finetuned_batches())
        return [j for j in self.batches if j in chosen]

    def _distilled_rows(self, j: int) -> int:
        """How many sequences of batch ``j`` (one of :meth:`_distilled_batches`) the distillation uses."""
        n, bs = self.config.distill_sequences, self.config.calib_batch_size
        rows = self.batches[j].shape[0]
        return rows if n <= 0 else min(rows, n - j * bs)

    def _autocast(self) -> torch.dtype | None:
        """The dtype tuning multiplies in (None: float32): ``tune_dtype``, "auto" being bfloat16 where the
        device has it natively and float32 elsewhere (said once)."""
        return self._compute_dtype("tune_dtype", "tuning", "session 9")

    def _calib_dtype(self, block: nn.Module) -> torch.dtype | None:
        """The dtype the calibration's passes through the float ``block`` and its coded self multiply in
        (None: as the block computes): ``calib_dtype``. "auto" leaves a block that already computes in 16
        bits as it is (bfloat16 would only lose float16's precision)."""
        if self.config.calib_dtype == "auto" and not any(p.dtype == torch.float32 for p in block.parameters()):
            return None
        dtype = self._compute_dtype("calib_dtype", "calibration", "session 25")
        if dtype is not None and not native_bf16(self.device):
            warn_once(f"calib-emulated-{self.device.type}", f"calib_dtype bfloat16: this {self.device.type.upper()} "
                      "has no native bfloat16 arithmetic, so the calibration passes are emulated and slower than in "
                      "float32; set calib_dtype: auto or float32 in the config")
        return dtype

    def _compute_dtype(self, field_name: str, what: str, where: str) -> torch.dtype | None:
        """The dtype config field ``field_name`` asks for (None: float32), "auto" resolved on this device."""
        want = getattr(self.config, field_name)
        if want == "auto" and not native_bf16(self.device):
            warn_once(f"auto-float32-{field_name}-{self.device.type}",
                      f"{field_name} auto: this {self.device.type.upper()} has no native bfloat16 arithmetic, so "
                      f"{what} multiplies in float32 (slower than where it has, the same quality within noise: "
                      f"docs/RESULTS.md, {where})")
            return None
        return None if want == "float32" else torch.bfloat16

    def _storage_dtype(self) -> torch.dtype | None:
        return storage_dtype(self.model)

    # -- after the last block ---------------------------------------------------------------------
    def finish(self) -> None:
        cfg = self.config
        if self.teacher is not None and not (self.run is not None and self.run.distilled):
            meter = Meter(self.device, self.reset_host_peak)
            if self.source.streaming:  # the shards are rank 0's to write: wait until it has written the last
                self.place.barrier()
            for i in range(len(self.source)):  # every block back on the device, compressed
                if self.source.streaming:
                    self.source.load_empty_block(i, skip=cfg.skip)
                    self.run.load_committed_block(i, self.model, self.device)
                else:
                    self.source.load_block(i, self.device)
            batches, teacher = [], []
            for j in self._distilled_batches():  # the last one may hold sequences past distill_sequences: cut
                rows = self._distilled_rows(j)
                batches.append(self.batches[j][:rows])
                teacher.append(tuple(t[:rows] for t in self.teacher.get(j)))
            t0 = time.perf_counter()
            codes: dict = {}
            lr = distill_rate(code_bits_per_weight(self.specs)) if cfg.distill_lr == "auto" else cfg.distill_lr
            before, after = distill_model(self.model, list(self.source.blocks), batches, teacher,
                                          epochs=cfg.distill_epochs, lr=lr, micro_batch=cfg.finetune_batch,
                                          storage_dtype=self._storage_dtype(), chunk_tokens=cfg.distill_chunk_tokens,
                                          placement=self.place, code_fraction=cfg.distill_code_fraction,
                                          code_every=cfg.distill_code_every, code_lr=cfg.distill_code_lr,
                                          stats=codes, lr_decay=cfg.distill_lr_decay,
                                          lr_tail=cfg.distill_lr_tail, autocast=self._autocast())
            self.report.distill = {"kl_before": before, "kl_after": after, "lr": lr,
                                   "seconds": round(time.perf_counter() - t0, 3),
                                   **codes, **{k: v for k, v in meter.result().items() if k.startswith("peak")}}
            if self.run is not None:
                self.run.commit_distilled(self.model, self._storage_dtype(), write=self.place.is_main)
                self.place.barrier()
            for i in range(len(self.source)):
                self.source.release_block(i)
        self.source.release_rest()
        self.model.rvq_layers = self.specs
        self.model.rvq_config = cfg
        mark_quantized(self.model)
