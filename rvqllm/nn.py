"""QuantizedLinear: an ``nn.Linear`` stand-in that holds RVQ buffers and calls one op."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .kernels import dequantize, rvq_linear
from .kernels.cpu_build import warn_once
from .kernels.trellis_op import trellis_linear
from .rvq import RVQWeight, code_dtype, pack, rotation, trellis
from .validate import TRELLIS_KEY  # the spec field that marks a trellis-coded layer: its state bits L

#: attribute of the model that holds the shared codebook (:class:`SharedCodebooks`); its tensor is stored
#: once in a checkpoint, as ``SHARED_KEY``
SHARED_NAME = "rvq_shared"
SHARED_KEY = f"{SHARED_NAME}.codebooks"


class SharedCodebooks(nn.Module):
    """The one codebook every layer with ``shared_codebooks`` decodes with (config ``shared_codebook``).

    A child of the model (``model.rvq_shared``), so ``model.to()`` moves it once and the checkpoint stores
    its buffer ``codebooks [stages, 2**bits, vector_dim]`` fp16 once. Layers on another device than this
    module (a model spread over devices) read a copy made once per device (again after an in-place change).
    """

    def __init__(self, codebooks: Tensor) -> None:
        super().__init__()
        self.register_buffer("codebooks", codebooks)
        self._copies: dict[torch.device, tuple[tuple, Tensor]] = {}

    def on(self, device: torch.device) -> Tensor:
        """The codebook on ``device``: the buffer itself there, else a cached copy."""
        cb = self.codebooks
        if cb.device == device or cb.is_meta:
            return cb
        try:
            key = (cb._version, cb.data_ptr(), cb.device)
        except RuntimeError:  # an inference-mode tensor keeps no version: copy every call
            return cb.to(device)
        hit = self._copies.get(device)
        if hit is None or hit[0] != key:
            hit = (key, cb.to(device))
            self._copies[device] = hit
        return hit[1]


def attach_shared(model: nn.Module, codebooks: Tensor) -> SharedCodebooks:
    """Give ``model`` its shared codebook (``model.rvq_shared``), replacing any earlier one; returns it."""
    owner = SharedCodebooks(codebooks)
    setattr(model, SHARED_NAME, owner)
    return owner


class QuantizedLinear(nn.Module):
    """A linear layer whose weight stays compressed in memory and is decoded on the fly.

    Buffers (all saved in the checkpoint):
        codes: ``[out_features, in_groups, stages]`` uint8 (bits <= 8) or int16.
        codebooks: ``[stages, 2**bits, vector_dim]`` fp16.
        scales: ``[out_features]`` fp16.
        bias: ``[out_features]`` (the original layer's dtype), or absent.
        signs: ``[in_groups * vector_dim]`` int8 ±1, only in a rotated layer (``hadamard_block > 0``).

    A rotated layer holds the codes of ``W R`` (``R`` = sign flip + block Hadamard over the padded width,
    :mod:`rvqllm.rvq.rotation`); its forward computes ``x' = x R`` (zero-padded to the coded width) and
    runs the same op on ``x'``. A layer without rotation has no ``signs`` buffer and no ``hadamard_block``
    spec field, so its checkpoint entry is exactly what it was before rotations existed.

    A layer built with ``shared=True`` (spec ``shared_codebooks``) has no ``codebooks`` buffer of its own:
    ``codebooks`` reads the model's :class:`SharedCodebooks`, which :meth:`share` attaches.

    ``weight`` exists for model code that reads a linear layer's matrix instead of calling it (Mamba's
    ``dt_proj.weight @ x``; the CUDA fast paths of Mamba hybrids): it decodes the whole ``[out, in]``
    matrix on every read, in ``compute_dtype`` (the dtype the model computes in: the float layer's, or the
    one the checkpoint was loaded in; ``.to(dtype)`` / ``.half()`` move it like a float parameter), and
    says so once per process. Calling the layer never decodes the whole matrix.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        vector_dim: int,
        stages: int,
        bits: int,
        bias: bool,
        bias_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        hadamard_block: int = 0,
        shared: bool = False,
        codes_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.shared = shared
        self._owner_ref: tuple[SharedCodebooks, ...] = ()  # a tuple: not registered as a submodule
        self.in_features = in_features
        self.out_features = out_features
        self.vector_dim = vector_dim
        self.stages = stages
        self.bits = bits
        self.hadamard_block = hadamard_block
        self.compute_dtype = bias_dtype
        groups = -(-in_features // vector_dim)
        self.register_buffer("codes", torch.zeros(codes_shape or (out_features, groups, stages), dtype=code_dtype(bits),
                                                  device=device))
        if not shared:
            self.register_buffer(
                "codebooks", torch.zeros(stages, 1 << bits, vector_dim, dtype=torch.float16, device=device)
            )
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        if hadamard_block:
            self.register_buffer("signs", torch.ones(groups * vector_dim, dtype=torch.int8, device=device))
        else:
            self.signs = None

    @classmethod
    def from_spec(cls, spec: dict, *, bias_dtype: torch.dtype = torch.float16,
                  device: torch.device | str | None = None) -> QuantizedLinear:
        """An empty layer (buffers to be loaded) from a checkpoint's per-layer spec (see :meth:`spec`): a
        :class:`TrellisLinear` where the spec names a trellis code (``trellis_state_bits``)."""
        if TRELLIS_KEY in spec and cls is QuantizedLinear:
            return TrellisLinear.from_spec(spec, bias_dtype=bias_dtype, device=device)
        return cls(spec["in_features"], spec["out_features"], vector_dim=spec["vector_dim"], stages=spec["stages"],
                   bits=spec["bits"], bias=spec["bias"], bias_dtype=bias_dtype, device=device,
                   hadamard_block=spec.get("hadamard_block", 0), shared=bool(spec.get("shared_codebooks")))

    @classmethod
    def from_rvq(cls, q: RVQWeight, bits: int, bias: Tensor | None,
                 dtype: torch.dtype | None = None) -> QuantizedLinear:
        """Build from an :class:`RVQWeight` (``bits`` is the code width) and the original bias; ``dtype``:
        the float layer's (``compute_dtype``; default the bias's, else fp16)."""
        out, _, stages = q.codes.shape
        layer = cls(
            q.in_features,
            out,
            vector_dim=q.codebooks.shape[-1],
            stages=stages,
            bits=bits,
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float16,
            hadamard_block=q.rotation_block if q.signs is not None else 0,
        )
        return layer._fill(pack(q.codes, bits), q.codebooks, q.scales, q.signs, bias, dtype)

    def _fill(self, codes: Tensor, codebooks: Tensor, scales: Tensor, signs: Tensor | None, bias: Tensor | None,
              dtype: torch.dtype | None) -> QuantizedLinear:
        """Copy a freshly coded layer's stored tensors in (fp16 codebooks and scales); returns ``self``."""
        if signs is not None:
            self.signs.copy_(signs)
        self.codes.copy_(codes)
        self.codebooks.copy_(codebooks.half())
        self.scales.copy_(scales.half())
        if bias is not None:
            self.bias.copy_(bias.detach())
        if dtype is not None:
            self.compute_dtype = dtype
        return self

    def __getattr__(self, name: str):
        if name == "codebooks" and self.__dict__.get("shared"):
            ref = self.__dict__.get("_owner_ref")
            if not ref:
                raise RuntimeError("this QuantizedLinear uses a shared codebook that was never attached: "
                                   "call layer.share(model.rvq_shared) (rvqllm.load does)")
            return ref[0].on(self._buffers["codes"].device)
        return super().__getattr__(name)

    @property
    def shared_owner(self) -> SharedCodebooks | None:
        """The :class:`SharedCodebooks` this layer decodes with, or ``None`` (its own codebooks)."""
        return self._owner_ref[0] if self._owner_ref else None

    def share(self, owner: SharedCodebooks) -> QuantizedLinear:
        """Decode with ``owner``'s codebook from now on (its shape must be this layer's); the layer's own
        ``codebooks`` buffer, if any, is dropped. Returns the layer."""
        want = (self.stages, 1 << self.bits, self.vector_dim)
        if tuple(owner.codebooks.shape) != want:
            raise ValueError(f"shared codebook of shape {list(owner.codebooks.shape)} for a layer coded with "
                             f"{list(want)} (stages, 2**bits, vector_dim)")
        self._buffers.pop("codebooks", None)
        self.shared = True
        self._owner_ref = (owner,)
        return self

    def write_codebooks(self, values: Tensor) -> None:
        """Overwrite the codebooks this layer decodes with (the shared ones, for a sharing layer)."""
        target = self._owner_ref[0].codebooks if self._owner_ref else self.codebooks
        with torch.no_grad():
            target.copy_(values.to(device=target.device, dtype=target.dtype))

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.cuda()``...: the buffers, and ``compute_dtype`` as a float parameter's."""
        out = super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.codes.device))
        if isinstance(probe, Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return out

    @property
    def weight(self) -> Tensor:
        """``[out_features, in_features]`` in ``compute_dtype``, decoded now (a slow path: see the class)."""
        warn_once("weight-read", "model code reads a quantized layer's .weight (the whole matrix) instead of "
                  f"calling the layer ({self.out_features}x{self.in_features} here): rvqllm decodes it on every "
                  "read, which is slower and holds a dense copy meanwhile; the output is still correct")
        return self.dequantized_weight().to(self.compute_dtype)

    @property
    def op_in_features(self) -> int:
        """The input width the op sees: ``in_features``, or the coded (padded) width in a rotated layer."""
        return self.codes.shape[1] * self.vector_dim if self.signs is not None else self.in_features

    def rotate_input(self, x: Tensor) -> Tensor:
        """``x R`` (zero-padded to the coded width) in a rotated layer; ``x`` itself otherwise.

        Computed in float32 on CPU for 16-bit inputs (CPU half matmuls are slow), else in ``x.dtype``;
        returned in ``x.dtype``."""
        if self.signs is None:
            return x
        pad = self.op_in_features - x.shape[-1]
        xf = x.float() if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) else x
        if pad:
            xf = torch.nn.functional.pad(xf, (0, pad))
        xr = rotation.rotate(xf, self.signs, self.hadamard_block)
        return xr if xr.dtype == x.dtype else xr.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = self.rotate_input(x)
        return rvq_linear(x, self.codes, self.codebooks, self.scales, self.bias, self.op_in_features)

    def dequantized_weight(self) -> Tensor:
        """``[out_features, in_features]`` float32 in the original basis, for tests and analysis (forward
        goes through the op)."""
        w = dequantize(self.codes, self.codebooks, self.scales, self.op_in_features)
        if self.signs is None:
            return w
        return rotation.unrotate(w, self.signs, self.hadamard_block)[:, : self.in_features]

    def spec(self) -> dict[str, int]:
        """The per-layer parameters a checkpoint stores to rebuild this module (``hadamard_block`` only
        in a rotated layer)."""
        spec = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "vector_dim": self.vector_dim,
            "stages": self.stages,
            "bits": self.bits,
            "bias": self.bias is not None,
        }
        if self.signs is not None:
            spec["hadamard_block"] = self.hadamard_block
        if self.shared:
            spec["shared_codebooks"] = True
        return spec

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, vector_dim={self.vector_dim}, "
            f"stages={self.stages}, bits={self.bits}, bias={self.bias is not None}"
            + (f", hadamard_block={self.hadamard_block}" if self.signs is not None else "")
            + (", shared_codebooks=True" if self.shared else "")
        )


