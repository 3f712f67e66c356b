"""Tuning's codebook lookup: indexing against the sparse products of ``rvqllm.rvq.lookup``, same run.

First one layer (forward and backward of ``sum_s table[s, codes[:, s]]`` at the reference model's MLP
shape, 1536 x 576 weights, 8-dim vectors, 2 stages x 256; median of 7 after a warm-up). Then, unless
``--layer-only``, the whole-model distillation of the reference model: quantized once with the ``2bit-fast``
code and no distillation, then distilled one epoch from that same state with each lookup (bfloat16
autocast as the presets tune on a CPU with it natively), on the same batches against the same teacher.
Printed: seconds, their ratio and the KL each reached (they differ only by the order of float additions).

    OMP_NUM_THREADS=2 python scripts/bench_lookup.py --sequences 16 [--profile]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def _layer_ms(fn, table, codes, grad, n: int = 7) -> tuple[float, float]:
    fwd, bwd = [], []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        out = fn(table, codes)
        t1 = time.perf_counter()
        torch.autograd.grad(out, table, grad)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return sorted(fwd[1:])[n // 2] * 1e3, sorted(bwd[1:])[n // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=16, help="calibration sequences of 512 tokens (default 16)")
    ap.add_argument("--layer-only", action="store_true", help="time the single layer and stop")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed epochs, one more epoch of each under torch.profiler: its top operators by CPU time "
                         "(the profiler's overhead inflates small operators)")
    args = ap.parse_args()

    from rvqllm.rvq.lookup import indexed_sum, lookup_sum

    gen = torch.Generator().manual_seed(0)
    table = torch.randn(2, 256, 8, generator=gen, requires_grad=True)
    codes = torch.randint(0, 256, (1536 * 576 // 8, 2), generator=gen)
    grad = torch.randn(codes.shape[0], 8, generator=gen)
    old, new = _layer_ms(indexed_sum, table, codes, grad), _layer_ms(lookup_sum, table, codes, grad)
    print(f"one 1536 x 576 layer, {torch.get_num_threads()} threads: indexing {old[0]:.2f} ms forward, "
          f"{old[1]:.2f} ms backward; sparse {new[0]:.2f} / {new[1]:.2f} ms: "
          f"x{old[0] / new[0]:.1f} / x{old[1] / new[1]:.1f}", flush=True)
    if args.layer_only:
        return

    import rvqllm
    from rvqllm import finetune
    from rvqllm.arch import find_blocks
    from rvqllm.data import calibration_tokens, load_text
    from rvqllm.models import load_model
    from rvqllm.reference import CALIB_TEXTS

    model, tok = load_model("reference")
    calib = calibration_tokens([load_text(t, "calib") for t in CALIB_TEXTS], tok, args.sequences, 512, 0)
    batches = list(calib.split(8))
    teacher = finetune.teacher_topk(model, batches)
    cfg = rvqllm.RVQConfig.load("2bit-fast").replace(distill_epochs=0, calib_sequences=args.sequences)
    _, blocks = find_blocks(model)
    rvqllm.quantize(model, cfg, calib)
    start = copy.deepcopy(model.state_dict())
    autocast = torch.bfloat16 if finetune.native_bf16(torch.device("cpu")) else None
    rows = []
    for name, fn in (("indexing", indexed_sum), ("sparse", lookup_sum)):
        model.load_state_dict(start)
        finetune.lookup_sum = fn  # what _TrainableRVQ decodes with
        t0 = time.perf_counter()
        before, after = finetune.distill_model(model, list(blocks), batches, teacher, epochs=1, lr=cfg.distill_lr,
                                               autocast=autocast)
        rows.append((name, time.perf_counter() - t0, before, after))
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            model.load_state_dict(start)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                finetune.distill_model(model, list(blocks), batches, teacher, epochs=1, lr=cfg.distill_lr,
                                       autocast=autocast)
            print(f"\n{name}, profiled epoch:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    finetune.lookup_sum = lookup_sum
    print(f"\nwhole-model distillation, {args.sequences} sequences, one epoch, "
          f"{'bfloat16 autocast' if autocast else 'float32'}, {torch.get_num_threads()} threads:")
    print("| lookup | wall s (incl. 2 KL evaluations) | vs indexing | KL before -> after |")
    print("|---|---|---|---|")
    for name, seconds, before, after in rows:
        print(f"| {name} | {seconds:.1f} | x{rows[0][1] / seconds:.2f} faster | {before:.4f} -> {after:.4f} |")


if __name__ == "__main__":
    main()
