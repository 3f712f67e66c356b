"""Where the weights of the model to quantize come from: memory, or the model's safetensors shards.

The pipeline (:mod:`rvqllm.pipeline`) asks a source for one decoder block at a time and gives it back
when the block is finished; it never needs the whole float model at once.

- :class:`MemorySource` wraps a model already built in memory (the library's ``rvqllm.quantize(model,
  ...)``, a GGUF file, mixed precision): blocks move to the working device when asked for and back to
  where the model lives when released, quantized layers and all.
- :class:`ShardSource` builds an empty skeleton (meta device) from a model folder's ``config.json`` and
  reads each block's tensors from its safetensors files (``model.safetensors.index.json`` or a single
  ``model.safetensors``) only when that block is processed; tensors stay in the checkpoint's dtype on the
  host until they reach the working device, where they are computed in float32. A released block goes
  back to the meta device (its coded form is on disk by then), so host memory holds about one float block
  plus embeddings and head, however many blocks the model has. Checkpoints in another layout than the
  one transformers builds (MoE experts stored one matrix per expert, renamed modules) are read through
  transformers' own conversion mapping, block by block (:mod:`rvqllm.keymap`).

Every tensor name, file and shape is checked against the config before any work starts (headers only).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .arch import check_causal_lm, find_blocks, find_linears, linear_weight, split_fused_experts
from .bounds import build_skeleton, check_declared_counts
from .errors import RVQError
from .keymap import Recipe, plan
from .validate import INDEX_NAME, MAX_HEADER_BYTES, WEIGHTS_NAME, config_cap, read_header_only

SINGLE_NAME = WEIGHTS_NAME  #: a model saved as one file


def _params_and_buffers(module: nn.Module) -> dict[str, Tensor]:
    """Persistent tensors of ``module`` by name (what a checkpoint stores), tied duplicates included."""
    return dict(module.state_dict(keep_vars=True))


def _assign(root: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Put ``tensors`` (by name under ``root``) into ``root``'s parameters/buffers, replacing meta tensors."""
    result = root.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:  # names were checked against the skeleton up front
        raise RVQError(f"internal: no place for tensor {result.unexpected_keys[0]!r}")


class MemorySource:
    """A model built in memory: each block visits the working device when asked for and goes back home
    (the model's device) when released."""

    streaming = False

    def __init__(self, model: nn.Module) -> None:
        check_causal_lm(model)
        self.model = model
        self.prefix, self.blocks = find_blocks(model)
        p = next(model.parameters(), None)
        self.home = p.device if p is not None else torch.device("cpu")

    def __len__(self) -> int:
        return len(self.blocks)

    def layers(self, i: int, skip: list[str]) -> dict[str, tuple[int, int]]:
        """Block ``i``'s linear layers to quantize: ``{name: (out, in)}``."""
        return _shapes(find_linears(self.blocks[i], f"{self.prefix}.{i}", skip))

    def other_bytes(self) -> int:
        """Bytes of the tensors outside the blocks, as the checkpoint will store them (16-bit)."""
        block_ids = {id(p) for p in self.blocks.parameters()}
        return 2 * sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values()
                       if id(p) not in block_ids)

    def load_rest(self, device: torch.device) -> None:
        """Everything outside the blocks (embeddings, final norm, head) onto ``device``."""
        _move_except(self.model, self.blocks, device)

    def load_block(self, i: int, device: torch.device) -> nn.Module:
        return self.blocks[i].to(device)

    def release_block(self, i: int) -> None:
        self.blocks[i].to(self.home)

    def release_rest(self) -> None:
        self.load_rest(self.home)

    def fingerprint(self) -> str:
        from .validate import tensor_digest

        h = hashlib.sha256()
        for name, t in self.model.state_dict().items():
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(bytes.fromhex(tensor_digest(t)))
        return h.hexdigest()


def _move_except(module: nn.Module, skip: nn.Module, device: torch.device) -> None:
    """``module.to(device)`` for everything under it except the subtree ``skip``."""
    if module is skip:
        return
    for child in module.children():
        _move_except(child, skip, device)
    for key, p in module._parameters.items():
        if p is not None and p.device != device:
            module._parameters[key].data = p.data.to(device)
    for key, b in module._buffers.items():
        if b is not None and b.device != device:
            module._buffers[key] = b.to(device)