class TrellisLinear(QuantizedLinear):
    """A linear layer coded by the bitshift trellis (config ``coder: trellis``), decoded on the fly.

    The weight (rotated, as every trellis layer is: ``W R``) is coded column by column, each input column
    ``j`` one walk of ``L``-bit states down the ``out`` rows, ``k`` new bits per row
    (:mod:`rvqllm.rvq.trellis_layer`); a state's codeword is entry ``lut_index(state, Q)`` of the layer's
    ``2**Q``-entry table, times the row's scale. Buffers, under the names every quantized layer stores:

        codes: ``[in_features, walk_bytes]`` uint8: the packed walks (:mod:`rvqllm.rvq.trellis`, "Packed
            walks"), ``walk_bytes = ceil((L + k (out - 1)) / 8)``.
        codebooks: ``[1, 2**Q, 1]`` fp16: the codeword table (the shape of a one-stage, ``vector_dim`` 1
            codebook, so the tuning treats it as one).
        scales: ``[out_features]`` fp16; bias as in :class:`QuantizedLinear`; signs ``[in_features]`` int8.

    The spec is a one-stage, ``vector_dim`` 1, ``bits`` Q layer's plus ``trellis_state_bits`` (``L``) and
    ``trellis_step_bits`` (``k``). Forward: ``x R``, then :func:`rvqllm.kernels.trellis_op.trellis_linear`.
    """

    def __init__(self, in_features: int, out_features: int, *, state_bits: int, step_bits: int, lut_bits: int,
                 bias: bool, bias_dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
                 hadamard_block: int = 0) -> None:
        if not 1 <= lut_bits <= 8:
            raise ValueError(f"a trellis layer's table has 2**lut_bits <= 256 entries, got lut_bits={lut_bits}")
        super().__init__(in_features, out_features, vector_dim=1, stages=1, bits=lut_bits, bias=bias,
                         bias_dtype=bias_dtype, device=device, hadamard_block=hadamard_block,
                         codes_shape=(in_features, trellis.walk_bytes(out_features, state_bits, step_bits)))
        self.state_bits = state_bits
        self.step_bits = step_bits

    @classmethod
    def from_spec(cls, spec: dict, *, bias_dtype: torch.dtype = torch.float16,
                  device: torch.device | str | None = None) -> TrellisLinear:
        return cls(spec["in_features"], spec["out_features"], state_bits=spec[TRELLIS_KEY],
                   step_bits=spec["trellis_step_bits"], lut_bits=spec["bits"], bias=spec["bias"],
                   bias_dtype=bias_dtype, device=device, hadamard_block=spec.get("hadamard_block", 0))

    @classmethod
    def from_trellis(cls, q, table: Tensor, lut_bits: int, bias: Tensor | None,
                     dtype: torch.dtype | None = None) -> TrellisLinear:
        """Build from a :class:`rvqllm.rvq.trellis_layer.TrellisWeight` coded against
        :func:`rvqllm.rvq.trellis.packed_values` of ``table [2**lut_bits]`` (its walks are packed here)."""
        n, out = q.states.shape
        if n != q.in_features:
            raise ValueError(f"a trellis layer stores unpadded columns: coded width {n} != in_features {q.in_features}")
        layer = cls(q.in_features, out, state_bits=q.state_bits, step_bits=q.step_bits, lut_bits=lut_bits,
                    bias=bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float16,
                    hadamard_block=q.rotation_block if q.signs is not None else 0)
        return layer._fill(trellis.pack_walks(q.states.cpu(), q.state_bits, q.step_bits), table.reshape(1, -1, 1),
                           q.scales, q.signs, bias, dtype)

    @property
    def op_in_features(self) -> int:
        return self.in_features

    def table_indices(self) -> Tensor:
        """``[out_features, in_features]`` int64: the table entry of every weight (decoded from the walks)."""
        return trellis.walk_indices(self.codes, self.out_features, self.state_bits, self.step_bits, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        x = self.rotate_input(x)
        return trellis_linear(x, self.codes, self.codebooks, self.scales, self.bias, self.state_bits,
                              self.step_bits, self.bits)

    def dequantized_weight(self) -> Tensor:
        w = trellis.walk_dequantize(self.codes, self.codebooks.reshape(-1), self.scales, self.state_bits,
                                    self.step_bits, self.bits)
        return w if self.signs is None else rotation.unrotate(w, self.signs, self.hadamard_block)

    def spec(self) -> dict[str, int]:
        return {**super().spec(), TRELLIS_KEY: self.state_bits, "trellis_step_bits": self.step_bits}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, state_bits={self.state_bits}, "
                f"step_bits={self.step_bits}, lut_bits={self.bits}, bias={self.bias is not None}"
                + (f", hadamard_block={self.hadamard_block}" if self.signs is not None else ""))


