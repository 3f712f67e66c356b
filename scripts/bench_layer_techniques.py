"""Layer-level ablation of the RVQ coding techniques on real layers of the reference model.

Captures the input Hessians of the linear layers of two decoder blocks of SmolLM2-135M (16 calibration
sequences x 256 tokens from the calibration splits, fp model), then codes each layer with several
settings and prints the relative output error ``tr(E H E^T) / tr(W H W^T)`` (E = W - What) and the CPU
time (process time, so other load on the machine does not count).

    python scripts/bench_layer_techniques.py [--blocks 3 7] [--threads 1] [--sharing]
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


def _rel_error(w: torch.Tensor, h: torch.Tensor, q) -> float:
    e = (q.dequantize() - w).double()
    return float(torch.trace(e @ h @ e.T) / torch.trace(w.double() @ h @ w.double().T))


#: the 2bit preset's coding (before any tuning), for the sharing comparison
SHARED_KW = dict(vector_dim=8, stages=2, bits=8, error_feedback=True, beam=8, rotate=True, damp=0.1)


def sharing(layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Per-layer codebooks against shared ones (issue 13's technique 2), the 2bit preset's coding: each
    layer coded with its own k-means codebooks, with those of the same kind of layer in another of the
    blocks (q_proj of block 3 for q_proj of block 7, ...), and with one universal codebook pair k-means-
    trained on a unit Gaussian (rotated, row-normalised weights are near Gaussian)."""
    from rvqllm.rvq.residual import learn_codebooks

    own = {n: quantize_weight(w, h, **SHARED_KW) for n, (w, h) in layers.items()}
    g = torch.randn(256 * 64, 8, generator=torch.Generator().manual_seed(5))
    gaussian = learn_codebooks(g, torch.ones_like(g), 2, 256, 20, 0, 64)

    def kind(name: str) -> str:  # model.layers.3.self_attn.q_proj -> q_proj
        return name.rsplit(".", 1)[-1]

    rows = {"own (per layer)": [], "another block's, same kind": [], "universal (unit Gaussian)": []}
    for n, (w, h) in layers.items():
        other = next(m for m in layers if m != n and kind(m) == kind(n))
        rows["own (per layer)"].append(_rel_error(w, h, own[n]))
        rows["another block's, same kind"].append(
            _rel_error(w, h, quantize_weight(w, h, codebooks=own[other].codebooks, **SHARED_KW)))
        rows["universal (unit Gaussian)"].append(_rel_error(w, h, quantize_weight(w, h, codebooks=gaussian, **SHARED_KW)))
    print("| codebooks (2bit coding: d8 S2 b8, error feedback, beam 8, rotation, damp 0.1) | rel. output error | vs own |")
    print("|---|---|---|")
    base = sum(rows["own (per layer)"]) / len(layers)
    for name, errs in rows.items():
        mean = sum(errs) / len(errs)
        print(f"| {name} | {mean:.5f} | {mean / base:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[3, 7])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sharing", action="store_true",
                    help="only the shared-codebook comparison (per-layer / another block's / universal Gaussian)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = capture(args.blocks)
    if args.sharing:
        sharing(layers)
        return
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
