"""Layer-level ablation of the RVQ coding techniques on real layers of the reference model.

Captures the input Hessians of the linear layers of two decoder blocks of SmolLM2-135M (16 calibration
sequences x 256 tokens from the calibration splits, fp model), then codes each layer with several
settings and prints the relative output error ``tr(E H E^T) / tr(W H W^T)`` (E = W - What) and the CPU
time (process time, so other load on the machine does not count).

    python scripts/bench_layer_techniques.py [--blocks 3 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from rvqllm.arch import find_blocks, find_linears, linear_weight
from rvqllm.calibration import HessianCollector, capture_block_inputs, run_block
from rvqllm.data import calibration_tokens, load_text
from rvqllm.models import load_model
from rvqllm.rvq import quantize_weight

SETTINGS = {  # name -> quantize_weight keyword arguments on top of the code shape
    "diag-weighted k-means, greedy": dict(error_feedback=False, beam=1),
    "+ error feedback": dict(error_feedback=True, beam=1),
    "+ error feedback + beam 8": dict(error_feedback=True, beam=8),
    "+ error feedback + beam 8 + 2 codebook re-fits": dict(error_feedback=True, beam=8, refits=2),
    "+ error feedback + beam 8 + rotation": dict(error_feedback=True, beam=8, rotate=True),
}
SHAPES = {"2bit (d8 S2 b8)": (8, 2, 8), "3bit (d8 S3 b8)": (8, 3, 8), "4bit (d4 S2 b8)": (4, 2, 8)}


def capture(blocks_wanted: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    model, tok = load_model("reference")
    calib = calibration_tokens([load_text(t, "calib") for t in ("kjv", "shakespeare")], tok, 16, 256, 0)
    prefix, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], [calib[i : i + 8] for i in range(0, 16, 8)])
    out = {}
    for i in range(max(blocks_wanted) + 1):
        if i in blocks_wanted:
            layers = find_linears(blocks[i], f"{prefix}.{i}", [])
            with HessianCollector(layers) as col:
                with torch.no_grad():
                    for inp in inputs:
                        col.new_pass()
                        blocks[i](inp.hidden, **inp.kwargs)
            out.update({n: (linear_weight(m).detach().clone(), col.hessians[n].clone()) for n, m in layers.items()})
        inputs = run_block(blocks[i], inputs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[3, 7])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = capture(args.blocks)
    print(f"{len(layers)} layers of blocks {args.blocks}; mean relative output error over them; CPU seconds in total\n")
    print("| code | technique | rel. output error | vs greedy | CPU s |")
    print("|---|---|---|---|---|")
    for shape_name, (d, s, b) in SHAPES.items():
        base = None
        for name, kw in SETTINGS.items():
            errs, t0 = [], time.process_time()
            for w, h in layers.values():
                q = quantize_weight(w, h, vector_dim=d, stages=s, bits=b, **kw)
                e = (q.dequantize() - w).double()
                errs.append(float(torch.trace(e @ h @ e.T) / torch.trace(w.double() @ h @ w.double().T)))
            cpu = time.process_time() - t0
            mean = sum(errs) / len(errs)
            base = base or mean
            print(f"| {shape_name} | {name} | {mean:.5f} | {mean / base:.3f} | {cpu:.1f} |", flush=True)


if __name__ == "__main__":
    main()
