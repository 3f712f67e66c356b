"""Tuning in float32 against bfloat16 (``tune_dtype``): time per step and the KL reached, same run.

The reference model is quantized once with the ``2bit-fast`` code and no distillation; then the
whole-model distillation runs from that same state once per dtype, on the same batches against the same
teacher (the float model's top-64), one epoch each. Printed: seconds per Adam step (median over the
epoch's steps is not available from outside, so: the epoch's wall time over its steps), their ratio, and the KL before/after measured in float32 by the distillation itself (what decides what is kept).

    OMP_NUM_THREADS=2 python scripts/bench_tune_dtype.py --sequences 16
    OMP_NUM_THREADS=1 python scripts/bench_tune_dtype.py --product-only   # one product, seconds

Either way it first times one product as the tuning does it: ``F.linear`` of ``[4096, 576]`` by a
``[1536, 576]`` weight and back through it, forward and backward, float32 against ``torch.autocast``
to bfloat16 (median of 5 after warm-up).

Where the CPU has no native bfloat16 (no AVX512-BF16 / AMX) the bfloat16 row is emulated and slower:
the script says so (the warning of ``rvqllm.finetune``) and prints the ratio all the same.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def _product_seconds(bf16: bool, n: int = 5) -> float:
    x = torch.randn(4096, 576, requires_grad=True)
    w = torch.randn(1536, 576, requires_grad=True)
    times = []
    for _ in range(n + 2):  # two warm-up runs
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = torch.nn.functional.linear(torch.nn.functional.linear(x, w), w.t())
        y.float().sum().backward()
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[n // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=16, help="calibration sequences of 512 tokens (default 16)")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per Adam step (the presets' 2)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    ap.add_argument("--product-only", action="store_true", help="time the single product and stop")
    args = ap.parse_args()

    f32, b16 = _product_seconds(False), _product_seconds(True)
    print(f"one product fwd+bwd ([4096, 576] x [576, 1536] and back), {torch.get_num_threads()} threads: "
          f"float32 {f32 * 1e3:.1f} ms, bfloat16 autocast {b16 * 1e3:.1f} ms: x{f32 / b16:.2f}", flush=True)
    if args.product_only:
        return

    import rvqllm
    from rvqllm.arch import find_blocks
    from rvqllm.data import calibration_tokens, load_text
    from rvqllm.finetune import distill_model, teacher_topk
    from rvqllm.models import load_model
    from rvqllm.reference import CALIB_TEXTS

    float_model, tok = load_model("reference")
    calib = calibration_tokens([load_text(t, "calib") for t in CALIB_TEXTS], tok, args.sequences, 512, 0)
    batches = list(calib.split(8))
    teacher = teacher_topk(float_model, batches)
    model = float_model
    float_model = None
    cfg = rvqllm.RVQConfig.load("2bit-fast").replace(distill_epochs=0, calib_sequences=args.sequences)
    _, blocks = find_blocks(model)  # (found by their nn.Linear layers: before they are quantized)
    t0 = time.perf_counter()
    rvqllm.quantize(model, cfg, calib)
    print(f"quantized (2bit-fast code, no distillation) in {time.perf_counter() - t0:.0f} s, "
          f"{torch.get_num_threads()} threads", flush=True)
    start = copy.deepcopy(model.state_dict())
    steps = sum(-(-b.shape[0] // args.micro_batch) for b in batches)
    rows = []
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
        model.load_state_dict(start)
        t0 = time.perf_counter()
        before, after = distill_model(model, list(blocks), batches, teacher, epochs=1, lr=cfg.distill_lr,
                                      micro_batch=args.micro_batch, autocast=dtype)
        seconds = time.perf_counter() - t0
        rows.append({"tune_dtype": name, "seconds": seconds, "steps": steps, "kl_before": before, "kl_after": after})
    base = rows[0]["seconds"]
    print("\n| tune_dtype | Adam steps | wall s (incl. 2 KL evaluations) | s per step | vs float32 | KL before -> after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tune_dtype']} | {r['steps']} | {r['seconds']:.1f} | {r['seconds'] / r['steps']:.2f} | "
              f"x{base / r['seconds']:.2f} faster | {r['kl_before']:.4f} -> {r['kl_after']:.4f} |")
    if args.json:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
