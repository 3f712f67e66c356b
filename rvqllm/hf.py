"""transformers integration: the ``rvq`` quantization method, registered on ``import rvqllm``.

After ``import rvqllm``, ``AutoModelForCausalLM.from_pretrained(folder)`` reads an rvqllm checkpoint
(see :mod:`rvqllm.checkpoint`, the one on-disk format: one safetensors shard per decoder block plus
``model.safetensors.index.json``, which transformers reads natively; or the first single-file layout)
with :class:`~rvqllm.nn.QuantizedLinear` layers in place, ``save_pretrained`` writes the same tensors
and the same ``quantization_config`` back (through :func:`rvqllm.save`), and ``device_map`` /
accelerate offloading work because the quantized layers are ordinary modules with buffers.

How it plugs in (transformers 5 quantizer API):

- :class:`RVQQuantizationConfig` (registered as ``"rvq"``) is ``config.json``'s ``quantization_config``;
  its ``to_dict`` is exactly the dict :func:`rvqllm.checkpoint.quantization_config` writes.
- :class:`RVQHfQuantizer` first checks a local folder's headers against its config (bounded work, as
  :func:`rvqllm.load` does: :func:`rvqllm.validate.check_headers`), then reshapes the empty (meta)
  model before weights load: it splits fused
  MoE experts the checkpoint quantized and swaps each listed layer for an empty ``QuantizedLinear``;
  the regular loader then fills ``codes``/``codebooks``/``scales``/``bias`` by name from the shards the
  index names (tied embeddings are stored once and re-tied by transformers).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .arch import prepare_for_layers, set_module
from .checkpoint import QUANT_METHOD
from .errors import RVQError
from .nn import QuantizedLinear, attach_shared, bind_shared
from .validate import FORMAT_VERSION, READABLE_VERSIONS

#: Per-layer keys every entry of ``quantization_config.layers`` must have.
LAYER_KEYS = ("in_features", "out_features", "vector_dim", "stages", "bits", "bias")

#: Older format versions we can read, mapped to a function upgrading their ``quantization_config``
#: dict to the current version. Version 2 only added trellis layers, so a version-1 config is read as
#: it is (and RVQ-only checkpoints are still written as version 1).
UPGRADES: dict[int, Any] = {v: (lambda raw: raw) for v in READABLE_VERSIONS if v != FORMAT_VERSION}


def check_format(format_version: Any, layers: Any) -> None:
    """Raise :class:`RVQError` saying exactly why a ``quantization_config`` cannot be read."""
    if not isinstance(format_version, int):
        raise RVQError(f"quantization_config.format_version is {format_version!r}, not an integer: "
                       "the checkpoint's config.json is corrupt; re-create it with `rvqllm quantize`")
    if format_version > FORMAT_VERSION:
        raise RVQError(f"checkpoint format version {format_version} is newer than this rvqllm "
                       f"(reads versions {sorted([*UPGRADES, FORMAT_VERSION])}): upgrade rvqllm")
    if format_version != FORMAT_VERSION and format_version not in UPGRADES:
        raise RVQError(f"checkpoint format version {format_version} was never written by a released rvqllm "
                       f"(this one reads {sorted([*UPGRADES, FORMAT_VERSION])}): re-quantize the model")
    if not isinstance(layers, dict) or not layers:
        raise RVQError("quantization_config.layers is empty or not a mapping: the checkpoint is corrupt; re-create it")
    for name, spec in layers.items():
        missing = [k for k in LAYER_KEYS if not isinstance(spec, dict) or k not in spec]
        if missing:
            raise RVQError(f"quantization_config.layers[{name!r}] lacks {missing}: the checkpoint is corrupt; re-create it")


class RVQQuantizationConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` for an rvqllm checkpoint.

    Fields: ``format_version`` (int), ``rvq_config`` (the :class:`~rvqllm.RVQConfig` as a dict),
    ``layers`` (``{qualified name: {in_features, out_features, vector_dim, stages, bits, bias}}``, plus
    ``hadamard_block`` for a rotated layer and ``trellis_state_bits`` / ``trellis_step_bits`` for a
    trellis-coded one).
    """

    def __init__(self, format_version: int = FORMAT_VERSION, rvq_config: dict | None = None,
                 layers: dict[str, dict] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        raw = {"quant_method": QUANT_METHOD, "format_version": format_version,
               "rvq_config": rvq_config or {}, "layers": layers or {}, **kwargs}
        check_format(format_version, layers)
        if format_version != FORMAT_VERSION:
            raw = UPGRADES[format_version](raw)
        self.format_version = raw["format_version"]
        self.rvq_config = raw["rvq_config"]
        self.layers = raw["layers"]

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                "rvq_config": dict(self.rvq_config), "layers": {k: dict(v) for k, v in self.layers.items()}}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class RVQHfQuantizer(HfQuantizer):
    """Loads pre-quantized rvqllm checkpoints (quantizing happens in :func:`rvqllm.quantize`, not here)."""

    requires_calibration = True
    quantization_config: RVQQuantizationConfig

    def update_attn_implementation(self, config: Any) -> Any:
        """Called with the model config before transformers builds the model: for a local checkpoint
        folder, size the config against the files' headers first (:func:`rvqllm.validate.check_headers`,
        bounded work), so that a config declaring a model larger than its files is refused before
        transformers builds anything from it."""
        from .validate import check_headers

        folder = Path(str(getattr(config, "name_or_path", "") or ""))
        if str(folder) and folder.is_dir() and (folder / "config.json").is_file():
            check_headers(folder)
        return config

    def _process_model_before_weight_loading(self, model: torch.nn.Module, dtype: torch.dtype | None = None,
                                             **kwargs: Any) -> torch.nn.Module:
        from .validate import shared_shape

        layers = self.quantization_config.layers
        prepare_for_layers(model, list(layers))
        float_dtype = dtype or getattr(model, "dtype", None) or torch.float32
        for name, spec in layers.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise RVQError(f"checkpoint lists quantized layer {name!r}, which {type(model).__name__} has not: "
                               "the config does not match the model class") from None
            device = next(old.parameters(), torch.empty(0, device="meta")).device
            set_module(model, name, QuantizedLinear.from_spec(spec, bias_dtype=float_dtype, device=device))
            parent = model.get_submodule(name.rpartition(".")[0])
            if not any(True for _ in parent.parameters(recurse=False)):
                # transformers re-initialises modules not marked as loaded, and some models' init code
                # touches ``parent.<child>.weight`` (GPT-2's scaled c_proj init), which a quantized layer
                # has not; such a parent holds nothing of its own to initialise, so mark it done.
                parent._is_hf_initialized = True
        shape = shared_shape(layers, "quantization_config")
        if shape is not None:  # the one shared codebook (rvq_shared.codebooks), filled by the loader like any buffer
            attach_shared(model, torch.empty(shape, dtype=torch.float16, device=device))
            bind_shared(model)
        model.rvq_layers = {k: dict(v) for k, v in layers.items()}
        return model

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        from .config import RVQConfig
        from .validate import check_values

        # transformers read the tensors itself (no checksum pass on this path: use rvqllm.load or
        # `rvqllm info DIR --verify` for that); still, no kernel may ever see an out-of-range code or a
        # non-finite codebook/scale, so check every quantized layer that is in memory.
        loaded = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and not m.codes.is_meta}
        tensors = {f"{n}.{b}": getattr(m, b) for n, m in loaded.items() for b in ("codes", "codebooks", "scales", "signs")
                   if getattr(m, b) is not None}
        check_values(Path("from_pretrained"), tensors, {n: m.spec() for n, m in loaded.items()})

        cfg = self.quantization_config.rvq_config
        model.rvq_config = RVQConfig.from_dict(cfg, strict=False) if cfg else None
        # One on-disk format: save_pretrained writes through rvqllm.save (checksums, atomic swap), which
        # replaces an existing rvqllm checkpoint or empty folder and refuses anything else.
        model.save_pretrained = types.MethodType(_save_pretrained, model)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _save_pretrained(model: torch.nn.Module, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
    """``save_pretrained`` of a model loaded through this quantizer: :func:`rvqllm.save`, which shards one
    file per decoder block (transformers' own options such as ``max_shard_size`` or ``push_to_hub`` are
    not supported for rvq checkpoints)."""
    from .checkpoint import save

    unsupported = sorted(k for k, v in kwargs.items() if v and k in {"push_to_hub", "max_shard_size"})
    if unsupported:
        raise RVQError(f"save_pretrained options {unsupported} are not supported for rvq checkpoints: "
                       "save to a folder, then upload it")
    save(model, save_directory, overwrite=Path(save_directory).exists())


def register() -> None:
    """Register ``rvq`` with transformers (idempotent; done by ``import rvqllm``)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not RVQQuantizationConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(RVQQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not RVQHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(RVQHfQuantizer)
