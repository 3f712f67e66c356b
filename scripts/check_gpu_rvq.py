"""Code whole random layers on a GPU with the 2bit preset's RVQ settings: time, peak memory, CPU ratio.

Runs ``quantize_weight`` (vector_dim 8, 2 stages x 8 bits, beam 8, error feedback, rotation, 20 k-means
iterations on 64 points per codeword) on random weights with a random SPD Hessian ``X^T X`` (``X``: 2*in
tokens with uneven column scales, a few outlier columns), all on ``cuda``:

* ``4096 x 4096``   (a Llama-3-8B attention projection),
* ``14336 x 4096``  (weight ``[out, in]`` of gate/up_proj: many rows),
* ``4096 x 14336``  (down_proj: the ``[14336, 14336]`` float64 Hessian, 1.6 GB),

the ``4096 x 4096`` case on ``cuda`` a second time (the GPU path must be run-to-run deterministic), and
last (it is the slowest part: a minute or more) the ``4096 x 4096`` case on the CPU with the same inputs,
for the speed ratio. For each run it prints the seconds, ``torch.cuda.max_memory_allocated`` (and the
peak above the inputs) and the relative output error ``tr(E H E^T) / tr(W H W^T)`` (``E = W - What``).
Without CUDA it prints one line and exits 0.

    python scripts/check_gpu_rvq.py [--skip-cpu] [--only 4096x4096 ...]

Needs only torch (the ``rvqllm`` package's other dependencies are not imported if they are missing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

PRESET = dict(vector_dim=8, stages=2, bits=8, beam=8, error_feedback=True, rotate=True, kmeans_iters=20,
              kmeans_points=64, hessian_weighted=True, refits=0, seed=1234)
SHAPES = {"4096x4096": (4096, 4096), "14336x4096": (14336, 4096), "4096x14336": (4096, 14336)}


def load_quantize_weight():
    """``rvqllm.rvq.quantize_weight`` from this checkout; the RVQ math needs torch only, so when the full
    package cannot be imported (no transformers on the machine), only its ``rvq`` subpackage is loaded."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    try:
        from rvqllm.rvq import quantize_weight
    except ImportError:
        for name in [m for m in sys.modules if m == "rvqllm" or m.startswith("rvqllm.")]:
            del sys.modules[name]
        import types

        stub = types.ModuleType("rvqllm")
        stub.__path__ = [str(root / "rvqllm")]
        sys.modules["rvqllm"] = stub
        from rvqllm.rvq import quantize_weight
    return quantize_weight


def make_layer(out: int, inp: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``[out, in]`` float32 weight and an SPD ``[in, in]`` float64 Hessian, built on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, device=device) * 0.02
    w *= torch.rand(out, 1, generator=gen, device=device) + 0.5
    scale = torch.exp(torch.randn(inp, generator=gen, device=device) * 0.5)
    scale[torch.randperm(inp, generator=gen, device=device)[: max(1, inp // 512)]] *= 20.0  # outlier columns
    h = torch.zeros(inp, inp, dtype=torch.float64, device=device)
    tokens, chunk = 2 * inp, 4096
    for t0 in range(0, tokens, chunk):  # accumulated like HessianCollector: fp32 products, fp64 sum
        x = torch.randn(min(chunk, tokens - t0), inp, generator=gen, device=device) * scale
        h.add_(x.T @ x)
        del x
    return w, h


def relative_error(w: torch.Tensor, what: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(E H E^T) / tr(W H W^T)`` in float64, on the inputs' device (row chunks)."""
    num = den = 0.0
    for r0 in range(0, w.shape[0], 1024):
        wr = w[r0 : r0 + 1024].double()
        er = wr - what[r0 : r0 + 1024].double()
        num += float(((er @ h) * er).sum())
        den += float(((wr @ h) * wr).sum())
    return num / den


def run(quantize_weight, w: torch.Tensor, h: torch.Tensor, label: str) -> tuple[object, float]:
    device = w.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    q = quantize_weight(w, h, **PRESET)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else 0  # read before the error check allocates
    where = {t.device for t in (q.codes, q.codebooks, q.scales, q.signs) if t is not None}
    err = relative_error(w, q.dequantize(), h)
    line = f"{label:<26} {seconds:8.2f} s   rel. output error {err:.5f}   results on {sorted(map(str, where))}"
    if cuda:
        line += f"   max_memory_allocated {peak / 2**30:6.2f} GiB ({(peak - base) / 2**30:.2f} GiB above the inputs)"
    print(line, flush=True)
    return q, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-cpu", action="store_true", help="no CPU run of the 4096x4096 case")
    ap.add_argument("--only", nargs="*", choices=list(SHAPES), help="the CUDA shapes to run (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"check_gpu_rvq: no CUDA device (torch {torch.__version__}); nothing to check")
        return 0
    quantize_weight = load_quantize_weight()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {torch.get_num_threads()} CPU threads; "
          f"settings {PRESET}", flush=True)
    w0, h0 = make_layer(64, 256, 0, "cuda")  # warm-up: CUDA context, cuBLAS / cuSOLVER handles
    quantize_weight(w0, h0, **PRESET)
    torch.cuda.synchronize()
    del w0, h0

    cpu_case = None  # the 4096x4096 inputs and CUDA result, for the CPU run last (the slowest part)
    for name in args.only or list(SHAPES):
        out, inp = SHAPES[name]
        w, h = make_layer(out, inp, 1, "cuda")
        q, seconds = run(quantize_weight, w, h, f"cuda {name} (out x in)")
        if name == "4096x4096":
            q2, _ = run(quantize_weight, w, h, "cuda 4096x4096 again")
            same = all(torch.equal(a, b) for a, b in ((q.codes, q2.codes), (q.codebooks, q2.codebooks),
                                                       (q.scales, q2.scales)))
            print(f"cuda rerun bit-identical: {same}", flush=True)
            cpu_case = (w.cpu(), h.cpu(), q.codes.cpu(), seconds)
            del q2
        del w, h, q
        torch.cuda.empty_cache()
    if cpu_case is not None and not args.skip_cpu:
        w, h, cuda_codes, cuda_seconds = cpu_case
        qc, cpu_seconds = run(quantize_weight, w, h, "cpu  4096x4096 (out x in)")
        agree = float((qc.codes == cuda_codes).float().mean())
        print(f"cpu / cuda time: {cpu_seconds / cuda_seconds:.1f}x   codes equal to the CUDA run's: "
              f"{100 * agree:.1f}% (float rounding differs between devices)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
