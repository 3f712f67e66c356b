"""Layer coders on the whole reference model, before any tuning, in memory (issue 13's technique 3).

Every decoder block, in order: the input Hessians of its linear layers are collected on the calibration
activations of the model as coded so far (as the pipeline collects them), each layer is coded, and its
weight is overwritten with the coder's reconstruction; the block then runs to give the next block's
inputs. No fine-tuning, no distillation. Then ppl-512x``windows`` on the protocol's texts
(``bench_quality``'s evaluation). Rows:

- ``rvq:NAME``: :func:`rvqllm.rvq.quantize_weight` with config NAME's code fields (``vector_dim``,
  ``stages``, ``bits``, beam, damp, rotation, error feedback, k-means settings);
- ``trellis:L``: :func:`rvqllm.rvq.trellis_layer.quantize_weight_trellis`, ``L`` state bits, 2 bits per
  step, damp ``--damp``, the computed codewords; ``trellis:L:lutQ``: the same with each state's codeword
  taken from a ``2**Q``-entry table by its hash (:func:`rvqllm.rvq.trellis.lut_index`), the table the
  Gaussian's equiprobable quantiles (:func:`rvqllm.rvq.trellis.gaussian_lut`).

The trellis has no packed checkpoint format and no decode kernel of its own yet, so both rows are
measured the same way: reconstructions in a float model (this harness). Each finished row is appended
to ``--results`` (JSON lines).

With ``--pipeline CONFIG`` a ``trellis:L`` row runs instead through ``rvqllm.quantize`` with CONFIG's
calibration and tuning (e.g. the ``2bit`` preset's distillation), its coder swapped for the trellis one:
each layer is stored as a one-stage, ``vector_dim 1`` RVQ layer whose int16 codes are the walk's states and
whose codebook is the ``2**L`` computed codewords, shared by the model (``shared_codebook``: one fp16
table, tuned by the distillation like any shared codebook). That checkpoint spends 16 bits per weight on
the states, which a packed walk (``L`` bits per column, then 2 per weight) would store in 2.04: the row's
``bpw`` is the packed one, computed (``packed_bpw``), not what this harness writes. A ``trellis:L:lutQ``
row stores instead each weight's table index as its code (``bits`` Q) and the ``2**Q``-entry table as the
layer's own codebook, which the tuning then adjusts per layer while the walks stay as coded.

    OMP_NUM_THREADS=1 python scripts/bench_coders.py --rows rvq:configs/experiments/2bit-notune.yaml \\
        trellis:12 --calib-seqs 128 --windows 64 --results out/coders.jsonl
    OMP_NUM_THREADS=1 python scripts/bench_coders.py --rows trellis:12 --pipeline configs/2bit.yaml \\
        --results out/coders.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def code_model(model, calib: torch.Tensor, code_layer, batch: int = 8) -> dict:
    """Replace every block linear's weight by ``code_layer(name, index, weight, hessian) -> (recon, bits)``,
    block by block; returns ``{"bits", "weights", "seconds"}`` over the block linears."""
    from rvqllm.arch import find_blocks, find_linears, linear_weight
    from rvqllm.calibration import HessianCollector, capture_block_inputs, run_block

    prefix, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], [calib[i : i + batch] for i in range(0, len(calib), batch)])
    bits = weights = index = 0
    t0 = time.process_time()
    for i, block in enumerate(blocks):
        layers = find_linears(block, f"{prefix}.{i}", [])
        with HessianCollector(layers) as col, torch.no_grad():
            for inp in inputs:
                col.new_pass()
                block(inp.hidden, **inp.kwargs)
        hessians = col.hessians
        for name, module in layers.items():
            w = linear_weight(module)
            recon, b = code_layer(name, index, w.detach().float(), hessians[name])
            with torch.no_grad():
                w.copy_(recon.to(w.dtype))
            bits, weights, index = bits + b, weights + w.numel(), index + 1
        del hessians, col
        inputs = run_block(block, inputs)
        print(f"block {i}: {time.process_time() - t0:.0f} CPU s", flush=True)
    return {"bits": bits, "weights": weights, "seconds": time.process_time() - t0}


def rvq_coder(cfg):
    from rvqllm.rvq import quantize_weight

    def code(name, index, w, h):
        q = quantize_weight(w, h, vector_dim=cfg.vector_dim, stages=cfg.stages, bits=cfg.bits,
                            kmeans_iters=cfg.kmeans_iters, kmeans_points=cfg.kmeans_points, beam=cfg.beam_width,
                            hessian_weighted=cfg.hessian_weighted, error_feedback=cfg.error_feedback,
                            refits=cfg.codebook_refits, seed=cfg.seed * 100_003 + index, rotate=cfg.rotate,
                            damp=cfg.hessian_damp)
        bits = q.codes.numel() * cfg.bits + q.codebooks.numel() * 16 + q.scales.numel() * 16
        return q.dequantize(), bits
    return code


def lut_table(state_bits: int, lut_bits: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(values [2**L], lut [2**Q])`` fp16-exact for a ``lutQ`` row, ``(None, None)`` otherwise."""
    from rvqllm.rvq import trellis
    from rvqllm.rvq.residual import to_fp16_exact

    if lut_bits is None:
        return None, None
    lut = to_fp16_exact(trellis.gaussian_lut(lut_bits))
    return lut[trellis.lut_index(torch.arange(1 << state_bits), lut_bits)], lut


