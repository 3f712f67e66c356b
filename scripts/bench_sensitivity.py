"""Mixed precision's sensitivity pass, block by block against the whole model: same plan? how long?

The reference model's layers' loss sensitivity (Fisher × W², :mod:`rvqllm.mixed`) on the first calibration
batch of a ``bpw_budget`` config, measured two ways in the same run: :func:`~rvqllm.mixed.fisher_sensitivity`
(the whole float model in memory, one backward) and :func:`~rvqllm.mixed.blockwise_sensitivity` (what
``rvqllm quantize`` runs: one block at a time, forward then backward in reverse, each block recomputed).
Printed: each one's seconds and their ratio, the largest relative difference of a layer's sensitivity, whether
the two plans (:func:`~rvqllm.mixed.allocate` at the config's budget) choose the same shape for every layer,
and how many layers of each kind got each vector length.

    OMP_NUM_THREADS=2 python scripts/bench_sensitivity.py --config experiments/2bit-mixed-d
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="experiments/2bit-mixed-d", help="a config with bpw_budget")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from rvqllm.arch import find_linears, linear_weight
    from rvqllm.calibration import capture_block_inputs
    from rvqllm.config import RVQConfig
    from rvqllm.data import calibration_tokens, load_text
    from rvqllm.mixed import allocate, blockwise_sensitivity, budget_bpw, fisher_sensitivity
    from rvqllm.models import load_model
    from rvqllm.reference import CALIB_TEXTS
    from rvqllm.resume import MemoryActivations
    from rvqllm.source import MemorySource

    cfg = RVQConfig.load(args.config)
    if cfg.bpw_budget is None:
        raise SystemExit(f"error: {args.config} has no bpw_budget: give a mixed-precision config")
    model, tok = load_model("reference")
    texts = [load_text(s, split="calib") for s in CALIB_TEXTS]
    ids = calibration_tokens(texts, tok, cfg.calib_sequences, cfg.calib_seq_len, cfg.seed)[: cfg.calib_batch_size]
    source = MemorySource(model)
    layers = {n: m for i, b in enumerate(source.blocks) for n, m in find_linears(b, f"{source.prefix}.{i}", cfg.skip).items()}
    t0 = time.perf_counter()
    whole = fisher_sensitivity(model, layers, [ids])
    t_whole = time.perf_counter() - t0
    (inp,) = capture_block_inputs(model, source.blocks[0], [ids])
    t0 = time.perf_counter()
    blockwise = blockwise_sensitivity(model, source, ids, inp.hidden, inp.kwargs, torch.device("cpu"), cfg.skip,
                                      MemoryActivations(), cfg.finetune_batch)
    t_block = time.perf_counter() - t0
    shapes = {n: tuple(linear_weight(m).shape) for n, m in layers.items()}
    budget = budget_bpw(cfg, shapes)
    plans = [allocate(shapes, s, cfg.mixed_candidates, budget, rotate=cfg.rotate) for s in (whole, blockwise)]
    result = {
        "tokens": int(ids.numel()), "threads": torch.get_num_threads(),
        "whole_model_s": round(t_whole, 1), "blockwise_s": round(t_block, 1), "ratio": round(t_block / t_whole, 2),
        "max_relative_difference": max(abs(blockwise[n] / whole[n] - 1) for n in whole if whole[n]),
        "budget_bpw": budget, "same_plan": plans[0] == plans[1],
        "differing_layers": [n for n in plans[0] if plans[0][n] != plans[1][n]],
        "vector_dims": {f"{k} d{d}": c for (k, d), c in sorted(Counter(
            (n.rsplit(".", 1)[-1], p["vector_dim"]) for n, p in plans[1].items()).items())},
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['tokens']} tokens, {result['threads']} threads: whole model {t_whole:.1f} s, block by block "
          f"{t_block:.1f} s ({result['ratio']}x); largest relative difference {result['max_relative_difference']:.2e}; "
          f"same plan: {result['same_plan']}")
    print("  " + ", ".join(f"{k}: {v}" for k, v in result["vector_dims"].items()))


if __name__ == "__main__":
    main()
