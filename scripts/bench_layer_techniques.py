"""Layer-level ablation of the RVQ coding techniques on real layers of the reference model.

Captures the input Hessians of the linear layers of two decoder blocks of SmolLM2-135M (16 calibration
sequences x 256 tokens from the calibration splits, fp model), then codes each layer with several
settings and prints the relative output error ``tr(E H E^T) / tr(W H W^T)`` (E = W - What) and the CPU
time (process time, so other load on the machine does not count).

    python scripts/bench_layer_techniques.py [--blocks 3 7] [--threads 1] [--sharing [--big]]
    python scripts/bench_layer_techniques.py --trellis [--trellis-bits 12 14 16] [--trellis-luts 5 8]
    python scripts/bench_layer_techniques.py --beams 1 2 4 8 [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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
#: code shapes at the same 2 bits per weight of codes that only pay with shared codebooks (per layer their
#: codebooks would cost 2.5 bpw for 1 x 2**16 at d 8, 0.5 bpw for 4 x 256 at d 16 on a 576 x 576 layer)
BIG_KW = {
    "universal 1 x 65,536 (d 8, int16 codes), k-means on a unit Gaussian": dict(vector_dim=8, stages=1, bits=16),
    "universal 4 x 256 (d 16, beam 8), k-means on a unit Gaussian": dict(vector_dim=16, stages=4, bits=8),
}


def gaussian_codebook(k: int, d: int, points: int, iters: int, seed: int = 5) -> torch.Tensor:
    """``[k, d]`` codebook k-means-trained on a unit Gaussian (:func:`rvqllm.rvq.universal.gaussian_codebook`):
    the packaged ``gaussian-65536`` when the recipe is its own, else trained and cached under
    ``~/.cache/rvqllm/bench`` (minutes per iteration on one core at 4 M points)."""
    from rvqllm.rvq.universal import GAUSSIAN_RECIPE, load_shared_codebook
    from rvqllm.rvq.universal import gaussian_codebook as train

    if dict(entries=k, vector_dim=d, points=points, iters=iters, seed=seed) == GAUSSIAN_RECIPE:
        return load_shared_codebook("gaussian-65536", 1, 16, 8)[0].float()
    path = Path.home() / ".cache" / "rvqllm" / "bench" / f"gauss-k{k}-d{d}-n{points}-i{iters}-s{seed}.pt"
    if path.exists():
        return torch.load(path)
    centers = train(k, d, points, iters, seed, log=lambda line: print(line, flush=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(centers, path)
    return centers


def universal_codebooks(stages: int, bits: int, d: int, points: int, iters: int) -> torch.Tensor:
    """``[stages, 2**bits, d]`` codebooks k-means-trained on a unit Gaussian (no layer's data): one stage
    above ``BLOCKED_ABOVE`` entries by :func:`gaussian_codebook` (``points`` vectors, ``iters`` Lloyd
    iterations), otherwise residual k-means on ``64 * 2**bits`` vectors (``learn_codebooks``)."""
    from rvqllm.rvq.kmeans import BLOCKED_ABOVE
    from rvqllm.rvq.residual import learn_codebooks

    k = 1 << bits
    if stages == 1 and k > BLOCKED_ABOVE:
        return gaussian_codebook(k, d, points, iters)[None]
    g = torch.randn(k * 64, d, generator=torch.Generator().manual_seed(5))
    return learn_codebooks(g, torch.ones_like(g), stages, k, 20, 0, 64)


def gaussian_mse(codebooks: torch.Tensor, beam: int, n: int = 65536) -> float:
    """Held-out MSE per dimension of ``codebooks [S, K, d]`` on ``n`` fresh unit-Gaussian vectors."""
    from rvqllm.rvq.residual import encode_rvq_chunked

    x = torch.randn(n, codebooks.shape[-1], generator=torch.Generator().manual_seed(99))
    codes = encode_rvq_chunked(x, codebooks, beam)
    xhat = codebooks[torch.arange(codebooks.shape[0])[None, :], codes].sum(1)
    return float(((x - xhat) ** 2).mean())


def sharing(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], big: bool, points: int, iters: int) -> None:
    """Per-layer codebooks against shared ones (issue 13's technique 2), the 2bit preset's coding: each
    layer coded with its own k-means codebooks, with those of the same kind of layer in another of the
    blocks (q_proj of block 3 for q_proj of block 7, ...), and with one universal codebook pair k-means-
    trained on a unit Gaussian (rotated, row-normalised weights are near Gaussian). With ``big``, also
    the shapes of :data:`BIG_KW` with universal Gaussian codebooks (``points`` training vectors, ``iters``
    Lloyd iterations for the 65,536-entry one), and every universal codebook's held-out MSE on the
    Gaussian itself."""
    own = {n: quantize_weight(w, h, **SHARED_KW) for n, (w, h) in layers.items()}
    gaussian = universal_codebooks(2, 8, 8, points, iters)
    universal = {"universal 2 x 256 (d 8, beam 8), k-means on a unit Gaussian": (gaussian, SHARED_KW)}
    if big:
        for name, shape in BIG_KW.items():
            cb = universal_codebooks(shape["stages"], shape["bits"], shape["vector_dim"], points, iters)
            universal[name] = (cb, {**SHARED_KW, **shape})

    def kind(name: str) -> str:  # model.layers.3.self_attn.q_proj -> q_proj
        return name.rsplit(".", 1)[-1]

    rows = {"own 2 x 256 (d 8, beam 8, per layer)": [], "another block's 2 x 256, same kind": []}
    rows.update({name: [] for name in universal})
    seconds = dict.fromkeys(rows, 0.0)
    for n, (w, h) in layers.items():
        other = next(m for m in layers if m != n and kind(m) == kind(n))
        rows["own 2 x 256 (d 8, beam 8, per layer)"].append(_rel_error(w, h, own[n]))
        rows["another block's 2 x 256, same kind"].append(
            _rel_error(w, h, quantize_weight(w, h, codebooks=own[other].codebooks, **SHARED_KW)))
        for name, (cb, kw) in universal.items():
            t0 = time.process_time()
            q = quantize_weight(w, h, codebooks=cb, **kw)
            seconds[name] += time.process_time() - t0
            rows[name].append(_rel_error(w, h, q))
    print("| codebooks (error feedback, rotation, damp 0.1; 2 bits per weight of codes) | rel. output error | vs own "
          "| Gaussian MSE held out | coding CPU s |")
    print("|---|---|---|---|---|")
    base = sum(rows["own 2 x 256 (d 8, beam 8, per layer)"]) / len(layers)
    for name, errs in rows.items():
        mean = sum(errs) / len(errs)
        mse = f"{gaussian_mse(universal[name][0], universal[name][1]['beam']):.4f}" if name in universal else "–"
        cpu = f"{seconds[name]:.1f}" if name in universal else "–"
        print(f"| {name} | {mean:.5f} | {mean / base:.3f} | {mse} | {cpu} |")


def trellis_rows(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], state_bits: list[int],
                 gains: list[float], luts: list[int]) -> None:
    """The bitshift trellis as a layer coder (issue 13's technique 3; :mod:`rvqllm.rvq.trellis_layer`)
    against the `2bit` preset's RVQ coding (:data:`SHARED_KW`), both on the same rotated weight with the
    same damp and error feedback: for each ``L``, the computed codewords at each gain, then each state's
    codeword from a ``2**Q``-entry table of Gaussian quantiles by its hash, for each ``Q`` in ``luts``
    (:func:`rvqllm.rvq.trellis.lut_index`). bpw counts codes, fp16 row scales and codebooks or tables
    (the computed codewords need none; the rotation signs, the same for both, are left out)."""
    from rvqllm.rvq import trellis
    from rvqllm.rvq.trellis_layer import quantize_weight_trellis

    weights = sum(w.numel() for w, _ in layers.values())
    rows = []
    errs, bits, t0 = [], 0, time.process_time()
    for w, h in layers.values():
        q = quantize_weight(w, h, **SHARED_KW)
        errs.append(_rel_error(w, h, q))
        bits += q.codes.numel() * SHARED_KW["bits"] + q.codebooks.numel() * 16 + q.scales.numel() * 16
    rows.append(("RVQ 2 x 256, d 8, beam 8 (the `2bit` preset's code)", errs, bits, time.process_time() - t0))
    for sb in state_bits:
        variants = [(f"trellis L={sb}, k=2, computed codewords, gain {g}", g, None, 0) for g in gains]
        for lb in luts:
            values = trellis.gaussian_lut(lb)[trellis.lut_index(torch.arange(1 << sb), lb)]
            variants.append((f"trellis L={sb}, k=2, {1 << lb}-entry table by hash", 1.0, values, 16 << lb))
        for name, g, values, table_bits in variants:
            errs, bits, t0 = [], 0, time.process_time()
            for w, h in layers.values():
                q = quantize_weight_trellis(w, h, state_bits=sb, step_bits=2, gain=g, damp=SHARED_KW["damp"],
                                            values=values)
                errs.append(_rel_error(w, h, q))
                bits += q.code_bits() + q.scales.numel() * 16 + table_bits
            rows.append((name, errs, bits, time.process_time() - t0))
            print(f"  {name}: {sum(errs) / len(errs):.5f}", flush=True)
    print(f"{len(layers)} layers; mean relative output error; bpw = codes + scales + codebooks\n")
    print("| code (rotation, error feedback, damp 0.1) | rel. output error | vs RVQ | bpw | coding CPU s |")
    print("|---|---|---|---|---|")
    base = sum(rows[0][1]) / len(rows[0][1])
    for name, errs, bits, cpu in rows:
        mean = sum(errs) / len(errs)
        print(f"| {name} | {mean:.5f} | {mean / base:.3f} | {bits / weights:.3f} | {cpu:.1f} |", flush=True)


#: the 2bit-fast preset's coding (light k-means), whose beam width --beams varies
FAST_KW = dict(vector_dim=8, stages=2, bits=8, kmeans_iters=10, kmeans_points=16, error_feedback=True, rotate=True,
               damp=0.1)


def beam_rows(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], beams: list[int], repeats: int) -> None:
    """`2bit-fast`'s coding (:data:`FAST_KW`) at each beam width: mean relative output error and CPU seconds
    for all layers, the fastest of ``repeats`` timed passes after one untimed warm-up pass."""
    for w, h in layers.values():  # warm-up: first calls of each op, allocator
        quantize_weight(w, h, beam=beams[0], **FAST_KW)
    print(f"{len(layers)} layers; `2bit-fast`'s coding (10 k-means iterations on 16 points per codeword, rotation, "
          f"error feedback, damp 0.1); CPU s = fastest of {repeats}\n")
    print("| beam | rel. output error | vs beam 1 | CPU s | vs beam 1 |")
    print("|---|---|---|---|---|")
    base = None
    for beam in beams:
        cpu = float("inf")
        for _ in range(repeats):
            errs, t0 = [], time.process_time()
            for w, h in layers.values():
                errs.append(_rel_error(w, h, quantize_weight(w, h, beam=beam, **FAST_KW)))
            cpu = min(cpu, time.process_time() - t0)
        mean = sum(errs) / len(errs)
        base = base or (mean, cpu)
        print(f"| {beam} | {mean:.5f} | {mean / base[0]:.3f} | {cpu:.1f} | {cpu / base[1]:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[3, 7])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sharing", action="store_true",
                    help="only the shared-codebook comparison (per-layer / another block's / universal Gaussian)")
    ap.add_argument("--big", action="store_true",
                    help="with --sharing: also 1 x 65,536 (d 8) and 4 x 256 (d 16) universal Gaussian codebooks")
    ap.add_argument("--big-points", type=int, default=4_000_000,
                    help="training vectors of the 65,536-entry Gaussian codebook")
    ap.add_argument("--big-iters", type=int, default=6, help="its Lloyd iterations")
    ap.add_argument("--trellis", action="store_true",
                    help="only the bitshift trellis coder against the 2bit preset's RVQ coder")
    ap.add_argument("--trellis-bits", type=int, nargs="+", default=[12, 14, 16], help="trellis state bits L")
    ap.add_argument("--trellis-gains", type=float, nargs="+", default=[1.0], help="factors on its codewords")
    ap.add_argument("--trellis-luts", type=int, nargs="*", default=[],
                    help="also codewords from 2**Q-entry tables of Gaussian quantiles, for each Q given")
    ap.add_argument("--beams", type=int, nargs="+", default=[],
                    help="only `2bit-fast`'s coding at these beam widths (error and CPU time)")
    ap.add_argument("--repeats", type=int, default=3, help="with --beams: timed passes per width (fastest kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = capture(args.blocks)
    if args.beams:
        beam_rows(layers, args.beams, args.repeats)
        return
    if args.sharing:
        sharing(layers, args.big, args.big_points, args.big_iters)
        return
    if args.trellis:
        trellis_rows(layers, args.trellis_bits, args.trellis_gains, args.trellis_luts)
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
