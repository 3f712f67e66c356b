"""Which checkpoint tensors make each tensor a model expects, for reading a checkpoint block by block.

transformers 5 builds some modules in another layout than checkpoints store them: a mixture-of-experts
block holds its experts fused in 3-D parameters (``mlp.experts.gate_up_proj [E, 2I, H]``,
``mlp.experts.down_proj [E, H, I]``) where hub checkpoints, and transformers' own ``save_pretrained``,
keep one matrix per expert under older names (``block_sparse_moe.experts.3.w1.weight``). transformers
converts while it loads the whole model, with its conversion mapping (renamings, then at most one
converter per key: stack the experts' matrices, concatenate gate and up). The streaming reader
(:class:`rvqllm.source.ShardSource`) never loads the whole model, so it asks that same mapping how
each expected tensor is made and makes it when its block is read.

A :class:`Recipe` names the checkpoint tensors of one expected tensor and the steps that join them.
Only the joining steps experts need are carried out (stack along a dimension, concatenate along a
dimension); a model whose mapping needs another (a reordering for rotary embeddings, a quantized
format's decoding, ...) gets an :class:`~rvqllm.errors.RVQError` naming it when its folder is opened.
Keys the mapping leaves alone map to themselves, so every checkpoint that loaded before loads the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import RVQError


@dataclass(frozen=True)
class Recipe:
    """How one tensor the model expects is made from checkpoint tensors.

    Attributes:
        sources: checkpoint tensor names, one tuple per source pattern of the converter (in the
            converter's order; within a tuple, experts in index order). A plain (renamed or not) tensor
            is ``((name,),)``.
        steps: ``("stack", dim)`` / ``("cat", dim)`` applied in order, as transformers' converter would;
            empty for a plain tensor.
        converter: the converter's description, for messages (empty for a plain tensor).
    """

    sources: tuple[tuple[str, ...], ...]
    steps: tuple[tuple[str, int], ...] = ()
    converter: str = ""

    @property
    def names(self) -> list[str]:
        """Every checkpoint tensor this recipe reads."""
        return [n for group in self.sources for n in group]

    def shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The made tensor's shape from its sources' shapes (``{checkpoint name: shape}``; headers only).

        Raises ``ValueError`` when the sources' shapes cannot be joined."""
        return self._run([[tuple(shapes[n]) for n in group] for group in self.sources],
                         lambda dim, items: _joined_shape("stack", dim, items),
                         lambda dim, items: _joined_shape("cat", dim, items))

    def make(self, tensors: dict[str, Tensor]) -> Tensor:
        """The made tensor from its sources (``{checkpoint name: tensor}``, all on one device)."""
        return self._run([[tensors[n] for n in group] for group in self.sources],
                         lambda dim, items: torch.stack(items, dim=dim),
                         lambda dim, items: torch.cat(items, dim=dim))

    def _run(self, groups: list[list], stack, cat):
        """The steps on ``groups`` (one list per source pattern): ``stack`` joins each group's items into one,
        ``cat`` joins every item of every group (in order) into one group of one."""
        for kind, dim in self.steps:
            groups = [[stack(dim, g)] for g in groups] if kind == "stack" else [[cat(dim, [t for g in groups for t in g])]]
        if len(groups) != 1 or len(groups[0]) != 1:
            raise ValueError(f"{self.converter or 'a plain tensor'} leaves {sum(map(len, groups))} tensors, not one")
        return groups[0][0]


def _joined_shape(kind: str, dim: int, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    first = shapes[0]
    if kind == "stack":
        if any(s != first for s in shapes):
            raise ValueError(f"cannot stack shapes {sorted(set(shapes))}")
        d = dim if dim >= 0 else dim + len(first) + 1
        return (*first[:d], len(shapes), *first[d:])
    d = dim if dim >= 0 else dim + len(first)
    if any(len(s) != len(first) or s[:d] + s[d + 1:] != first[:d] + first[d + 1:] for s in shapes):
        raise ValueError(f"cannot concatenate shapes {sorted(set(shapes))} along dim {dim}")
    return (*first[:d], sum(s[d] for s in shapes), *first[d + 1:])


def _mapping(model: nn.Module):
    """``(renamings, converters, rename, natural_key, supported op classes)`` from transformers, or ``None``
    when this transformers has no conversion mapping, or one whose internals differ from those this was
    written against (5.25: then every key maps to itself, and a per-expert checkpoint is refused as
    missing its fused tensors, as before)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        rename_source_key("probe.weight", renamings, converters, None, {})  # the call shape used below
    except (ImportError, TypeError, AttributeError):  # a transformers 5.x whose loading internals differ
        return None
    return renamings, converters, rename_source_key, dot_natural_key, {MergeModulelist: "stack", Concatenate: "cat"}


def plan(model: nn.Module, names: list[str], label: str) -> dict[str, Recipe]:
    """``{model tensor name: Recipe}`` for the checkpoint tensors ``names`` of ``model`` (a skeleton; may be
    on the meta device). Names that are no tensor of the model map to themselves, as they always did.

    Raises :class:`RVQError` (naming ``label``) when a tensor the model needs must be made by a step this
    reader does not carry out."""
    found = _mapping(model)
    if found is None:
        return {n: Recipe(((n,),)) for n in names}
    renamings, converters, rename, natural_key, ops = found
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    plain: dict[str, str] = {}
    collected: dict[str, tuple[object, dict[str, list[str]]]] = {}
    for name in sorted(names, key=natural_key):
        target, pattern = rename(name, renamings, converters, prefix, expected)
        if target not in expected and name in expected:  # as transformers does: keep the name, fix the prefix
            target, pattern = rename(name, [], [], base_model_prefix=prefix, meta_state_dict=expected)
        if target not in expected:
            plain.setdefault(name, name)  # no place in the model: left for the caller to report
        elif pattern is None:
            if target in plain or target in collected:
                raise RVQError(f"{label!r}: two checkpoint tensors, {plain.get(target, '?')!r} and {name!r}, both "
                               f"load into {target!r}: the checkpoint is inconsistent; re-download the model")
            plain[target] = name
        else:
            converter = next(c for c in converters if pattern in c.source_patterns)
            collected.setdefault(target, (converter, {}))[1].setdefault(pattern, []).append(name)
    recipes = {target: Recipe(((name,),)) for target, name in plain.items()}
    for target, (converter, groups) in collected.items():
        steps = []
        for op in converter.operations:
            kind = ops.get(type(op))
            if kind is None:
                raise RVQError(f"{label!r}: transformers makes {target!r} from the checkpoint with "
                               f"{type(op).__name__}, which rvqllm's streaming reader does not carry out; load "
                               "the model in memory and call rvqllm.quantize(model, ...) in Python instead")
            steps.append((kind, int(op.dim)))
        sources = tuple(tuple(groups[p]) for p in converter.source_patterns if p in groups)
        recipes[target] = Recipe(sources, tuple(steps), f"{type(converter).__name__}({converter.source_patterns})")
    return recipes
