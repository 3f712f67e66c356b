"""Generic discovery of a causal LM's decoder blocks and the linear layers inside them.

No per-model table: the decoder blocks are the ``nn.ModuleList`` that holds the most parameters
(``model.layers`` in Llama/Mistral/Qwen/Gemma/Phi, ``transformer.h`` in GPT-2, ``gpt_neox.layers``,
``model.decoder.layers`` in OPT), and the layers to quantize are the ``nn.Linear`` and GPT-2
``Conv1D`` modules inside each block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import RVQError


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (weight stored ``[in, out]``), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` whatever the module type."""
    return module.weight.T if is_conv1d(module) else module.weight


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, ModuleList)`` of the decoder blocks.

    Raises :class:`RVQError` when the model has no list of blocks containing linear layers.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise RVQError(
            f"{type(model).__name__}: found no list of decoder blocks with linear layers to quantize; "
            "rvqllm quantizes transformer decoders (Llama, GPT-2, OPT, ...) built from nn.Linear/Conv1D"
        )
    return best[1], best[2]


def find_linears(block: nn.Module, prefix: str, skip: list[str]) -> dict[str, nn.Module]:
    """Linear layers of ``block`` by qualified name (``prefix.sub.name``), minus names containing any of ``skip``."""
    found = {}
    for name, module in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if is_linear(module) and not any(s and s in full for s in skip):
            found[full] = module
    return found


def set_module(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    """Replace the submodule at ``qualified_name`` (dot path) by ``new``."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def check_causal_lm(model: nn.Module) -> None:
    """Refuse models that are not causal LMs with a clear message."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise RVQError(
            f"{type(model).__name__} is an encoder-decoder model: rvqllm quantizes causal (decoder-only) LMs; "
            "load one with AutoModelForCausalLM"
        )
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise RVQError(
            f"{type(model).__name__} has no language-model head: load the model with AutoModelForCausalLM"
        )


def first_param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())
