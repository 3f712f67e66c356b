"""The RVQ core on its own: distortion of a unit Gaussian source at 2 bits per dimension.

Draws a seeded i.i.d. N(0, 1) source, learns each quantizer on ``--train`` vectors with the library's own
functions (:func:`rvqllm.rvq.residual.learn_codebooks` for the stage-wise k-means,
:func:`rvqllm.rvq.refit.refine_codebooks` for the beam-encode / joint least-squares re-fit rounds) and
measures the mean squared error per scalar on a separate held-out set of ``--test`` vectors, encoded with
:func:`rvqllm.rvq.residual.encode_rvq` at the row's beam width. Every row spends exactly
``stages * bits / d = 2`` bits per dimension (codebooks not counted). The scalar Lloyd-Max row is the
same k-means with ``d = 1`` and 4 levels (its known optimum is 0.1175); the last row is the
rate-distortion bound ``2^(-2R) = 0.0625``.

With ``--trellis``, rows of the bitshift trellis code (:mod:`rvqllm.rvq.trellis`: computed codewords,
Viterbi, ``k = 2`` bits per step, ``L`` = 12, 14, 16 state bits, walks of 1,024 scalars) follow, measured on
the first ``--trellis-scalars`` scalars of their own seeded stream: the trellis learns nothing, so every
scalar it codes is held out. Its rate is ``(L + 1023 * 2) / 1024`` bits (2.010-2.014: the first state is
stored whole), printed in the bpw column. Its one setting, the codeword gain 1.0, was chosen on a
different stream (seed 1: 0.0744 at gain 1.0 against 0.0749 / 0.0761 at 1.05 / 1.1, ``L`` = 14).

``seconds`` is the single-threaded wall time to build that row's quantizer from scratch (its k-means, plus
its re-fit rounds) and code the test set: rows of one code shape share one k-means and one chain of
re-fit rounds, so their times overlap and the table's total is less than the sum of the rows.

    OMP_NUM_THREADS=1 python scripts/bench_rd.py [--train 131072] [--test 32768] [--seed 0] [--trellis]

``--rates`` instead compares, at 2, 3 and 4 bits, the product's trellis tables (quantiles or trained) with the
RVQ shapes of the presets (:func:`run_rates`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from rvqllm.rvq.refit import reconstruct, refine_codebooks
from rvqllm.rvq.residual import encode_rvq_chunked, learn_codebooks

RATE = 2.0  # bits per dimension
KMEANS_ITERS = 25
TRELLIS_STATE_BITS = (12, 14, 16)
TRELLIS_LENGTH = 1024


@dataclass(frozen=True)
class Shape:
    """A code shape at 2 bpw and the (beam, refits) operating points measured on it, in chain order."""

    d: int
    stages: int
    bits: int
    points: tuple[tuple[int, int], ...]  # (beam, refits): refits non-decreasing within one beam


SHAPES = (
    Shape(1, 1, 2, ((1, 0),)),  # scalar Lloyd-Max
    Shape(2, 1, 4, ((1, 0),)),
    Shape(4, 1, 8, ((1, 0),)),  # full 4-dim VQ, 256 codewords
    Shape(8, 2, 8, ((1, 0), (16, 0), (16, 2), (16, 6))),
    Shape(16, 4, 8, ((1, 0), (16, 0), (16, 3))),
)


def _name(shape: Shape, beam: int, refits: int) -> str:
    if shape.stages == 1:
        return "scalar Lloyd-Max (4 levels)" if shape.d == 1 else f"VQ d={shape.d} {1 << shape.bits} codewords"
    name = f"RVQ d={shape.d} {shape.stages}x{1 << shape.bits}"
    name += " greedy" if beam <= 1 else f" beam {beam}"
    return name + (f" + {refits} refits" if refits else "")


def _source(n: int, d: int, seed: int) -> torch.Tensor:
    """``[n, d]`` float32 i.i.d. N(0, 1), a distinct stream per ``(seed, d)``."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed * 1009 + d))


