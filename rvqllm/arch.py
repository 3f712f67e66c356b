"""Generic discovery of a causal LM's decoder blocks and the linear layers inside them.

No per-model table: the decoder blocks are the ``nn.ModuleList`` that holds the most parameters
(``model.layers`` in Llama/Mistral/Qwen/Gemma/Phi, ``transformer.h`` in GPT-2, ``gpt_neox.layers``,
``model.decoder.layers`` in OPT), and the layers to quantize are the ``nn.Linear`` and GPT-2
``Conv1D`` modules inside each block.

Mixture-of-experts blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, ...): transformers 5 stores the experts of
one block fused in 3-D parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``). We split
such a module into a :class:`SplitExperts` that holds one ``nn.Linear`` per expert and projection
(``experts.gate_up_proj.<e>`` / ``experts.down_proj.<e>``) and computes the very same routed forward.
Every expert's layer is then an ordinary linear layer: calibrated on the tokens routed to it,
quantized to a :class:`~rvqllm.nn.QuantizedLinear`, stored and sized like any other layer. Design
choice: per-expert modules rather than one stacked 3-D quantized tensor, so that the checkpoint
format, the size accounting and the kernels need nothing MoE-specific. The router (``gate``/
``router``/``shared_expert_gate`` beside ``experts``) is small and sensitive and stays unquantized.
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


#: Names of MoE routers (a linear layer with one of these names next to an ``experts`` module).
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


class SplitExperts(nn.Module):
    """Fused MoE experts as one linear layer per expert and projection; same routing and math.

    Children: ``gate_up_proj[e]`` maps ``H -> 2I`` (gate rows first, then up rows) and ``down_proj[e]``
    maps ``I -> H``; each is an ``nn.Linear`` (before quantization) or a ``QuantizedLinear`` (after).
    Forward takes ``hidden_states [T, H]``, ``top_k_index [T, k]`` int64 and ``top_k_weights [T, k]``
    like the transformers 5 experts modules and returns ``[T, H]``.
    """

    def __init__(self, num_experts: int, act_fn: nn.Module) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.gate_up_proj = nn.ModuleList()
        self.down_proj = nn.ModuleList()

    @classmethod
    def from_fused(cls, fused: nn.Module) -> SplitExperts:
        """Split a fused experts module (see :func:`fused_experts_problem`); works on the meta device too."""
        gate_up, down = fused.gate_up_proj, fused.down_proj
        split = cls(gate_up.shape[0], fused.act_fn)
        for e in range(split.num_experts):
            for fused_param, target in ((gate_up, split.gate_up_proj), (down, split.down_proj)):
                out_f, in_f = fused_param.shape[1:]
                lin = nn.Linear(in_f, out_f, bias=False, device=fused_param.device, dtype=fused_param.dtype)
                if fused_param.device.type != "meta":
                    with torch.no_grad():
                        lin.weight.copy_(fused_param[e])
                target.append(lin)
        return split

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            gate, up = self.gate_up_proj[e](hidden_states[tok]).chunk(2, dim=-1)
            y = self.down_proj[e](self.act_fn(gate) * up) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def fused_experts_problem(module: nn.Module) -> str | None:
    """``None`` if ``module`` is a fused experts module we can split, else why not (for the error).

    Only called on modules holding 3-D parameters. Supported: exactly ``gate_up_proj [E, 2I, H]`` and
    ``down_proj [E, H, I]``, gate and up concatenated, not transposed, no biases, an ``act_fn``.
    """
    params = {n: p for n, p in module.named_parameters(recurse=False)}
    name = type(module).__name__
    if set(params) != {"gate_up_proj", "down_proj"} or not hasattr(module, "act_fn"):
        return f"{name} holds 3-D parameters {sorted(params)}; rvqllm splits only gate_up_proj + down_proj experts"
    for flag, bad in (("is_transposed", True), ("is_concatenated", False), ("has_bias", True),
                      ("has_gate", False), ("has_post_expert_norm", True)):
        if getattr(module, flag, not bad) == bad:
            return f"{name} has {flag}={bad}, a fused-experts layout rvqllm does not split"
    gu, dn = params["gate_up_proj"], params["down_proj"]
    if gu.dim() != 3 or dn.dim() != 3 or gu.shape[0] != dn.shape[0] or gu.shape[1] != 2 * dn.shape[2] or gu.shape[2] != dn.shape[1]:
        return f"{name} has gate_up_proj {tuple(gu.shape)} / down_proj {tuple(dn.shape)}, not [E, 2I, H] / [E, H, I]"
    return None


def _has_3d_params(module: nn.Module) -> bool:
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def split_fused_experts(root: nn.Module, only_under: list[str] | None = None) -> list[str]:
    """Replace every fused experts module under ``root`` by a :class:`SplitExperts`, in place.

    ``only_under``: split only modules some of these qualified names lie inside (used when loading a
    checkpoint, whose layer names say which experts were quantized). Returns the names replaced.
    Raises :class:`RVQError` naming the module class when 3-D parameters are in a layout we do not know.
    """
    replaced = []
    for name, module in list(root.named_modules()):
        if isinstance(module, SplitExperts) or not _has_3d_params(module):
            continue
        if only_under is not None and not any(n.startswith(f"{name}.") for n in only_under):
            continue
        problem = fused_experts_problem(module)
        if problem:
            raise RVQError(
                f"{problem} (module {name or type(root).__name__}): this architecture is not understood; "
                "quantize it with these modules in `skip`, or open an issue with the model id"
            )
        set_module(root, name, SplitExperts.from_fused(module))
        replaced.append(name)
    return replaced


def _is_router(block: nn.Module, name: str) -> bool:
    parent_name, _, child = name.rpartition(".")
    if child not in ROUTER_NAMES:
        return False
    parent = block.get_submodule(parent_name) if parent_name else block
    return hasattr(parent, "experts")


def find_linears(block: nn.Module, prefix: str, skip: list[str]) -> dict[str, nn.Module]:
    """Linear layers of ``block`` by qualified name (``prefix.sub.name``), minus names containing any of ``skip``.

    Fused MoE experts in ``block`` are first split in place into per-expert linear layers
    (:func:`split_fused_experts`, same math); MoE routers are left out (see :data:`ROUTER_NAMES`).
    """
    split_fused_experts(block)
    found = {}
    for name, module in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if is_linear(module) and not _is_router(block, name) and not any(s and s in full for s in skip):
            found[full] = module
    return found


def prepare_for_layers(model: nn.Module, layer_names: list[str]) -> None:
    """Make the module tree of a freshly built ``model`` match a checkpoint's quantized layer names:
    split the fused experts that quantized layers lie inside. Called before the layers are swapped in."""
    split_fused_experts(model, only_under=list(layer_names))


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