class ShardSource:
    """A model folder read block by block from its safetensors files (see the module doc)."""

    streaming = True

    def __init__(self, folder: str | Path, spec: str | None = None) -> None:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        self.folder = Path(folder)
        label = spec or str(folder)
        self.files, self.headers = self._read_index(label)  # headers only: what the files hold
        self.recipes: dict[str, Recipe] = {}  # model tensor -> checkpoint tensors (set by _check_against)
        n_tensors = sum(len(h) for h in self.headers.values())
        fix = "the shards and the config disagree; re-download or re-convert the model"
        n_bytes = sum((self.folder / f).stat().st_size for f in self.headers)
        check_declared_counts(_raw_config(self.folder, config_cap(n_bytes)), n_tensors, label, fix)
        try:
            config = AutoConfig.from_pretrained(self.folder)
        except Exception as err:  # config classes validate with their own exception types
            first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:200]
            raise RVQError(f"could not read the config of {label!r}: {first}") from None
        if getattr(config, "is_encoder_decoder", False) or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise RVQError(f"{label!r} is a {type(config).__name__.removesuffix('Config')} model, not a causal LM "
                           "transformers can build with AutoModelForCausalLM: rvqllm quantizes decoder-only LMs")
        self.config = config
        source_dtype = getattr(config, "dtype", None)  # before transformers rewrites it to the compute dtype
        self.model = build_skeleton(config, n_tensors=n_tensors, n_bytes=n_bytes, label=label, fix=fix,
                                    check=lambda meta: self._check_against(meta, label))
        self.model.eval()
        self.model.rvq_source_dtype = source_dtype  # unquantized tensors are stored in it again
        check_causal_lm(self.model)
        self.prefix, self.blocks = find_blocks(self.model)
        self.model.tie_weights()
        self._pristine = [copy.deepcopy(b) for b in self.blocks]  # meta copies: layer names before any split

    def __len__(self) -> int:
        return len(self.blocks)

    # -- checks (headers only) -------------------------------------------------------------------
    def _read_index(self, label: str) -> tuple[dict[str, str], dict[str, dict]]:
        """``(tensor name -> file name, file name -> safetensors header)``."""
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                with open(index, "rb") as f:
                    data = json.loads(f.read(MAX_HEADER_BYTES + 1)[:MAX_HEADER_BYTES])
                weight_map = data["weight_map"]
                assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
            except (OSError, ValueError, KeyError, TypeError, AssertionError):
                raise RVQError(f"{index} is not a valid safetensors index (no weight_map): re-download the model") from None
        elif (self.folder / SINGLE_NAME).is_file():
            weight_map = None
        else:
            raise RVQError(f"{label!r} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}): convert it with "
                           "transformers' save_pretrained, or give a .gguf file")
        names = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
        headers: dict[str, dict] = {}
        self.header_sums: dict[str, str] = {}
        for name in names:
            if "/" in name or "\\" in name or name.startswith("."):
                raise RVQError(f"{index} names file {name!r} outside the model folder: re-download the model")
            path = self.folder / name
            if not path.is_file():
                raise RVQError(f"{label!r} is missing shard {name} (listed in {INDEX_NAME}): re-download the model")
            entries, _, digest = read_header_only(path)  # bounds-checked against the file's size
            headers[name] = entries
            self.header_sums[name] = digest
        if weight_map is None:
            weight_map = dict.fromkeys(headers[SINGLE_NAME], SINGLE_NAME)
        for tensor, name in weight_map.items():
            if tensor not in headers[name]:
                raise RVQError(f"{name} lacks tensor {tensor!r} that {INDEX_NAME} puts there: the shards do not "
                               "match their index; re-download the model")
        return weight_map, headers

    def _check_against(self, model: nn.Module, label: str) -> None:
        """Every parameter the config implies is in the shards with its shape (a tied one once is enough),
        and every buffer that is there has its shape. ``model`` is the all-meta skeleton: nothing of a
        size the shards do not hold has been allocated yet (:func:`rvqllm.bounds.build_skeleton`)."""
        model.tie_weights()
        self.recipes = plan(model, list(self.files), label)
        expected = _params_and_buffers(model)
        present = {id(t) for n, t in expected.items() if n in self.recipes}
        shapes = {n: self.headers[f][n].shape for n, f in self.files.items()}
        for name, t in expected.items():
            recipe = self.recipes.get(name)
            if recipe is None:
                if id(t) in present or not isinstance(t, nn.Parameter):
                    continue  # tied to a tensor that is there, or a buffer the model computes
                raise RVQError(f"{label!r}: the checkpoint lacks tensor {name!r} that its config.json implies: "
                               "the shards and the config disagree; re-download or re-convert the model")
            where = f"{recipe.names[0]!r} in {self.files[recipe.names[0]]}" if not recipe.steps else \
                f"{name!r} (made of {len(recipe.names)} checkpoint tensors such as {recipe.names[0]!r})"
            try:
                shape = recipe.shape(shapes)
            except ValueError as err:
                raise RVQError(f"{label!r}: tensor {where} cannot be assembled ({err}): the checkpoint is "
                               "inconsistent; re-download the model") from None
            if shape != tuple(t.shape):
                raise RVQError(f"{label!r}: tensor {where} has shape {list(shape)} but config.json makes it "
                               f"{list(t.shape)}: the shards and the config disagree")

    # -- the protocol ------------------------------------------------------------------------------
    def layers(self, i: int, skip: list[str]) -> dict[str, tuple[int, int]]:
        """Block ``i``'s linear layers to quantize: ``{name: (out, in)}`` (from the meta skeleton)."""
        return _shapes(find_linears(copy.deepcopy(self._pristine[i]), f"{self.prefix}.{i}", skip))

    def other_bytes(self) -> int:
        """Bytes of the checkpoint's tensors outside the blocks, as stored."""
        pre = f"{self.prefix}."
        return sum(self.headers[self.files[n]][n].end - self.headers[self.files[n]][n].begin
                   for target, recipe in self.recipes.items() if not target.startswith(pre) for n in recipe.names)

    def _read(self, names: list[str], device: torch.device) -> dict[str, Tensor]:
        """The model tensors ``names`` (keys of :attr:`recipes`) on ``device``, floating ones in float32."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            for source in self.recipes[n].names:
                by_file.setdefault(self.files[source], []).append(source)
        raw = {}
        for file, group in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                for n in group:
                    raw[n] = f.get_tensor(n).to(device)  # in the checkpoint's dtype until it is on the device
        out = {}
        for n in names:
            recipe = self.recipes[n]
            t = recipe.make(raw)
            for source in recipe.names:  # each source is read for one tensor only: free it as soon as used
                del raw[source]
            out[n] = t.float() if t.is_floating_point() else t
        return out

    def load_rest(self, device: torch.device) -> None:
        block_prefix = f"{self.prefix}."
        names = [n for n in _params_and_buffers(self.model) if not n.startswith(block_prefix) and n in self.recipes]
        _assign(self.model, self._read(names, device))
        for name, b in list(self.model.named_buffers()):  # non-persistent buffers (rotary inv_freq...)
            if not name.startswith(block_prefix) and b.device != device:
                mod, _, key = name.rpartition(".")
                self.model.get_submodule(mod)._buffers[key] = b.to(device)
        self.model.tie_weights()
        left = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(block_prefix)]
        if left:
            raise RVQError(f"{self.folder}: the checkpoint lacks tensor {left[0]!r}: re-download the model")

    def load_empty_block(self, i: int, skip: list[str] | None = None) -> nn.Module:
        """Block ``i`` as a fresh meta skeleton (fused experts split, so quantized layer names exist; those
        in ``skip``, the layers not quantized, left fused as they were)."""
        self.blocks[i] = block = copy.deepcopy(self._pristine[i])
        split_fused_experts(block, skip=skip, prefix=f"{self.prefix}.{i}")
        return block

    def load_block(self, i: int, device: torch.device) -> nn.Module:
        """Block ``i`` with its float weights read from the shards, on ``device`` in float32."""
        self.blocks[i] = block = copy.deepcopy(self._pristine[i])  # a fresh meta block (drops any earlier state)
        pre = f"{self.prefix}.{i}."
        names = [n for n in self.recipes if n.startswith(pre)]
        tensors = {n.removeprefix(pre): t for n, t in self._read(names, device).items()}
        _assign(block, tensors)
        for name, b in list(block.named_buffers()):
            if b.device != device:
                mod, _, key = name.rpartition(".")
                block.get_submodule(mod)._buffers[key] = b.to(device)
        left = [n for n, p in block.named_parameters() if p.is_meta]
        if left:
            raise RVQError(f"{self.folder}: the checkpoint lacks tensor {pre}{left[0]!r}: re-download the model")
        return block

    def release_block(self, i: int) -> None:
        self.blocks[i] = self.blocks[i].to("meta")

    def release_rest(self) -> None:
        pass

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.headers):
            h.update(f"{name}|{(self.folder / name).stat().st_size}|".encode())
            h.update(self.header_sums[name].encode())
        h.update(json.dumps(self.config.to_dict(), sort_keys=True, default=str).encode())
        return h.hexdigest()


def _raw_config(folder: Path, cap: int) -> dict:
    """A model folder's ``config.json`` as a dict (at most ``cap`` bytes), before transformers reads it."""
    path = folder / "config.json"
    try:
        with open(path, "rb") as f:
            raw = f.read(cap + 1)
        config = json.loads(raw) if len(raw) <= cap else None
    except OSError as err:
        raise RVQError(f"{path} cannot be read ({err.strerror or err}): check the file") from None
    except ValueError:
        raise RVQError(f"{path} is not valid JSON: re-download the model") from None
    if not isinstance(config, dict):
        what = f"larger than {cap:,} bytes, more than a config of these weights needs" if raw and len(raw) > cap \
            else "not a JSON object"
        raise RVQError(f"{path} is {what}: re-download the model")
    return config


def _shapes(layers: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    return {n: tuple(linear_weight(m).shape) for n, m in layers.items()}