def trellis_coder(state_bits: int, damp: float, gain: float, lut_bits: int | None):
    from rvqllm.rvq.trellis_layer import quantize_weight_trellis

    values, lut = lut_table(state_bits, lut_bits)
    table_bits = 0 if lut is None else 16 * lut.numel()  # a per-layer table; the computed codewords cost none

    def code(name, index, w, h):
        q = quantize_weight_trellis(w, h, state_bits=state_bits, step_bits=2, gain=gain, seed=index, damp=damp,
                                    values=values)
        return q.dequantize(), q.code_bits() + q.scales.numel() * 16 + table_bits
    return code


def parse_trellis(arg: str) -> tuple[int, int | None]:
    """``"12"`` → ``(12, None)``; ``"12:lut5"`` → ``(12, 5)``."""
    bits, _, lut = arg.partition(":")
    if lut and not lut.startswith("lut"):
        raise SystemExit(f"trellis:{arg}: use trellis:L or trellis:L:lutQ")
    return int(bits), int(lut[3:]) if lut else None


def packed_bpw(specs: dict[str, dict], state_bits: int, step_bits: int, lut_bits: int | None) -> dict:
    """Bits per weight of the trellis layers ``specs`` (one-stage, ``vector_dim`` 1 specs whose codes are
    states or table indices) if each column's walk were packed: ``L`` bits, then ``step_bits`` per later
    row; fp16 row scales, int8 rotation signs, and the fp16 tables: each layer's ``2**Q`` entries, or the
    shared ``2**L`` once."""
    bits = weights = 0
    for spec in specs.values():
        out, n = spec["out_features"], spec["in_features"]
        bits += n * (state_bits + (out - 1) * step_bits) + 16 * out + (8 * n if spec.get("hadamard_block") else 0)
        bits += 0 if lut_bits is None else 16 << lut_bits
        weights += out * n
    return {"bpw": (bits + (16 << state_bits if lut_bits is None else 0)) / weights, "weights": weights}


