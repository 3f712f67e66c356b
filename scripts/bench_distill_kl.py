"""The distillation's loss step, LM head to top-k KL and back: today's chunking against recomputing every chunk.

One Adam step of the presets' distillation feeds ``--tokens`` tokens (2 sequences x 512 by default) through
the LM head (``--vocab`` x ``--width``, the reference model's 49,152 x 576; random weights: the time does not
depend on them) and the top-k KL (:func:`rvqllm.finetune._kl_sum`) under bfloat16 autocast, then back to the
hidden states. Timed each way in the same run, median of ``--reps`` after a warm-up:

- ``now``: :func:`rvqllm.finetune._kl_sum` (every chunk but the last recomputed in backward);
- ``every chunk recomputed``: each chunk under ``torch.utils.checkpoint`` (the code before session 29).

Printed: seconds per step each way, their ratio, and that both give the same loss and gradient.

    OMP_NUM_THREADS=2 python scripts/bench_distill_kl.py [--chunk 1024] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.checkpoint import checkpoint

from rvqllm.finetune import TEACHER_TOP_K, _chunk_kl_sum, _kl_sum, teacher_topk_from_hidden


def _every_chunk_recomputed(hidden, head, t_logp, idx, chunk: int):
    width, k = hidden.shape[-1], t_logp.shape[-1]
    flat, t_logp, idx = hidden.reshape(-1, width), t_logp.reshape(-1, k), idx.reshape(-1, k)
    total = None
    for a in range(0, flat.shape[0], chunk):
        part = checkpoint(_chunk_kl_sum, head, flat[a : a + chunk], t_logp[a : a + chunk], idx[a : a + chunk],
                          use_reentrant=False)
        total = part if total is None else total + part
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per step (default 1024: 2 x 512)")
    ap.add_argument("--chunk", type=int, default=1024, help="distill_chunk_tokens (default 1024, the default)")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    torch.manual_seed(0)
    head = torch.nn.Linear(args.width, args.vocab, bias=False)
    head.weight.data.normal_(0, 0.05)
    head.weight.requires_grad_(False)
    hidden = torch.randn(1, args.tokens, args.width) * 3
    with torch.no_grad():
        t_logp, idx = teacher_topk_from_hidden(hidden + 0.3 * torch.randn_like(hidden), head, TEACHER_TOP_K)

    def step(fn):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, head, t_logp, idx, args.chunk) / args.tokens
        loss.backward()
        return loss.detach(), h.grad

    ways = {"now": _kl_sum, "every chunk recomputed": _every_chunk_recomputed}
    times: dict[str, list[float]] = {name: [] for name in ways}
    results = {}
    for _ in range(args.reps + 1):  # interleaved, the first round a warm-up
        for name, fn in ways.items():
            t0 = time.perf_counter()
            results[name] = step(fn)
            times[name].append(time.perf_counter() - t0)
    med = {name: sorted(t[1:])[len(t[1:]) // 2] for name, t in times.items()}
    print(f"{args.tokens} tokens per step, chunks of {args.chunk}, LM head {args.vocab} x {args.width}, "
          f"bfloat16 autocast, {torch.get_num_threads()} threads, median of {args.reps}:")
    for name in ways:
        print(f"  {name:>24}: {med[name]:.3f} s per step")
    print(f"  ratio: x{med['every chunk recomputed'] / med['now']:.2f}")
    (l1, g1), (l2, g2) = results["now"], results["every chunk recomputed"]
    print(f"  same loss: {torch.equal(l1, l2)}; same gradient: {torch.equal(g1, g2)}")


if __name__ == "__main__":
    main()
