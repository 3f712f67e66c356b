"""Make the built-in shared codebook ``gaussian-65536`` (rvqllm/rvq/gaussian-k65536-d8.safetensors).

Lloyd's k-means on unit-Gaussian vectors (:func:`rvqllm.rvq.universal.gaussian_codebook`, the recipe in
``GAUSSIAN_RECIPE``: 65,536 centres, d = 8, 4 M points, 6 iterations, seed 5); about 27 minutes at one
thread on the development CPU. Prints the held-out MSE on 65,536 fresh Gaussian vectors and whether the
result equals the file in the package (``--out`` writes it elsewhere; ``--install`` replaces the packaged one).

    OMP_NUM_THREADS=1 python scripts/make_gaussian_codebook.py --out /tmp/gauss.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from rvqllm.rvq.residual import encode_rvq_chunked
from rvqllm.rvq.universal import (
    BUILTIN,
    GAUSSIAN_RECIPE,
    TENSOR,
    gaussian_codebook,
    load_shared_codebook,
    shared_codebook_path,
)


def heldout_mse(cb: torch.Tensor, n: int = 65536) -> float:
    """MSE per dimension of ``cb [1, K, d]`` on ``n`` fresh unit-Gaussian vectors (seed 99)."""
    x = torch.randn(n, cb.shape[-1], generator=torch.Generator().manual_seed(99))
    codes = encode_rvq_chunked(x, cb.float(), 1)
    return float(((x - cb.float()[0][codes[:, 0]]) ** 2).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="write the codebook here")
    where.add_argument("--install", action="store_true", help="replace the packaged file")
    ap.add_argument("--from-tensor", type=Path, help="a torch.save'd [65536, 8] tensor made by the same recipe "
                    "(skip the training)")
    args = ap.parse_args()
    r = GAUSSIAN_RECIPE
    t0 = time.perf_counter()
    if args.from_tensor:
        centers = torch.load(args.from_tensor)
    else:
        centers = gaussian_codebook(r["entries"], r["vector_dim"], r["points"], r["iters"], r["seed"],
                                    log=lambda s: print(s, flush=True))
    cb = centers.reshape(1, r["entries"], r["vector_dim"]).half().contiguous()
    digest = hashlib.sha256(cb.numpy().tobytes()).hexdigest()
    out = shared_codebook_path("gaussian-65536") if args.install else args.out
    save_file({TENSOR: cb}, str(out), metadata={"recipe": json.dumps(r, sort_keys=True), "sha256": digest})
    packaged = shared_codebook_path("gaussian-65536")
    same = packaged.exists() and torch.equal(load_shared_codebook("gaussian-65536", *BUILTIN["gaussian-65536"][1:]), cb)
    print(json.dumps({"out": str(out), "seconds": round(time.perf_counter() - t0, 1), "sha256": digest,
                      "heldout_mse": round(heldout_mse(cb), 5), "equals_packaged": same}))


if __name__ == "__main__":
    main()