def pipeline_row(state_bits: int, lut_bits: int | None, config: str, windows: int, table_dir: Path) -> dict:
    """A ``trellis:L`` or ``trellis:L:lutQ`` row through ``rvqllm.quantize`` with ``config``'s calibration
    and tuning (module doc)."""
    import types

    import bench_quality
    from safetensors.torch import save_file

    import rvqllm.pipeline as pipeline
    from rvqllm.config import RVQConfig
    from rvqllm.reference import CALIB_TEXTS
    from rvqllm.rvq import trellis
    from rvqllm.rvq.residual import RVQWeight
    from rvqllm.rvq.trellis_layer import quantize_weight_trellis
    from rvqllm.size import model_specs

    cfg = RVQConfig.load(config).replace(vector_dim=1, stages=1, beam_width=1, codebook_refits=0)
    if lut_bits is None:
        table = trellis.codewords(torch.arange(1 << state_bits)).half().reshape(1, -1, 1).contiguous()
        table_dir.mkdir(parents=True, exist_ok=True)
        path = table_dir / f"trellis-L{state_bits}.safetensors"
        save_file({"codebooks": table}, str(path))
        cfg = cfg.replace(bits=state_bits, shared_codebook=str(path))
    else:
        cfg = cfg.replace(bits=lut_bits, shared_codebook=None)
        values, lut = lut_table(state_bits, lut_bits)
        index = trellis.lut_index(torch.arange(1 << state_bits), lut_bits)

    def coder(weight, hessian, *, seed, damp, codebooks, **_):
        table = values if lut_bits is not None else codebooks.flatten()
        q = quantize_weight_trellis(weight, hessian, state_bits=state_bits, step_bits=2, seed=seed, damp=damp,
                                    pad_to=1, values=table)
        if lut_bits is None:
            return RVQWeight(q.states.T.unsqueeze(-1).contiguous(), codebooks, q.scales, q.in_features, q.signs,
                             q.rotation_block)
        return RVQWeight(index[q.states].T.unsqueeze(-1).contiguous(), lut.reshape(1, -1, 1), q.scales,
                         q.in_features, q.signs, q.rotation_block)

    pipeline.quantize_weight = coder
    captured = {}
    original = bench_quality._evaluate

    def evaluate(model, tok, windows):  # the specs of the model as quantized, for the packed bpw
        captured.update(model_specs(model))
        return original(model, tok, windows)

    bench_quality._evaluate = evaluate
    args = types.SimpleNamespace(calib_seqs=None, calib_len=None, calib=list(CALIB_TEXTS), windows=windows,
                                 save_dir=None)
    row = bench_quality._quantized_row(cfg, args)
    packed = packed_bpw(captured, state_bits, 2, lut_bits)
    return {**row, "harness_bpw": row["bpw"], "bpw": packed["bpw"], "packed_bpw": packed["bpw"],
            "config": config}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", required=True, help="rvq:CONFIG and/or trellis:L")
    ap.add_argument("--calib-seqs", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--damp", type=float, default=0.1, help="Hessian damp of the trellis rows")
    ap.add_argument("--gain", type=float, default=1.0, help="factor on the trellis codewords")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--pipeline", default=None, metavar="CONFIG",
                    help="trellis rows through rvqllm.quantize with this config's calibration and tuning")
    ap.add_argument("--table-dir", type=Path, default=Path("out/trellis-tables"),
                    help="where --pipeline writes the trellis codeword table it shares")
    args = ap.parse_args()

    import bench_quality

    from rvqllm.config import RVQConfig
    from rvqllm.data import calibration_tokens, load_text
    from rvqllm.models import load_model
    from rvqllm.reference import CALIB_TEXTS

    for row in args.rows:
        kind, _, arg = row.partition(":")
        if args.pipeline is not None:
            if kind != "trellis":
                raise SystemExit("--pipeline runs trellis:L rows only (the presets themselves: bench_quality.py)")
            bench_quality._append(args.results, {"row": row, "pipeline": True, "windows": args.windows,
                                                 **pipeline_row(*parse_trellis(arg), args.pipeline, args.windows,
                                                                args.table_dir)})
            continue
        model, tok = load_model("reference")
        calib = calibration_tokens([load_text(t, "calib") for t in CALIB_TEXTS], tok, args.calib_seqs,
                                   args.calib_len, 0)
        if kind == "rvq":
            coder = rvq_coder(RVQConfig.load(arg))
        elif kind == "trellis":
            state_bits, lut_bits = parse_trellis(arg)
            coder = trellis_coder(state_bits, args.damp, args.gain, lut_bits)
        else:
            raise SystemExit(f"unknown row {row!r}: use rvq:CONFIG or trellis:L")
        coded = code_model(model, calib, coder)
        bench_quality._append(args.results, {
            "row": row, "damp": args.damp, "gain": args.gain, "calib": f"{args.calib_seqs}x{args.calib_len}",
            "windows": args.windows, "bpw": coded["bits"] / coded["weights"], "coding_cpu_seconds": coded["seconds"],
            "ppl": bench_quality._evaluate(model, tok, args.windows)})


if __name__ == "__main__":
    main()
