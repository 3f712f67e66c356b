"""Universal codebooks: one codebook shared by every quantized layer of a model (config ``shared_codebook``).

After the Hadamard rotation and the per-row scales a layer's weight vectors are close to a unit Gaussian,
so one codebook trained on the Gaussian itself (no layer's data) codes every layer nearly as well as the
layer's own, and stored once it costs a model almost nothing: a 65,536-entry ``d = 8`` table is 1 MiB of
fp16 (0.08 bpw over the reference model's block linears), where per layer it would cost 2.5 bpw on a
576 x 576 layer. That buys the ``1 x 2**16`` shape (int16 codes, 2 bits per weight at ``d = 8``), whose
error on a Gaussian is well below a ``2 x 256`` residual code's (docs/RESULTS.md, session 10).

``shared_codebook`` names a built-in codebook (:data:`BUILTIN`, shipped inside the package as safetensors,
made by ``scripts/make_gaussian_codebook.py``) or a ``.safetensors`` file holding one fp16 tensor
``codebooks [stages, 2**bits, vector_dim]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import RVQError

#: built-in codebooks: name -> (file in this package, stages, bits, vector_dim)
BUILTIN = {"gaussian-65536": ("gaussian-k65536-d8.safetensors", 1, 16, 8)}
#: how the built-in Gaussian codebook was trained (``scripts/make_gaussian_codebook.py``)
GAUSSIAN_RECIPE = {"entries": 1 << 16, "vector_dim": 8, "points": 4_000_000, "iters": 6, "seed": 5}
TENSOR = "codebooks"


def builtin_shape(name: str) -> tuple[int, int, int] | None:
    """``(stages, bits, vector_dim)`` of built-in codebook ``name``, or ``None`` if it is not one."""
    entry = BUILTIN.get(name)
    return None if entry is None else entry[1:]


def shared_codebook_path(name: str) -> Path:
    """The file of ``name``: a built-in codebook's packaged file, or ``name`` itself as a path."""
    entry = BUILTIN.get(name)
    return Path(__file__).with_name(entry[0]) if entry is not None else Path(name).expanduser()


def load_shared_codebook(name: str, stages: int, bits: int, vector_dim: int) -> Tensor:
    """The fp16 ``[stages, 2**bits, vector_dim]`` codebook ``name`` names (see the module doc), checked
    against the config's code shape; raises :class:`RVQError` (one line, with the fix) otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = shared_codebook_path(name)
    fix = f"name a built-in codebook ({', '.join(BUILTIN)}) or a .safetensors file holding one fp16 tensor {TENSOR!r}"
    if not path.is_file():
        raise RVQError(f"shared_codebook {name!r}: no such file {path}: {fix}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise RVQError(f"shared_codebook {name!r}: {path} is not a readable safetensors file ({err}): {fix}") from None
    cb = tensors.get(TENSOR)
    want = (stages, 1 << bits, vector_dim)
    if cb is None or cb.dtype != torch.float16 or tuple(cb.shape) != want:
        got = "no such tensor" if cb is None else f"{cb.dtype} {list(cb.shape)}"
        raise RVQError(f"shared_codebook {name!r}: {path} must hold fp16 {TENSOR!r} of shape {list(want)} "
                       f"(stages, 2**bits, vector_dim of the config), found {got}: {fix}, or change the config")
    if not torch.isfinite(cb).all():
        raise RVQError(f"shared_codebook {name!r}: {path} holds NaN or Inf values: re-create the file")
    return cb.contiguous()


def gaussian_codebook(k: int, d: int, points: int, iters: int, seed: int = 5, log=print) -> Tensor:
    """``[k, d]`` fp16-exact codebook: Lloyd's k-means on ``points`` unit-Gaussian vectors (float32), seeded
    at ``k`` random points among them (k-means++ seeding is sequential in ``k``: hours at 65,536); the
    nearest-centre search runs tile by tile (:func:`rvqllm.rvq.kmeans.assign`). Deterministic for a seed on
    one machine and thread count. Minutes per iteration on one core at 4 M points and ``k = 65,536``."""
    from .kmeans import assign
    from .residual import to_fp16_exact

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(points, d, generator=gen)
    ones = torch.ones_like(x)
    centers = x[torch.randperm(points, generator=gen)[:k]].clone()
    for it in range(iters):
        a = assign(x, ones, centers)
        total = torch.zeros(k, d).index_add_(0, a, x)
        count = torch.bincount(a, minlength=k).float()
        centers = torch.where(count[:, None] > 0, total / count.clamp_min(1)[:, None], centers)
        if log is not None:
            log(f"  gaussian k-means k={k}: iteration {it + 1}/{iters}, "
                f"train MSE {float(((x - centers[a]) ** 2).mean()):.5f}")
    return to_fp16_exact(centers)
