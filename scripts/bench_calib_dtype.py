"""Calibration passes in float32 against bfloat16 (``calib_dtype``), on the reference model.

Two measurements in one run, both on real calibration text through the real blocks:

1. **Speed** of the two passes calibration makes through every block (same inputs, interleaved):
   the Hessians' pass over the float block, and the pass that feeds the next block through the quantized
   block, the latter as it ran before session 25 (the quantized layers' op: decode per call, inputs
   rotated at run time) and as it runs now (``rvqllm.nn.decoded_linears``: decoded once, plain BLAS),
   each in float32 and under bfloat16 autocast.
2. **What bfloat16 Hessians cost in coding**, paired: the same block inputs give a float32 Hessian
   and a bfloat16-pass Hessian; each layer is coded with each (``2bit-fast``'s code, the same seed) and
   both codes are judged by the float32 Hessian's output error ``tr(dW H dW^T) / tr(W H W^T)``; a third
   code from the float32 Hessian with another seed shows the seed-to-seed spread.

Usage::

    python scripts/bench_calib_dtype.py                     # 16 x 512 tokens, blocks 1 9 19 28
    python scripts/bench_calib_dtype.py --blocks 3 --sequences 8 --no-coding   # speed only
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rvqllm.arch import find_linears  # noqa: E402
from rvqllm.calibration import HessianCollector, capture_block_inputs  # noqa: E402
from rvqllm.data import calibration_tokens, load_text  # noqa: E402
from rvqllm.models import load_model  # noqa: E402
from rvqllm.nn import QuantizedLinear, decoded_linears  # noqa: E402
from rvqllm.reference import CALIB_TEXTS  # noqa: E402
from rvqllm.rvq import quantize_weight  # noqa: E402

CODE = {"vector_dim": 8, "stages": 2, "bits": 8, "kmeans_iters": 10, "kmeans_points": 16, "beam": 1,
        "rotate": True, "damp": 0.1}  # 2bit-fast's code


def _pass(block, inputs, bf16: bool) -> float:
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for inp in inputs:
            block(inp.hidden, **inp.kwargs)
    return time.perf_counter() - t0


def _quantized_copy(block) -> torch.nn.Module:
    """The block with every linear layer coded (``2bit-fast``'s code without a Hessian: speed only)."""
    q = copy.deepcopy(block)
    for parent in list(q.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                code = quantize_weight(child.weight.detach(), None, seed=0, **CODE)
                setattr(parent, name, QuantizedLinear.from_rvq(code, CODE["bits"], child.bias, torch.float32))
    return q


def _error(w: torch.Tensor, h: torch.Tensor, code) -> float:
    d = (w - code.dequantize()).double()
    wd = w.double()
    return (torch.einsum("oi,ij,oj->", d, h, d) / torch.einsum("oi,ij,oj->", wd, h, wd)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=16, help="calibration sequences (batches of 8)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 9, 19, 28])
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per variant (interleaved)")
    ap.add_argument("--no-coding", action="store_true", help="skip the paired coding check")
    args = ap.parse_args()

    model, tok = load_model("reference")
    ids = calibration_tokens([load_text(t, "calib") for t in CALIB_TEXTS], tok, args.sequences, args.seq_len, 0)
    blocks = model.model.layers
    inputs = capture_block_inputs(model, blocks[0], [ids[i:i + 8] for i in range(0, args.sequences, 8)])
    print(f"threads {torch.get_num_threads()}, {args.sequences} x {args.seq_len} tokens, native bfloat16 "
          f"{bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}")
    times = {k: 0.0 for k in ("float f32", "float bf16", "op f32", "decoded f32", "decoded bf16")}
    rows = []
    for i, blk in enumerate(blocks):
        if i in args.blocks:
            qblk = _quantized_copy(blk)
            for _ in range(args.repeats):
                times["float f32"] += _pass(blk, inputs, False)
                times["float bf16"] += _pass(blk, inputs, True)
                times["op f32"] += _pass(qblk, inputs, False)
                with decoded_linears(qblk):
                    times["decoded f32"] += _pass(qblk, inputs, False)
                    times["decoded bf16"] += _pass(qblk, inputs, True)
            if not args.no_coding:
                layers = find_linears(blk, f"model.layers.{i}", ["lm_head"])
                hs = {}
                for name, bf16 in (("f32", False), ("bf16", True)):
                    with HessianCollector(layers) as col, torch.no_grad(), \
                            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        for inp in inputs:
                            col.new_pass()
                            blk(inp.hidden, **inp.kwargs)
                    hs[name] = col.hessians
                for lname, mod in layers.items():
                    w, h32, h16 = mod.weight.detach(), hs["f32"][lname], hs["bf16"][lname]
                    errs = [_error(w, h32, quantize_weight(w, h, seed=seed, **CODE))
                            for h, seed in ((h32, 7), (h16, 7), (h32, 8))]
                    rows.append((lname, ((h16 - h32).norm() / h32.norm()).item(), *errs))
                    print(f"{lname:34s} |H_bf16 - H_f32| / |H_f32| {rows[-1][1]:.1e}   error with H_f32 {errs[0]:.5f}, "
                          f"H_bf16 {errs[1]:.5f} (x{errs[1] / errs[0]:.4f}), H_f32 other seed x{errs[2] / errs[0]:.4f}",
                          flush=True)
        with torch.no_grad():
            for inp in inputs:
                out = blk(inp.hidden, **inp.kwargs)
                inp.hidden = out[0] if isinstance(out, tuple) else out

    base = times["op f32"]
    print(f"\npasses through {len(args.blocks)} blocks x {args.repeats} (s; x = speed against the quantized op in "
          "float32, the pass that fed the next block before session 25):")
    for k, v in times.items():
        print(f"  {k:13s} {v:7.2f} s   x{base / v:.2f}")
    print(f"  bfloat16 against float32: float block x{times['float f32'] / times['float bf16']:.2f}, decoded block "
          f"x{times['decoded f32'] / times['decoded bf16']:.2f}")
    if rows:
        def geo(k: int) -> float:
            return math.exp(sum(math.log(r[k] / r[2]) for r in rows) / len(rows))

        print(f"\ncoding error, geometric mean over {len(rows)} layers: H_bf16 / H_f32 x{geo(3):.4f} (range "
              f"{min(r[3] / r[2] for r in rows):.4f}-{max(r[3] / r[2] for r in rows):.4f}); another seed "
              f"x{geo(4):.4f} (range {min(r[4] / r[2] for r in rows):.4f}-{max(r[4] / r[2] for r in rows):.4f})")


if __name__ == "__main__":
    main()
