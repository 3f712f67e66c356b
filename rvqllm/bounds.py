"""Bounded work from an untrusted ``config.json``: every size a config declares answers to the bytes present.

A config can declare any number of blocks, experts or positions; building a model from it costs time
and memory in proportion to what it *declares*, before any tensor is compared with it. A checkpoint (or
a model folder to quantize) from a stranger is therefore sized against its safetensors headers first,
whose tensor count and byte size are known from a few KiB read:

1. :func:`check_declared_counts` on the raw JSON, before ``transformers`` sees it: every integer
   under a key that counts layers or experts (``num_hidden_layers``, ``n_layer``, ``num_experts``,
   ``n_routed_experts``, ...) is at most the number of tensors in the files: each such unit holds at
   least one tensor of its own. (Some configs build per-layer lists in their constructor.)
2. :func:`build_skeleton` builds the model twice. First entirely on the meta device (buffers too: no
   memory at all) while global registration hooks count every module, parameter and buffer created
   and stop the build past ``8 × tensors + 10,000`` of them: the work before a refusal is bounded by
   the files, not by the config. The non-persistent buffers this skeleton declares (rotary tables,
   masks: tensors a model computes rather than loads) must fit in the files' size. Only then is the
   skeleton built again with real buffers (``accelerate.init_empty_weights``: parameters on meta), under
   the same count, to be returned, after the caller's ``check`` of the meta one against the headers.

Afterwards the caller compares the skeleton's tensors with the headers (shapes, dtypes) before reading
any tensor data (:func:`rvqllm.validate.validate_checkpoint`, :class:`rvqllm.source.ShardSource`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from .errors import RVQError

#: keys whose integer value counts layers, blocks or experts (``num_hidden_layers``, ``n_layer``,
#: ``moe_num_experts``...; not e.g. Qwen2's ``max_window_layers``, an index that may pass the count)
COUNT_KEY = re.compile(r"(^|_)(num|n)_(\w*_)?(layers?|experts?|blocks?)$", re.IGNORECASE)
#: registrations (modules + parameters + buffers) allowed per tensor in the files, and in any case
PER_TENSOR, FLOOR = 8, 10_000
#: bytes of computed (non-persistent) buffers allowed beyond the files' size
BUFFER_SLACK = 1 << 20


def _counts(obj: Any, path: str = "") -> list[tuple[str, int]]:
    """``(dotted key, value)`` of every integer under a counting key, in nested dicts and lists."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            where = f"{path}.{k}" if path else str(k)
            if type(v) is int and COUNT_KEY.search(str(k)):
                found.append((where, v))
            elif isinstance(v, dict | list):
                found += _counts(v, where)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:64]):  # configs nest objects in short lists at most
            if isinstance(v, dict):
                found += _counts(v, f"{path}[{i}]")
    return found


def check_declared_counts(config: dict, n_tensors: int, label: str, fix: str) -> None:
    """Refuse a raw ``config.json`` dict that counts more layers/experts than ``n_tensors`` tensors can hold.

    ``label`` names the folder in the message, ``fix`` says what to do."""
    rest = {k: v for k, v in config.items() if k != "quantization_config"}  # its specs meet the tensors later
    for key, value in _counts(rest):
        if value > n_tensors:
            raise RVQError(f"{label}/config.json declares {key}={value}, more than the {n_tensors} tensors its "
                           f"weights hold: the config does not describe these files; {fix}")


class _TooLarge(BaseException):  # not an Exception: no `except Exception` in a model's code swallows it
    pass


@contextmanager
def _counted(limit: int):
    """Raise :class:`_TooLarge` from inside any module construction past ``limit`` registrations."""
    from torch.nn.modules import module as M

    count = [0]

    def tick(*_: Any) -> None:
        count[0] += 1
        if count[0] > limit:
            raise _TooLarge

    handles = [M.register_module_module_registration_hook(tick), M.register_module_parameter_registration_hook(tick),
               M.register_module_buffer_registration_hook(tick)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def computed_buffer_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s non-persistent buffers (computed at construction, never stored)."""
    persistent = set(model.state_dict(keep_vars=True))
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in persistent)


def build_skeleton(hf_config: Any, *, n_tensors: int, n_bytes: int, label: str, fix: str,
                   dtype: torch.dtype = torch.float32, check: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_config(hf_config)`` with its parameters on the meta device, built
    only if its size answers to files of ``n_tensors`` tensors and ``n_bytes`` bytes (module doc).

    ``check`` is called with the all-meta skeleton before the real one is built: the place to compare
    its tensors with the files' headers, so that no parameter of a size the files do not hold is ever
    allocated (not even as untouched memory). Raises :class:`RVQError` naming ``label`` and ``fix``
    when the sizes do not answer, or when transformers cannot build the model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    limit = PER_TENSOR * n_tensors + FLOOR

    def build(all_meta: bool) -> nn.Module:
        try:
            with ExitStack() as stack:
                stack.enter_context(_counted(limit))
                stack.enter_context(init_empty_weights(include_buffers=all_meta))
                if all_meta:
                    stack.enter_context(torch.device("meta"))  # what constructors compute, too
                return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)
        except _TooLarge:
            raise RVQError(f"{label}/config.json declares a model of more than {limit:,} modules and tensors, far "
                           f"more than the {n_tensors} tensors its weights hold: {fix}") from None
        except RVQError:
            raise
        except Exception as err:  # a config's constructor may raise anything (its own validators included)
            first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:200]
            raise RVQError(f"{label}/config.json does not describe a causal LM transformers can build ({first}): "
                           f"{fix}") from None

    sized = build(all_meta=True)
    computed = computed_buffer_bytes(sized)
    if computed > n_bytes + BUFFER_SLACK:
        raise RVQError(f"{label}/config.json declares {computed:,} bytes of computed buffers (positions, masks), "
                       f"more than its {n_bytes:,}-byte weights could ever need: {fix}")
    if check is not None:
        check(sized)
    del sized
    return build(all_meta=False)
