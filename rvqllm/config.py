"""RVQConfig: the one plain-data object that travels through the pipeline.

Presets live as YAML files in ``configs/`` (``2bit.yaml``, ``3bit.yaml``, ``4bit.yaml``); a preset is
nothing but the fields below. ``RVQConfig.load("2bit")`` or ``RVQConfig.load("configs/2bit.yaml")``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import RVQError

#: Folder of the shipped presets (the repository's ``configs/``).
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class RVQConfig:
    """How to quantize a model.

    The code of one weight vector costs ``stages * bits`` bits, i.e. ``stages * bits / vector_dim`` bits
    per weight before codebooks and scales (see :mod:`rvqllm.size` for the all-in count).
    """

    # --- the code --------------------------------------------------------------------------------
    vector_dim: int = 8  #: weights per vector, grouped along the input dimension
    stages: int = 2  #: residual stages, each with its own codebook
    bits: int = 8  #: bits per code; each codebook has 2**bits codewords
    # --- codebook learning -----------------------------------------------------------------------
    kmeans_iters: int = 20  #: Lloyd iterations per stage (at most; stops when under 0.1% of points move)
    kmeans_points: int = 64  #: k-means sample size per codeword (time grows linearly; 128 gains ~2-4% error)
    hessian_weighted: bool = True  #: weight the k-means by diag(H) of the layer inputs
    beam_width: int = 8  #: codes of all stages chosen jointly by beam search (1 = greedy; cost grows ~linearly)
    error_feedback: bool = True  #: GPTQ-style: code against the output error, push each group's error onward
    hessian_damp: float = 0.01  #: add this x mean(diag H) x I to each layer's input Hessian (larger: less bent to the calibration text)
    codebook_refits: int = 0  #: rounds of joint least-squares codebook re-fit to beam-searched codes (0 = off)
    rotate: bool = False  #: code W R, R a random sign flip + block Hadamard, applied to x at run time (docs/ROTATION.md)
    shared_codebook: str | None = None  #: one codebook for every layer, stored once: a built-in name ("gaussian-65536") or a .safetensors file (rvqllm.rvq.universal); no k-means then
    # --- the trellis coder (rvqllm.rvq.trellis_layer) -----------------------------------------------------
    coder: str = "rvq"  #: "rvq": vectors coded by the codebooks above; "trellis": each input column of the rotated weight one bitshift-trellis walk down its rows, its codewords a small per-layer table (vector_dim, stages, bits, beam, k-means and codebook fields unused)
    trellis_state_bits: int = 12  #: trellis states 2**L (Viterbi time grows as 2**L; L <= 18 has the fast CPU kernel)
    trellis_step_bits: int = 2  #: bits per weight of a walk (each row shifts this many new bits into the state)
    trellis_table_iters: int = 32  #: Lloyd iterations that train the starting table on a unit Gaussian source through the trellis (0: the Gaussian's equiprobable quantiles, the table of session 21)
    trellis_lut_bits: int = 5  #: the per-layer codeword table has 2**this entries (5: 32, kept in registers by the CPU kernel)
    # --- block fine-tuning (rvqllm.finetune) -----------------------------------------------------------
    finetune_epochs: int = 0  #: Adam passes over the calibration batches per block (0 = off)
    finetune_lr: float = 1e-3  #: Adam learning rate for codebooks, scale gains, biases and norms
    finetune_batch: int = 2  #: calibration sequences per Adam step
    finetune_target: str = "block"  #: "block": the float block on the same inputs; "model": the float model's activations
    finetune_sequences: int = 0  #: fine-tune on the calibration batches holding the first this many sequences (0: all); the Hessians use all
    finetune_retries: int = 0  #: a block whose tuning made its output error worse (and was undone) is tuned again from where it was, at a third of the previous learning rate, up to this many times
    tune_dtype: str = "float32"  #: what block fine-tuning and distillation multiply in: "float32", "bfloat16" (autocast; params, optimizer and losses stay float32), or "auto": bfloat16 where the device has it natively, else float32
    distill_epochs: int = 0  #: after all blocks: passes of whole-model distillation towards the float model's logits
    distill_lr: float | str = "auto"  #: Adam learning rate of the distillation, or "auto": from the code's bits per weight b, 1e-3 x 10^(-(b-2)/2) (1e-3 at 2 bits, 3.2e-4 at 3, 1e-4 at 4: rvqllm.finetune.distill_rate)
    distill_sequences: int = 0  #: distil on the first this many calibration sequences only (0: all); the Hessians use all
    distill_lr_decay: bool = False  #: epochs after the first decay the learning rate to 0 (cosine); off: constant
    distill_lr_tail: float = 0.0  #: the last this share of all distillation steps decays the learning rate to 0 (cosine), one epoch too; 0: constant
    distill_code_fraction: float = 0.0  #: codes move in distillation: share of each layer's groups re-encoded per update (0 = frozen; costs 3 fp32 copies of the weights)
    distill_code_every: int = 8  #: Adam steps between those code updates
    distill_code_lr: float = 1e-2  #: Adam learning rate of the float shadows the moving codes follow
    distill_chunk_tokens: int = 1024  #: tokens whose full-vocabulary logits exist at once in distillation (memory ~ chunk x vocab x 16 B)
    # --- mixed precision (rvqllm.mixed) ----------------------------------------------------------------
    bpw_budget: float | str | None = None  #: all-in bpw for the whole model; layers get candidate shapes by sensitivity; "auto": what the code shape above would cost on every layer of this model (a uniform preset's size)
    mixed_candidates: list[dict] = field(default_factory=list)  #: code shapes {vector_dim, stages, bits} to pick from
    sensitivity_sequences: int = 8  #: the first this many calibration sequences (all when there are fewer) measure each layer's loss sensitivity for bpw_budget, calib_batch_size at a time; that pass's time grows with it
    layer_shapes: dict[str, dict] = field(default_factory=dict)  #: fixed code shapes by layer name, e.g. {".k_proj": {vector_dim: 6}}: a layer takes the fields of the first key its qualified name contains (any of vector_dim, stages, bits); the other layers, and the fields not named, keep the ones above
    # --- what to quantize ------------------------------------------------------------------------
    skip: list[str] = field(default_factory=lambda: ["lm_head"])  #: name substrings never quantized
    # --- calibration -----------------------------------------------------------------------------
    calib_sequences: int = 64  #: calibration sequences
    calib_seq_len: int = 512  #: tokens per calibration sequence
    calib_batch_size: int = 8  #: sequences per forward pass during calibration
    calib_dtype: str = "float32"  #: what the calibration's passes multiply in: the Hessians' pass, the quantized block's pass that feeds the next block, and the float model's own pass that gives block fine-tuning's targets and the distillation's teacher (its top-k head included); each batch's Hessian product x^T x runs under the same autocast, bfloat16 inputs with float32 accumulation, and is summed in float64. "float32", "bfloat16" (autocast) or "auto" (bfloat16 where the device has it natively and the model computes in float32, else as the model computes)
    seed: int = 0
    description: str = ""  #: one line shown by ``rvqllm quantize --help``

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`RVQError` if a field is out of range."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise RVQError(msg)

        need(isinstance(self.vector_dim, int) and 1 <= self.vector_dim <= 64,
             f"vector_dim={self.vector_dim!r} is out of range: use an integer from 1 to 64 (8 is typical)")
        need(isinstance(self.stages, int) and 1 <= self.stages <= 8,
             f"stages={self.stages!r} is out of range: use an integer from 1 to 8")
        need(isinstance(self.bits, int) and 1 <= self.bits <= 16,
             f"bits={self.bits!r} is out of range: use an integer from 1 to 16 (codebooks of 2**bits entries)")
        need(isinstance(self.kmeans_iters, int) and self.kmeans_iters >= 0,
             f"kmeans_iters={self.kmeans_iters!r} must be a non-negative integer")
        need(isinstance(self.kmeans_points, int) and self.kmeans_points >= 1,
             f"kmeans_points={self.kmeans_points!r} must be a positive integer (64 is typical)")
        need(isinstance(self.beam_width, int) and 1 <= self.beam_width <= 256,
             f"beam_width={self.beam_width!r} is out of range: use 1 (greedy) to 256 (8 is typical)")
        need(isinstance(self.codebook_refits, int) and self.codebook_refits >= 0,
             f"codebook_refits={self.codebook_refits!r} must be a non-negative integer (0 turns re-fitting off)")
        need(isinstance(self.rotate, bool), f"rotate={self.rotate!r} must be true or false")
        need(isinstance(self.hessian_damp, int | float) and 1e-6 <= self.hessian_damp <= 100,
             f"hessian_damp={self.hessian_damp!r} is out of range: use a number from 1e-6 to 100 (0.01 is GPTQ's)")
        need(not self.rotate or self.error_feedback is True,
             "rotate=true needs error_feedback=true (without it rotation raises the output error, docs/ROTATION.md)")
        need(isinstance(self.finetune_epochs, int) and self.finetune_epochs >= 0,
             f"finetune_epochs={self.finetune_epochs!r} must be a non-negative integer (0 turns fine-tuning off)")
        need(isinstance(self.finetune_lr, int | float) and 0 < self.finetune_lr < 1,
             f"finetune_lr={self.finetune_lr!r} is out of range: use a positive number below 1 (1e-3 is typical)")
        need(isinstance(self.distill_epochs, int) and self.distill_epochs >= 0,
             f"distill_epochs={self.distill_epochs!r} must be a non-negative integer (0 turns distillation off)")
        need(self.distill_lr == "auto" or (isinstance(self.distill_lr, int | float) and not isinstance(self.distill_lr, bool)
                                           and 0 < self.distill_lr < 1),
             f"distill_lr={self.distill_lr!r} is out of range: use 'auto' (set from the code's bits per weight) or a "
             "positive number below 1 (1e-3 suits 2-bit codes)")
        need(isinstance(self.distill_sequences, int) and not isinstance(self.distill_sequences, bool)
             and self.distill_sequences >= 0,
             f"distill_sequences={self.distill_sequences!r} must be a non-negative integer (0: every calibration sequence)")
        need(isinstance(self.finetune_sequences, int) and not isinstance(self.finetune_sequences, bool)
             and self.finetune_sequences >= 0,
             f"finetune_sequences={self.finetune_sequences!r} must be a non-negative integer (0: every calibration sequence)")
        need(isinstance(self.distill_lr_decay, bool),
             f"distill_lr_decay={self.distill_lr_decay!r} must be true or false")
        need(isinstance(self.distill_lr_tail, int | float) and not isinstance(self.distill_lr_tail, bool)
             and 0 <= self.distill_lr_tail <= 1,
             f"distill_lr_tail={self.distill_lr_tail!r} is out of range: use 0 (constant rate) to 1 (a cosine over "
             "the whole distillation); 0.3 decays over the last 30% of the steps")
        need(not (self.distill_lr_decay and self.distill_lr_tail > 0),
             "distill_lr_decay and distill_lr_tail are two schedules: set one of them")
        need(isinstance(self.distill_code_fraction, int | float) and 0 <= self.distill_code_fraction <= 1,
             f"distill_code_fraction={self.distill_code_fraction!r} is out of range: use 0 (codes frozen) to 1 "
             "(0.01 re-encodes 1% of each layer's groups per update)")
        need(isinstance(self.distill_code_every, int) and self.distill_code_every >= 1,
             f"distill_code_every={self.distill_code_every!r} must be a positive integer (Adam steps between code updates)")
        need(isinstance(self.distill_code_lr, int | float) and 0 < self.distill_code_lr < 10,
             f"distill_code_lr={self.distill_code_lr!r} is out of range: use a positive number below 10 (1e-2 is typical)")
        need(isinstance(self.distill_chunk_tokens, int) and self.distill_chunk_tokens >= 1,
             f"distill_chunk_tokens={self.distill_chunk_tokens!r} must be a positive integer (tokens per logit chunk)")
        need(isinstance(self.finetune_retries, int) and not isinstance(self.finetune_retries, bool)
             and self.finetune_retries >= 0,
             f"finetune_retries={self.finetune_retries!r} must be a non-negative integer (0: a block whose tuning "
             "was undone stays as coded)")
        need(isinstance(self.finetune_batch, int) and self.finetune_batch >= 1,
             f"finetune_batch={self.finetune_batch!r} must be a positive integer (sequences per step)")
        need(self.tune_dtype in ("float32", "bfloat16", "auto"),
             f"tune_dtype={self.tune_dtype!r} is unknown: use 'float32', 'bfloat16' or 'auto'")
        need(self.calib_dtype in ("float32", "bfloat16", "auto"),
             f"calib_dtype={self.calib_dtype!r} is unknown: use 'float32', 'bfloat16' or 'auto'")
        need(self.finetune_target in ("block", "model"),
             f"finetune_target={self.finetune_target!r} is unknown: use 'block' or 'model'")
        need(isinstance(self.calib_sequences, int) and self.calib_sequences >= 1,
             f"calib_sequences={self.calib_sequences!r} must be a positive integer")
        need(isinstance(self.calib_seq_len, int) and self.calib_seq_len >= 2,
             f"calib_seq_len={self.calib_seq_len!r} must be an integer of at least 2")
        need(isinstance(self.calib_batch_size, int) and self.calib_batch_size >= 1,
             f"calib_batch_size={self.calib_batch_size!r} must be a positive integer")
        need(self.bpw_budget is None or self.bpw_budget == "auto" or (
            isinstance(self.bpw_budget, int | float) and not isinstance(self.bpw_budget, bool) and self.bpw_budget > 0),
             f"bpw_budget={self.bpw_budget!r} must be a positive number of bits per weight, 'auto' (what vector_dim, "
             "stages and bits cost on every layer) or null for off")
        need(isinstance(self.mixed_candidates, list) and all(
            isinstance(c, dict) and set(c) == {"vector_dim", "stages", "bits"} for c in self.mixed_candidates),
             "mixed_candidates must be a list of {vector_dim, stages, bits} mappings")
        need(isinstance(self.sensitivity_sequences, int) and not isinstance(self.sensitivity_sequences, bool)
             and self.sensitivity_sequences >= 1,
             f"sensitivity_sequences={self.sensitivity_sequences!r} must be a positive integer")
        need(self.bpw_budget is None or len(self.mixed_candidates) > 0,
             "bpw_budget needs mixed_candidates: list the code shapes the layers may use")
        for c in self.mixed_candidates:
            RVQConfig(vector_dim=c["vector_dim"], stages=c["stages"], bits=c["bits"])  # same range checks
        need(isinstance(self.layer_shapes, dict) and all(
            isinstance(k, str) and k != "" and isinstance(v, dict) and v and set(v) <= {"vector_dim", "stages", "bits"}
            for k, v in self.layer_shapes.items()),
             "layer_shapes must map layer-name substrings to one or more of vector_dim, stages, bits, "
             "e.g. {.k_proj: {vector_dim: 6}}")
        keys = list(self.layer_shapes)
        for n, key in enumerate(keys):
            try:  # the same range checks as the fields themselves
                RVQConfig(**{"vector_dim": self.vector_dim, "stages": self.stages, "bits": self.bits,
                             **self.layer_shapes[key]})
            except RVQError as err:
                raise RVQError(f"layer_shapes[{key!r}]: {err}") from None
            earlier = next((k for k in keys[:n] if k in key), None)
            need(earlier is None, f"layer_shapes key {key!r} can never apply: every name containing it also "
                 f"contains the earlier key {earlier!r}, and the first key found wins; list {key!r} first")
        need(not (self.layer_shapes and self.bpw_budget is not None),
             "layer_shapes and bpw_budget both choose layers' code shapes: drop one of the two")
        need(self.shared_codebook is None or (isinstance(self.shared_codebook, str) and self.shared_codebook != ""),
             f"shared_codebook={self.shared_codebook!r} must be a built-in codebook name or a .safetensors path (or null)")
        if self.shared_codebook is not None:
            from .rvq.universal import builtin_shape

            shape = builtin_shape(self.shared_codebook)
            if shape is not None and shape != (self.stages, self.bits, self.vector_dim):
                raise RVQError(f"shared_codebook {self.shared_codebook!r} is {shape[0]} stage(s) of 2**{shape[1]} "
                               f"entries of dimension {shape[2]}: set stages: {shape[0]}, bits: {shape[1]} and "
                               f"vector_dim: {shape[2]}")
            need(self.bpw_budget is None and not self.layer_shapes, "shared_codebook cannot be combined with "
                 "bpw_budget or layer_shapes (they give layers different code shapes): drop one of the two")
            need(self.finetune_epochs == 0, "shared_codebook cannot be combined with block fine-tuning (each block "
                 "would move the codebook the earlier blocks were tuned against): set finetune_epochs: 0 and "
                 "use distill_epochs, which tunes the shared codebook with the whole model")
        need(self.coder in ("rvq", "trellis"), f"coder={self.coder!r} is unknown: use 'rvq' or 'trellis'")
        need(isinstance(self.trellis_step_bits, int) and not isinstance(self.trellis_step_bits, bool)
             and 1 <= self.trellis_step_bits <= 8,
             f"trellis_step_bits={self.trellis_step_bits!r} is out of range: use an integer from 1 to 8 (2 is typical)")
        need(isinstance(self.trellis_state_bits, int) and not isinstance(self.trellis_state_bits, bool)
             and self.trellis_step_bits < self.trellis_state_bits <= 24
             and self.trellis_state_bits % self.trellis_step_bits == 0,
             f"trellis_state_bits={self.trellis_state_bits!r} is out of range: use a multiple of trellis_step_bits "
             f"({self.trellis_step_bits}) above it and at most 24 (12 is typical)")
        need(isinstance(self.trellis_lut_bits, int) and not isinstance(self.trellis_lut_bits, bool)
             and 1 <= self.trellis_lut_bits <= 8,
             f"trellis_lut_bits={self.trellis_lut_bits!r} is out of range: use an integer from 1 to 8 (5 is typical)")
        need(isinstance(self.trellis_table_iters, int) and not isinstance(self.trellis_table_iters, bool)
             and 0 <= self.trellis_table_iters <= 100,
             f"trellis_table_iters={self.trellis_table_iters!r} is out of range: use an integer from 0 to 100 (32 is typical)")
        if self.coder == "trellis":
            need(self.rotate is True, "coder: trellis codes the rotated weight: set rotate: true")
            need(self.shared_codebook is None, "coder: trellis has a table per layer, not a shared codebook: drop "
                 "shared_codebook")
            need(self.bpw_budget is None and not self.layer_shapes, "coder: trellis cannot be combined with "
                 "bpw_budget or layer_shapes (they pick RVQ code shapes): drop one of the two")
            need(self.distill_code_fraction == 0, "coder: trellis keeps its walks as coded: set distill_code_fraction: 0")
        need(isinstance(self.skip, list) and all(isinstance(s, str) for s in self.skip),
             "skip must be a list of module-name substrings, e.g. [lm_head]")

    def shape_for(self, name: str) -> dict[str, int]:
        """``{vector_dim, stages, bits}`` of the layer called ``name``: the config's, with the fields of the
        first ``layer_shapes`` key that ``name`` contains."""
        shape = {"vector_dim": self.vector_dim, "stages": self.stages, "bits": self.bits}
        for key, fields_ in self.layer_shapes.items():
            if key in name:
                shape.update(fields_)
                break
        return shape

    @property
    def code_bits_per_weight(self) -> float:
        """Bits per weight spent on codes alone (no codebooks, no scales): a trellis walk's step bits."""
        if self.coder == "trellis":
            return float(self.trellis_step_bits)
        return self.stages * self.bits / self.vector_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> RVQConfig:
        """Build from a mapping. ``strict=False`` (used when reading a checkpoint's recorded recipe) drops
        fields this version does not know, so a checkpoint written by a newer rvqllm still loads; the
        layers themselves are described by their own specs, which are always checked strictly."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if not strict:
            return cls(**{k: v for k, v in data.items() if k in known})
        if unknown:
            raise RVQError(f"unknown config field(s) {unknown}: known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, name_or_path: str | Path) -> RVQConfig:
        """Load a preset by name (``"2bit"``) or a YAML file path."""
        path = Path(name_or_path)
        if not path.exists():
            candidate = PRESET_DIR / f"{name_or_path}.yaml"
            if candidate.exists():
                path = candidate
            else:
                presets = ", ".join(available_presets()) or "none found"
                raise RVQError(f"config {str(name_or_path)!r} not found: give a YAML file or a preset ({presets})")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RVQError(f"config {path} is not valid YAML ({err.__class__.__name__}): fix the file") from None
        if not isinstance(data, dict):
            raise RVQError(f"config {path} must be a mapping of field: value")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> RVQConfig:
        return dataclasses.replace(self, **changes)


def available_presets() -> list[str]:
    """Names of the presets shipped in ``configs/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
