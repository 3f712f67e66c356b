"""Generic discovery of a causal LM's decoder blocks and the linear layers inside them.

No per-model table: the decoder blocks are the ``nn.ModuleList`` that holds the most parameters
(``model.layers`` in Llama/Mistral/Qwen/Gemma/Phi/DeepSeek, ``transformer.h`` in GPT-2/Falcon/Bloom/
GPT-BigCode/GPT-J, ``gpt_neox.layers``, ``model.decoder.layers`` in OPT), and the layers to quantize are
the ``nn.Linear`` and GPT-2 ``Conv1D`` modules inside each block, whatever their names: fused or packed
projections (``query_key_value``, ``c_attn``, ``Wqkv``) and DeepSeek's multi-head latent attention
(``q_a_proj``/``q_b_proj``/``kv_a_proj_with_mqa``/``kv_b_proj``, with float norms between) are linear
layers like any other. Convolution kernels (Mamba-style ``conv1d``, LFM2's short conv) and norms stay float.

Mixture-of-experts blocks (Mixtral, Qwen-MoE, DeepSeek-V2/V3, OLMoE, GraniteMoE, GLM-4-MoE, GPT-OSS,
...): transformers 5 stores the experts of one block fused in 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``; or transposed, with biases, interleaved, or not gated, as the experts class's
``use_experts_implementation`` flags say). We split such a module into a :class:`SplitExperts` that
holds one ``nn.Linear`` per expert and projection (``experts.gate_up_proj.<e>`` / ``experts.down_proj.<e>``)
and computes the very same routed forward (checked against the fused module's own forward on random
tokens when splitting real weights). Every expert's layer is then an ordinary linear layer: calibrated
on the tokens routed to it, quantized to a :class:`~rvqllm.nn.QuantizedLinear`, stored and sized like
any other layer. Design choice: per-expert modules rather than one stacked 3-D quantized tensor, so that
the checkpoint format, the size accounting and the kernels need nothing MoE-specific. Shared experts
are plain MLPs. The router (``gate``/``router``/``shared_expert_gate`` beside ``experts``, and any linear
inside it, e.g. HunYuan's ``gate.wg``) is small and sensitive and stays unquantized, with its buffers
(DeepSeek's ``e_score_correction_bias``). Experts in a layout we cannot split (DBRX's 2-D ``w1/v1/w2``
``[E * I, H]``, a post-expert norm, a forward the flags do not describe) raise :class:`RVQError` naming
the module, unless ``skip`` names it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

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


#: Names of MoE routers: a linear layer that is, or lies inside, a child with one of these names of a
#: module that has ``experts`` (``mlp.gate``, ``mlp.router``, ``mlp.gate.wg`` in HunYuan-MoE).
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def _default_gate(self: nn.Module, h: Tensor) -> Tensor:
    """transformers' default gated activation: ``act_fn(gate) * up`` on ``[gate rows; up rows]``."""
    gate, up = h.chunk(2, dim=-1)
    return self.act_fn(gate) * up


