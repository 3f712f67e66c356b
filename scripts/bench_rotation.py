"""Layer-level measurement of Hadamard rotations (rvqllm.rvq.rotation) on real layers.

Reads a file of captured layers ``{name: (W [out, in] float32, H [in, in] float64)}`` (H = sum of x^T x
over calibration tokens), codes every layer with each preset's code shape exactly as the pipeline does
(beam 8, error feedback, Hessian-weighted k-means), plain and rotated, and prints the relative output
error ``tr(E H E^T) / tr(W H W^T)`` with ``E = W - What`` in the original basis, and CPU seconds
(process time: other load on the machine does not count).

Variants: ``plain``; ``rot-in bN`` (inputs rotated, Hadamard blocks of at most N); ``rot-in+out bN``
(rows rotated too: ``R_o^T W R_i`` is coded and ``y = R_o (What'' x')``; the output error is invariant
under ``R_o``, so it is measured the same way).

    python scripts/bench_rotation.py /tmp/layers_h.pt [--presets 2bit 3bit 4bit] [--variants ...]
        [--no-error-feedback] [--json out.json]

To capture such a file, see ``capture`` in scripts/bench_layer_techniques.py.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rvqllm.config import RVQConfig
from rvqllm.rvq import quantize_weight
from rvqllm.rvq import rotation as rot

VARIANTS = {  # name -> (rotate inputs, rotate outputs, max block)
    "plain": (False, False, 0),
    "rot-in b64": (True, False, 64),
    "rot-in b256": (True, False, 256),
    "rot-in b512": (True, False, 512),
    "rot-in+out b256": (True, True, 256),
}


def rel_error(w: torch.Tensor, what: torch.Tensor, h: torch.Tensor) -> float:
    e = (w - what).double()
    wd = w.double()
    return float(torch.trace(e @ h @ e.T) / torch.trace(wd @ h @ wd.T))


def code(w: torch.Tensor, h: torch.Tensor, cfg: RVQConfig, seed: int, variant: tuple[bool, bool, int]) -> torch.Tensor:
    """The reconstruction of ``w`` (original basis) under one variant."""
    rot_in, rot_out, max_block = variant
    kw = dict(vector_dim=cfg.vector_dim, stages=cfg.stages, bits=cfg.bits, kmeans_iters=cfg.kmeans_iters,
              kmeans_points=cfg.kmeans_points, beam=cfg.beam_width, hessian_weighted=cfg.hessian_weighted,
              error_feedback=cfg.error_feedback, seed=seed)
    if not rot_in:
        return quantize_weight(w, h, **kw).dequantize()
    if not rot_out:
        return quantize_weight(w, h, rotate=True, rotation_max_block=max_block, **kw).dequantize()
    out = w.shape[0]
    so, bo = rot.random_signs(out, seed + 1), rot.block_size(out, max_block)
    w2 = rot.rotate(w.T.contiguous(), so, bo).T.contiguous()  # R_o^T W
    what2 = quantize_weight(w2, h, rotate=True, rotation_max_block=max_block, **kw).dequantize()
    return rot.unrotate(what2.T.contiguous(), so, bo).T  # R_o What''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layers", help="torch file {name: (W, H)}")
    ap.add_argument("--presets", nargs="+", default=["2bit", "3bit", "4bit"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--json", help="write per-layer errors and CPU seconds here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-error-feedback", action="store_true", help="code without error feedback (diagonal weighting only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = torch.load(args.layers)
    results: dict = {}
    print(f"{len(layers)} layers; relative output error tr(EHE^T)/tr(WHW^T), E in the original basis\n")
    print("| preset | variant | mean rel. error | mean of per-layer ratios vs plain | ratio of means | "
          "layers better | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        cfg = RVQConfig.load(preset)
        if args.no_error_feedback:
            cfg = cfg.replace(error_feedback=False)
        res = results[preset] = {}
        for vname in args.variants:
            errs, t0 = {}, time.process_time()
            for i, (name, (w, h)) in enumerate(layers.items()):
                errs[name] = rel_error(w, code(w, h, cfg, cfg.seed * 100_003 + i, VARIANTS[vname]), h)
            cpu = time.process_time() - t0
            res[vname] = {"errors": errs, "cpu_s": cpu}
            mean = sum(errs.values()) / len(errs)
            base = res.get("plain")
            if base is not None:
                ratios = [errs[n] / base["errors"][n] for n in errs]
                better = sum(r < 1 for r in ratios)
                base_mean = sum(base["errors"].values()) / len(errs)
                cmp = f"{sum(ratios) / len(ratios):.3f} | {mean / base_mean:.3f} | {better}/{len(ratios)}"
            else:
                cmp = "- | - | -"
            print(f"| {preset} | {vname} | {mean:.5f} | {cmp} | {cpu:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