def run(train: int, test: int, seed: int) -> list[dict]:
    """Measure every row of :data:`SHAPES` plus the bound.

    Args:
        train: training vectors per code shape. test: held-out vectors per code shape. seed: RNG seed.
    Returns:
        one dict per row with keys ``name, d, stages, bits`` (bits per codeword index), ``beam, refits,
        mse`` (held-out mean squared error per scalar), ``seconds`` (see the module docstring) and ``bpw``.
    """
    rows = []
    for shape in SHAPES:
        assert shape.stages * shape.bits == RATE * shape.d
        k = 1 << shape.bits
        x = _source(train, shape.d, seed)
        x_test = _source(test, shape.d, seed + 1_000_003)
        wt = torch.ones_like(x)
        t0 = time.perf_counter()
        base = learn_codebooks(x, wt, shape.stages, k, KMEANS_ITERS, seed, points_per_code=-(-train // k))
        t_base = time.perf_counter() - t0
        chain: dict[int, tuple] = {}  # beam -> (codebooks, codes, refits done, seconds spent on refits)
        for beam, refits in shape.points:
            books, codes, done, spent = chain.get(beam, (base, None, 0, 0.0))
            if refits > done:
                t1 = time.perf_counter()
                books, codes = refine_codebooks(x, wt, books, refits - done, beam=beam, codes=codes)
                spent += time.perf_counter() - t1
                chain[beam] = (books, codes, refits, spent)
            t2 = time.perf_counter()
            err = x_test - reconstruct(encode_rvq_chunked(x_test, books, beam), books)
            mse = float(err.double().pow(2).mean())
            seconds = t_base + spent + time.perf_counter() - t2
            rows.append(dict(
                name=_name(shape, beam, refits), d=shape.d, stages=shape.stages, bits=shape.bits,
                beam=beam, refits=refits, mse=mse, seconds=seconds, bpw=shape.stages * shape.bits / shape.d,
            ))
    rows.append(dict(
        name="rate-distortion bound 2^(-2R)", d=0, stages=0, bits=0, beam=0, refits=0,
        mse=2.0 ** (-2 * RATE), seconds=0.0, bpw=RATE,
    ))
    return rows


def run_trellis(scalars: int, seed: int) -> list[dict]:
    """One row per :data:`TRELLIS_STATE_BITS`: held-out MSE of the trellis code on ``scalars`` N(0, 1)
    scalars (rounded down to whole walks of :data:`TRELLIS_LENGTH`)."""
    from rvqllm.rvq import trellis

    walks = max(1, scalars // TRELLIS_LENGTH)
    x = torch.randn(walks, TRELLIS_LENGTH, generator=torch.Generator().manual_seed(seed * 1009 + 7_000_001))
    rows = []
    for bits in TRELLIS_STATE_BITS:
        t0 = time.perf_counter()
        _, recon = trellis.quantize(x, state_bits=bits, step_bits=2, rows_per_chunk=4)
        rows.append(dict(
            name=f"bitshift trellis L={bits}, k=2, computed codewords, Viterbi", d=1, stages=1, bits=2, beam=0,
            refits=0, mse=float((x - recon).double().pow(2).mean()), seconds=time.perf_counter() - t0,
            bpw=trellis.rate(TRELLIS_LENGTH, bits, 2), scalars=x.numel(),
        ))
    return rows


def run_rates(scalars: int, train: int, test: int, seed: int) -> str:
    """``--rates``: 2, 3 and 4 bits per scalar, the product's trellis (``L`` = 12, a 32-entry table indexed by
    the packed state's hash, :func:`rvqllm.rvq.trellis.packed_values`) with the Gaussian's quantiles and with
    tables trained through the walks (:func:`rvqllm.rvq.trellis.trained_lut`, 16 / 32 / 64 Lloyd iterations on
    its own seeded source), against the RVQ shapes of the presets at those rates (8-dim 2 and 3 stages x 256,
    4-dim 2 stages x 256; k-means, 2 re-fit rounds, beam 8) and the bound. Held-out MSE per scalar."""
    from rvqllm.rvq import trellis

    walks = max(1, scalars // TRELLIS_LENGTH)
    x = torch.randn(walks, TRELLIS_LENGTH, generator=torch.Generator().manual_seed(seed * 1009 + 9_000_011))
    lines = ["| rate | quantizer | MSE | MSE / bound 2^(-2R) |", "|---:|---|---:|---:|"]
    for k, (d, stages) in ((2, (8, 2)), (3, (8, 3)), (4, (4, 2))):
        bound = 2.0 ** (-2 * trellis.rate(TRELLIS_LENGTH, 12, k))
        for iters in (0, 16, 32, 64):
            values = trellis.packed_values(trellis.trained_lut(12, k, 5, iters), 12, k, 5)
            mse = float((values[trellis.viterbi(x, 12, k, values=values)] - x).double().pow(2).mean())
            what = "the Gaussian's quantiles" if iters == 0 else f"trained, {iters} iterations"
            lines.append(f"| {trellis.rate(TRELLIS_LENGTH, 12, k):.3f} | trellis L=12, k={k}, 32-entry table: {what} "
                         f"| {mse:.5f} | {mse / bound:.3f} |")
        xr, xt = _source(train, d, seed), _source(test, d, seed + 1_000_003)
        books = learn_codebooks(xr, torch.ones_like(xr), stages, 256, KMEANS_ITERS, seed, points_per_code=-(-train // 256))
        books, _ = refine_codebooks(xr, torch.ones_like(xr), books, 2, beam=8)
        mse = float((xt - reconstruct(encode_rvq_chunked(xt, books, 8), books)).double().pow(2).mean())
        lines.append(f"| {k:.3f} | RVQ {d}-dim, {stages} x 256, 2 re-fits, beam 8 | {mse:.5f} | {mse / 2.0 ** (-2 * k):.3f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """The rows as a markdown table (MSE also relative to the bound)."""
    bound = 2.0 ** (-2 * RATE)
    lines = [
        "| quantizer | d | stages x bits | beam | refits | bpw | MSE | MSE / bound | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = f"{r['stages']} x {r['bits']}" if r["stages"] else "-"
        lines.append(
            f"| {r['name']} | {r['d'] or '-'} | {shape} | {r['beam'] or '-'} | {r['refits'] if r['d'] else '-'} "
            f"| {r['bpw']:.4g} | {r['mse']:.4f} | {r['mse'] / bound:.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1 << 17, help="training vectors per code shape")
    parser.add_argument("--test", type=int, default=1 << 15, help="held-out vectors per code shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trellis", action="store_true", help="add the bitshift trellis rows")
    parser.add_argument("--trellis-scalars", type=int, default=1 << 16, help="held-out scalars for the trellis rows")
    parser.add_argument("--trellis-only", action="store_true", help="only the trellis rows (and the bound)")
    parser.add_argument("--rates", action="store_true",
                        help="only the 2-, 3- and 4-bit comparison of trellis tables and RVQ shapes")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.rates:
        print(run_rates(args.trellis_scalars, args.train, args.test, args.seed))
        print(f"\n{args.trellis_scalars} trellis scalars, RVQ train {args.train} / test {args.test} vectors, seed "
              f"{args.seed}, {torch.get_num_threads()} thread(s), total {time.perf_counter() - t0:.0f} s")
        return
    rows = [] if args.trellis_only else run(args.train, args.test, args.seed)
    if args.trellis or args.trellis_only:
        bound = rows.pop() if rows else dict(name="rate-distortion bound 2^(-2R)", d=0, stages=0, bits=0, beam=0,
                                             refits=0, mse=2.0 ** (-2 * RATE), seconds=0.0, bpw=RATE)
        rows += run_trellis(args.trellis_scalars, args.seed) + [bound]
    print(table(rows))
    print(f"\ntrain {args.train} / test {args.test} vectors per shape, seed {args.seed}, "
          f"{torch.get_num_threads()} thread(s), total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