class _DecodedLinear(nn.Linear):
    """A quantized layer's weight decoded once (:func:`decoded_linears`); computes in its input's dtype,
    as the quantized op does."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return nn.functional.linear(x, w, b)


@contextmanager
def decoded_linears(module: nn.Module) -> Iterator[nn.Module]:
    """Within the ``with``, every :class:`QuantizedLinear` under ``module`` is a plain linear layer holding
    its weight decoded once (``[out, in]``, original basis); on exit the quantized layers are back. For
    many forward passes over one block (calibration): one decode per layer instead of one per call, no
    run-time rotation of the inputs, and the matmul is BLAS's, which ``torch.autocast`` can run in
    bfloat16. Like the quantized op it computes in its input's dtype; the weight is kept in float32 on a
    CPU (the op decodes in float32 there) and in the layer's ``compute_dtype`` elsewhere. Holds a dense
    copy of the quantized layers meanwhile (one block's float weights)."""
    swapped: list[tuple[nn.Module, str, QuantizedLinear]] = []
    try:
        with torch.no_grad():
            for parent in list(module.modules()):
                for name, child in list(parent.named_children()):
                    if not isinstance(child, QuantizedLinear):
                        continue
                    device = child.codes.device
                    dtype = torch.float32 if device.type == "cpu" else child.compute_dtype
                    dense = _DecodedLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                           device=device, dtype=dtype)
                    dense.weight.copy_(child.dequantized_weight())
                    if child.bias is not None:
                        dense.bias.copy_(child.bias)
                    dense.requires_grad_(False)
                    setattr(parent, name, dense)
                    swapped.append((parent, name, child))
        yield module
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def bind_shared(model: nn.Module) -> None:
    """Attach ``model.rvq_shared`` to every layer of ``model`` that uses a shared codebook; raise
    :class:`ValueError` when such a layer exists and the model has none."""
    owner = getattr(model, SHARED_NAME, None)
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear) and m.shared:
            if owner is None:
                raise ValueError(f"layer {name} uses a shared codebook but the model has no {SHARED_NAME}")
            m.share(owner)


def mark_quantized(model: nn.Module) -> None:
    """Set ``config._is_quantized`` on every model under ``model``, as transformers' own quantizers do
    (``from_pretrained`` with a ``quantization_config``): model code then calls a linear layer where it
    would otherwise read its ``.weight`` (Jamba's ``dt_proj``) and flash attention takes its target dtype
    from the config instead of from the first ``nn.Linear`` it finds. transformers never saves the flag."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(module, "get_input_embeddings") and hasattr(config, "to_dict"):
            config._is_quantized = True
