"""Exact size accounting (shared/PROTOCOL.md, "Bits per weight").

A quantized layer's bits are everything stored to decode its weight, in the dtype it is stored in:
codes (uint8 or int16 per code), codebooks (fp16), scales (fp16) and, in a rotated layer, its signs
(int8, one per coded input column). A bias is not a weight and is reported apart. A shared codebook
(spec ``shared_codebooks``) is stored once: :func:`summarize` counts it once, :func:`layer_bits` not at all. bpw = those bits / (out_features * in_features).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .nn import TRELLIS_KEY, QuantizedLinear
from .rvq import code_dtype
from .rvq.trellis import walk_bytes
from .validate import shared_shape


def layer_bits(spec: dict) -> dict[str, int]:
    """Bits of each stored part of one quantized layer, from its spec (see :meth:`QuantizedLinear.spec`); a
    trellis layer's codes are its packed walks, ``in_features`` of ``walk_bytes`` each."""
    out, inp, d, s, b = (spec[k] for k in ("out_features", "in_features", "vector_dim", "stages", "bits"))
    groups = -(-inp // d)
    code_bits = code_dtype(b).itemsize * 8
    if TRELLIS_KEY in spec:
        codes = inp * 8 * walk_bytes(out, spec[TRELLIS_KEY], spec["trellis_step_bits"])
    else:
        codes = out * groups * s * code_bits
    return {
        "codes": codes,
        "codebooks": 0 if spec.get("shared_codebooks") else s * (1 << b) * d * 16,
        "scales": out * 16,
        "signs": groups * d * 8 if spec.get("hadamard_block") else 0,
        "weights": out * inp,
    }


def layer_bpw(spec: dict) -> float:
    parts = layer_bits(spec)
    return (parts["codes"] + parts["codebooks"] + parts["scales"] + parts["signs"]) / parts["weights"]


def summarize(specs: dict[str, dict]) -> dict:
    """Totals over quantized layers: ``{"layers", "weights", "bits", "bpw", "codes_bpw", "codebooks_bpw",
    "scales_bpw", "signs_bpw"}`` (``signs_bpw`` is 0 without rotated layers)."""
    totals = {"codes": 0, "codebooks": 0, "scales": 0, "signs": 0, "weights": 0}
    for spec in specs.values():
        for k, v in layer_bits(spec).items():
            totals[k] += v
    shared = shared_shape(specs, "the layer specs")
    if shared is not None:  # stored once for the model
        totals["codebooks"] += shared[0] * shared[1] * shared[2] * 16
    w = max(totals["weights"], 1)
    bits = totals["codes"] + totals["codebooks"] + totals["scales"] + totals["signs"]
    return {
        "layers": len(specs),
        "weights": totals["weights"],
        "bits": bits,
        "bpw": bits / w,
        "codes_bpw": totals["codes"] / w,
        "codebooks_bpw": totals["codebooks"] / w,
        "scales_bpw": totals["scales"] / w,
        "signs_bpw": totals["signs"] / w,
    }


def model_specs(model: nn.Module) -> dict[str, dict]:
    """Specs of every :class:`QuantizedLinear` in ``model`` by qualified name."""
    return {n: m.spec() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def folder_bytes(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``, ``*.gguf``) in a model folder, or of one file."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in {".safetensors", ".bin", ".gguf"})


def estimate_run_bytes(layers: dict[str, tuple[int, int]], other_bytes: int, config, tokens: int, hidden: int,
                       blocks: int = 0) -> dict[str, int]:
    """Disk a quantization run needs, before it starts: ``{"checkpoint", "run", "total"}`` bytes.

    ``layers``: ``{name: (out, in)}`` of the layers to quantize, at the config's code shape (``layer_shapes``'s
    where it names them);
    ``other_bytes``: the unquantized tensors as stored; ``tokens``: calibration tokens; ``hidden``: the
    blocks' width. The run folder holds, at its peak, two blocks' worth of float32 activations per stream
    (the quantized model's, plus the float model's when fine-tuning aims at it or distillation needs it),
    the teacher's top-k (distillation) and the shards (counted once: the checkpoint is made of them).
    With ``bpw_budget``, before any of that, the sensitivity pass keeps the input of each of the ``blocks``
    decoder blocks for one calibration batch beside block 0's inputs (:mod:`rvqllm.mixed`).
    """
    shape = {"vector_dim": config.vector_dim, "stages": config.stages, "bits": config.bits,
             "bias": False, "hadamard_block": 1 if config.rotate else 0}
    if config.coder == "trellis":
        shape.update(vector_dim=1, stages=1, bits=config.trellis_lut_bits, trellis_step_bits=config.trellis_step_bits,
                     **{TRELLIS_KEY: config.trellis_state_bits})
    if config.bpw_budget is not None and config.mixed_candidates:  # the widest candidate bounds the size
        widest = max(config.mixed_candidates, key=lambda c: c["stages"] * c["bits"] / c["vector_dim"])
        shape.update(widest)
    quantized = 0
    for name, (out, inp) in layers.items():
        own = config.shape_for(name) if config.layer_shapes else {}
        parts = layer_bits({**shape, **own, "out_features": out, "in_features": inp})
        quantized += (parts["codes"] + parts["codebooks"] + parts["scales"] + parts["signs"]) // 8 + 2 * out
    streams = 2 if config.distill_epochs > 0 or (config.finetune_epochs > 0 and config.finetune_target == "model") else 1
    run = 2 * streams * tokens * hidden * 4
    if config.distill_epochs > 0:  # the teacher, and the distilled shards written beside the first ones
        run += tokens * 64 * 2 * 4 + quantized
    if config.bpw_budget is not None:
        batch_tokens = min(tokens, config.calib_batch_size * config.calib_seq_len)
        run = max(run, (blocks * batch_tokens + streams * tokens) * hidden * 4)
    checkpoint = quantized + other_bytes
    return {"checkpoint": checkpoint, "run": run, "total": checkpoint + run}