class SplitExperts(nn.Module):
    """Fused MoE experts as one linear layer per expert and projection; same routing and math.

    Children: ``gate_up_proj[e]`` (``H -> 2I``, rows in the fused layout's order: gate rows then up
    rows, or interleaved) or, for non-gated experts, ``up_proj[e]`` (``H -> I``); and ``down_proj[e]``
    (``I -> H``); each an ``nn.Linear`` with the fused biases if any (before quantization) or a
    ``QuantizedLinear`` (after). The fused module's other children (``act_fn``) and plain attributes
    (``alpha``, ``limit``...) are kept, and its own ``_apply_gate`` (GPT-OSS's clamped, interleaved
    SwiGLU...) computes the gate, so the math is the fused module's. Forward takes
    ``hidden_states [T, H]``, ``top_k_index [T, k]`` int64 and ``top_k_weights [T, k]`` like the
    transformers 5 experts modules and returns ``[T, H]``.
    """

    def __init__(self, num_experts: int, act_fn: nn.Module | None, *, gated: bool = True, apply_gate=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.gated = gated
        self._gate_fn = apply_gate or _default_gate
        if gated:
            self.gate_up_proj = nn.ModuleList()
        else:
            self.up_proj = nn.ModuleList()
        self.down_proj = nn.ModuleList()

    @property
    def in_proj(self) -> nn.ModuleList:
        """The per-expert input projections: ``gate_up_proj``, or ``up_proj`` in non-gated experts."""
        return self.gate_up_proj if self.gated else self.up_proj

    @classmethod
    def from_fused(cls, fused: nn.Module) -> SplitExperts:
        """Split a fused experts module (see :func:`fused_experts_problem`); works on the meta device too."""
        gated = getattr(fused, "has_gate", True)
        in_name = "gate_up_proj" if gated else "up_proj"
        transposed = getattr(fused, "is_transposed", False)
        params = dict(fused.named_parameters(recurse=False))
        split = cls(params[in_name].shape[0], getattr(fused, "act_fn", None), gated=gated,
                    apply_gate=getattr(type(fused), "_apply_gate", None))
        for k, v in vars(fused).items():  # plain attributes a custom gate reads (alpha, limit, ...)
            if not k.startswith("_") and k != "training" and not isinstance(v, nn.Module | Tensor) \
                    and not hasattr(split, k):
                setattr(split, k, v)
        for k, child in fused.named_children():
            if not hasattr(split, k):
                split.add_module(k, child)
        for pname, target in ((in_name, split.in_proj), ("down_proj", split.down_proj)):
            weight, bias = params[pname], params.get(f"{pname}_bias")
            for e in range(split.num_experts):
                w = weight[e].T if transposed else weight[e]
                lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
                if w.device.type != "meta":
                    with torch.no_grad():
                        lin.weight.copy_(w)
                        if bias is not None:
                            lin.bias.copy_(bias[e])
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
            h = self.in_proj[e](hidden_states[tok])
            h = self._gate_fn(self, h) if self.gated else self.act_fn(h)
            y = self.down_proj[e](h) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def fused_experts_problem(module: nn.Module) -> str | None:
    """``None`` if ``module`` is a fused experts module we can split, else why not (for the error).

    Only called on modules holding 3-D parameters. Supported: the transformers 5 experts layouts
    (``use_experts_implementation`` flags): ``gate_up_proj [E, 2I, H]`` (or ``up_proj [E, I, H]`` when
    ``has_gate`` is false) and ``down_proj [E, H, I]``, or both ``[E, in, out]`` when ``is_transposed``;
    optional ``<name>_bias [E, out]`` when ``has_bias``; gate and up concatenated or interleaved (the
    module's ``_apply_gate`` reads them); an ``act_fn`` unless the module has its own ``_apply_gate``.
    Not supported: ``has_post_expert_norm``, or any other parameter.
    """
    params = {n: p for n, p in module.named_parameters(recurse=False)}
    name = type(module).__name__
    gated = getattr(module, "has_gate", True)
    transposed = getattr(module, "is_transposed", False)
    in_name = "gate_up_proj" if gated else "up_proj"
    expected = {in_name, "down_proj"}
    if getattr(module, "has_bias", False):
        expected |= {f"{in_name}_bias", "down_proj_bias"}
    if set(params) != expected:
        return f"{name} holds 3-D parameters {sorted(params)}; rvqllm splits only {'/'.join(sorted(expected))} experts"
    if getattr(module, "has_post_expert_norm", False):
        return f"{name} has has_post_expert_norm=True, a fused-experts layout rvqllm does not split"
    if not hasattr(module, "act_fn") and (not gated or not hasattr(type(module), "_apply_gate")):
        return f"{name} has no act_fn, so rvqllm cannot tell its activation"
    up, dn = params[in_name], params["down_proj"]
    if up.dim() != 3 or dn.dim() != 3:
        return f"{name} has {in_name} {tuple(up.shape)} / down_proj {tuple(dn.shape)}, not 3-D"
    if transposed:  # [E, in, out]: the math below on [E, out, in]
        up, dn = up.transpose(1, 2), dn.transpose(1, 2)
    e, i2, h = up.shape
    if dn.shape != (e, h, i2 // 2 if gated else i2) or gated and i2 % 2:
        want = "[E, 2I, H] / [E, H, I]" if gated else "[E, I, H] / [E, H, I]"
        return f"{name} has {in_name} {tuple(params[in_name].shape)} / down_proj {tuple(params['down_proj'].shape)}, " \
               f"not {want}{' transposed' if transposed else ''}"
    for pname, out in ((in_name, i2), ("down_proj", h)):
        b = params.get(f"{pname}_bias")
        if b is not None and tuple(b.shape) != (e, out):
            return f"{name} has {pname}_bias {tuple(b.shape)}, not {(e, out)}"
    return None


def _split_mismatch(fused: nn.Module, split: SplitExperts) -> str | None:
    """Run the fused and the split experts on a few random tokens (every expert hit); why they differ, or
    ``None``. Catches a forward that does something the layout flags do not say. Not on the meta device."""
    lin = split.in_proj[0]
    w = lin.weight
    e = split.num_experts
    k = min(2, e)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(e, lin.in_features, generator=gen).to(w.device, w.dtype)
    idx = ((torch.arange(e)[:, None] + torch.arange(k)[None]) % e).to(w.device)
    weights = torch.rand(e, k, generator=gen).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            want = fused(x, idx, weights).float()
            got = split(x, idx, weights).float()
    except Exception as err:  # noqa: BLE001 - any failure means we cannot vouch for the split
        why = " ".join(str(err).split())[:200]
        return f"{type(fused).__name__}'s forward could not be checked against its split ({type(err).__name__}: {why})"
    tol = 1e-3 if w.dtype == torch.float32 else 3e-2
    if got.shape != want.shape or not torch.isfinite(got).all() \
            or (got - want).abs().max() > tol * want.abs().max().clamp_min(1e-6):
        return f"{type(fused).__name__}'s forward computes something else than its experts split into linear layers"
    return None


def _has_3d_params(module: nn.Module) -> bool:
    """Whether ``module`` holds 3-D parameters of its own: fused experts, or a layout we do not know.
    Convolutions (Mamba/short-conv ``conv1d`` kernels ``[C, 1, K]``) are not experts and stay float."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def _skipped(name: str, skip: list[str] | None) -> bool:
    return bool(skip) and any(s and s in name for s in skip)


def split_fused_experts(root: nn.Module, only_under: list[str] | None = None, *, skip: list[str] | None = None,
                        prefix: str = "") -> list[str]:
    """Replace every fused experts module under ``root`` by a :class:`SplitExperts`, in place.

    ``only_under``: split only modules some of these qualified names lie inside (used when loading a
    checkpoint, whose layer names say which experts were quantized). ``skip``: leave alone modules
    whose qualified name (``prefix.name``) contains one of these strings (the layers not to quantize).
    On a real (not meta) module the split is checked to compute what the fused module computes.
    Returns the names replaced. Raises :class:`RVQError` naming the module class when 3-D parameters
    are in a layout we do not know or the check fails.
    """
    replaced = []
    for name, module in list(root.named_modules()):
        if isinstance(module, SplitExperts) or not _has_3d_params(module):
            continue
        if only_under is not None and not any(n.startswith(f"{name}.") for n in only_under):
            continue
        full = f"{prefix}.{name}" if prefix and name else prefix or name
        if _skipped(full, skip):
            continue
        problem = fused_experts_problem(module)
        split = None if problem else SplitExperts.from_fused(module)
        if split is not None and not split.in_proj[0].weight.is_meta:
            problem = _split_mismatch(module, split)
        if problem:
            raise RVQError(
                f"{problem} (module {full or type(root).__name__}): this architecture is not understood; "
                "quantize it with these modules in `skip`, or open an issue with the model id"
            )
        set_module(root, name, split)
        replaced.append(name)
    return replaced


def _is_router(block: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in ROUTER_NAMES and hasattr(block.get_submodule(".".join(parts[:i])), "experts"):
            return True
    return False


def _unsplit_expert_weights(block: nn.Module, prefix: str, skip: list[str]) -> None:
    """Refuse a module named ``experts`` whose weights are neither linear layers nor a fused layout we
    split (DBRX's ``experts.mlp.w1/v1/w2``, 2-D ``[E * I, H]``): they would silently stay unquantized."""
    for name, module in block.named_modules():
        if name.rpartition(".")[2] != "experts" or isinstance(module, SplitExperts):
            continue
        full = f"{prefix}.{name}"
        if _skipped(full, skip):
            continue
        in_linears = {id(p) for m in module.modules() if is_linear(m) for p in m.parameters()}
        loose = [n for n, p in module.named_parameters() if id(p) not in in_linears]
        if loose:
            raise RVQError(
                f"{type(module).__name__} (module {full}) keeps its expert weights in parameters {loose[:3]} that "
                "are neither linear layers nor a fused gate_up_proj/down_proj layout: rvqllm cannot split them; "
                "quantize it with this module in `skip`, or open an issue with the model id"
            )


def find_linears(block: nn.Module, prefix: str, skip: list[str]) -> dict[str, nn.Module]:
    """Linear layers of ``block`` by qualified name (``prefix.sub.name``), minus names containing any of ``skip``.

    Fused MoE experts in ``block`` are first split in place into per-expert linear layers
    (:func:`split_fused_experts`, same math); MoE routers are left out (see :data:`ROUTER_NAMES`).
    Raises :class:`RVQError` for expert weights in a layout that cannot be split (unless skipped).
    """
    split_fused_experts(block, skip=skip, prefix=prefix)
    _unsplit_expert_weights(block, prefix, skip)
    found = {}
    for name, module in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if is_linear(module) and not _is_router(block, name) and not _skipped(full, skip):
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


@contextmanager
def only_weight_grads(root: nn.Module, layers: Iterable[nn.Module] = ()) -> Iterator[None]:
    """Within: of ``root``'s parameters only the ``weight`` of each of ``layers`` takes gradients. After:
    every parameter's ``requires_grad`` as it was, and no ``.grad`` left on any."""
    params = list(root.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in layers:
            m.weight.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.grad = None
            p.requires_grad_(f)
