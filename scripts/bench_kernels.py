#!/usr/bin/env python
"""Benchmark the fused dequantize-matmul against F.linear, and decode speed end to end.

Kernel table: for the reference model's shapes (576x576, 1536x576, 576x1536, out x in) and 7B-class
ones (4096x4096, 11008x4096, 4096x11008), at 1, 4, 16 and 128 tokens, for each preset in configs/
(2bit, 3bit, 4bit as the YAMLs define them; any config path, e.g. ``configs/experiments/2bit-trellis.yaml``,
whose trellis layers run ``rvqllm.kernels.trellis_op.trellis_linear``), time ``rvqllm.kernels.rvq_linear``
(whatever the dispatch table picks, shown in the table) and ``F.linear`` on the same shape (fp32 on CPU, fp16 on CUDA),
interleaved in the same run, medians after warm-up; print ``speedup = t(F.linear) / t(rvq)`` (> 1 means
the quantized layer is faster). Codes and codebooks are random: speed does not depend on their values.

``--cache cold`` rotates through enough copies of the weights (for both sides) that each call reads its
weight from DRAM, as in a real model whose layers together exceed the last-level cache; ``hot`` reuses
one copy (the weight of F.linear then sits in cache, which flatters it).

End to end (``--e2e``): quantize the offline reference SmolLM2-135M with a cheap 2-bit config (speed does
not depend on quality), then in fresh subprocesses time greedy ``generate`` of 128 new tokens for the fp32
baseline and the quantized checkpoint, and report tokens/s and resident memory.

Examples::

    python scripts/bench_kernels.py                       # kernel table, hot + cold, this machine's threads
    python scripts/bench_kernels.py --shapes model --tokens 1 --presets 2bit
    python scripts/bench_kernels.py --no-kernels --e2e    # end to end only
    python scripts/bench_kernels.py --device cuda         # GPU (Triton), against fp16 cuBLAS
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rvqllm.config import RVQConfig  # noqa: E402
from rvqllm.kernels import dispatch, rvq_linear, trellis_op  # noqa: E402
from rvqllm.kernels.trellis_op import trellis_linear  # noqa: E402
from rvqllm.rvq.trellis import walk_bytes  # noqa: E402

#: (out, in, a layer of that shape): the name picks the code shape of a config with ``layer_shapes``
MODEL_SHAPES = [(576, 576, "self_attn.q_proj"), (1536, 576, "mlp.up_proj"), (576, 1536, "mlp.down_proj")]
BIG_SHAPES = [(4096, 4096, "self_attn.q_proj"), (11008, 4096, "mlp.up_proj"), (4096, 11008, "mlp.down_proj")]


def llc_bytes() -> int:
    """Size of the last-level cache (sysfs), or 64 MiB when unknown."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (idx / "size").read_text().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KM")) * mult)
        except (OSError, ValueError):
            pass
    return best or 64 << 20


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_pair(fa, fb, device: str, reps: int, warmup: int) -> tuple[float, float]:
    """Median seconds of ``fa()`` and ``fb()``, measured interleaved after warm-up. Fast calls get more
    repetitions (up to ~0.5 s of timing per pair, at most 200), so that a few preemptions on a shared
    machine cannot move the median."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fa(), fb()
    sync(device)
    per_pair = (time.perf_counter() - t0) / max(1, warmup)
    reps = max(reps, min(200, int(0.5 / max(per_pair, 1e-9))))
    ta, tb = [], []
    for _ in range(reps):
        for f, acc in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            sync(device)
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def make_calls(x, weights, layers, inf, cfg):
    """Two closures: F.linear and the quantized layer's op (``rvq_linear``, or ``trellis_linear`` for a
    ``coder: trellis`` config), each stepping through its copies of the weight."""
    it = {"a": 0, "b": 0}
    n = len(weights)

    def fa():
        w = weights[it["a"] % n]
        it["a"] += 1
        return F.linear(x, w)

    def fb():
        c, cb, sc = layers[it["b"] % n]
        it["b"] += 1
        if cfg.coder == "trellis":
            return trellis_linear(x, c, cb, sc, None, cfg.trellis_state_bits, cfg.trellis_step_bits,
                                  cfg.trellis_lut_bits)
        return rvq_linear(x, c, cb, sc, None, inf)

    return fa, fb


def random_layer(cfg, out: int, inf: int, gen: torch.Generator) -> tuple:
    """``(codes, codebooks, scales)`` of a random layer of ``cfg``'s code shape (speed does not depend on
    the values): RVQ codes and codebooks, or a trellis layer's packed walks (every bit string is a walk)
    and its table."""
    scl = (torch.rand(out, generator=gen) * 0.1).half()
    if cfg.coder == "trellis":
        bpc = walk_bytes(out, cfg.trellis_state_bits, cfg.trellis_step_bits)
        walks = torch.randint(0, 256, (inf, bpc), generator=gen, dtype=torch.uint8)
        return walks, torch.randn(1 << cfg.trellis_lut_bits, generator=gen).half(), scl
    d, s, k = cfg.vector_dim, cfg.stages, 1 << cfg.bits
    cdt = torch.uint8 if cfg.bits <= 8 else torch.int16
    codes = torch.randint(0, k, (out, -(-inf // d), s), generator=gen).to(torch.int32).to(cdt)
    return codes, (torch.randn(s, k, d, generator=gen) * 0.1).half(), scl


def impl_name(cfg, device: str, tokens: int, out: int) -> str:
    """What the dispatch picks for this call."""
    if cfg.coder == "trellis":
        return trellis_op.choose(device, tokens)
    return dispatch.choose(device, tokens, cfg.stages, 1 << cfg.bits, cfg.vector_dim, out)


def _variants(name: str, config: RVQConfig, layer: str) -> list[tuple[RVQConfig, str]]:
    """The code shapes ``config`` may give a layer named ``layer``, each with its table label: its own shape;
    with ``layer_shapes``, the one its rule gives; with ``bpw_budget``, every candidate (which one a layer
    gets depends on the model's measured sensitivity)."""
    def label(c: dict, where: str = "") -> str:
        return f"{name} ({where}d={c['vector_dim']} S={c['stages']} b={c['bits']})"

    if config.bpw_budget is not None:
        return [(config.replace(bpw_budget=None, mixed_candidates=[], **c), label(c)) for c in config.mixed_candidates]
    if config.layer_shapes:
        own = config.shape_for(f"model.layers.0.{layer}")
        return [(config.replace(layer_shapes={}, **own), label(own, f"{layer.rsplit('.', 1)[1]}: "))]
    return [(config, name)]


def kernel_table(args) -> None:
    device = args.device
    base_dtype = torch.float16 if device == "cuda" else torch.float32
    shapes = {"model": MODEL_SHAPES, "7b": BIG_SHAPES, "all": MODEL_SHAPES + BIG_SHAPES}[args.shapes]
    presets = [(p, RVQConfig.load(p)) for p in args.presets]
    caches = ["hot", "cold"] if args.cache == "both" else [args.cache]
    llc = llc_bytes()
    print(f"# kernels: device={device} threads={torch.get_num_threads()} baseline=F.linear {base_dtype} "
          f"last-level cache={llc >> 20} MiB reps>={args.reps} (median)")
    for cache in caches:
        print(f"\n## cache={cache}   speedup = t(F.linear) / t(rvq_linear); impl = what dispatch chose")
        header = f"| shape (out x in) | preset | {' | '.join(f'T={t}' for t in args.tokens)} | impl by T |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for out, inf, layer in shapes:
            gen = torch.Generator().manual_seed(0)
            # copies so that one sweep through them exceeds the LLC by 2x (cold), or one copy (hot)
            n_copies = max(1, -(-2 * llc // (out * inf * 4))) if cache == "cold" else 1
            weights = [torch.randn(out, inf, generator=gen).to(device=device, dtype=base_dtype)
                       for _ in range(n_copies)]
            for cfg, label in (v for pname, preset_cfg in presets for v in _variants(pname, preset_cfg, layer)):
                layers = [tuple(t.to(device) for t in random_layer(cfg, out, inf, gen)) for _ in range(n_copies)]
                cells, impls = [], []
                for t in args.tokens:
                    x = torch.randn(t, inf, generator=gen).to(device=device, dtype=base_dtype)
                    fa, fb = make_calls(x, weights, layers, inf, cfg)
                    with torch.inference_mode():  # warm-up touches every copy (one-time repacking)
                        ta, tb = bench_pair(fa, fb, device, args.reps, max(args.warmup, n_copies))
                    cells.append(f"{ta / tb:.2f}" + (f" ({ta * 1e6:.0f} / {tb * 1e6:.0f} us)" if args.times else ""))
                    impls.append(impl_name(cfg, device, t, out))
                print(f"| {out}x{inf} | {label} | {' | '.join(cells)} | {','.join(dict.fromkeys(impls))} |",
                      flush=True)
            del weights, layers


# ----------------------------------------------------------------------------------------- end to end
# Speed does not depend on quality: few k-means iterations, greedy codes, little calibration. Rotation and
# error feedback stay as the preset has them (rotation changes the decode: x is rotated at run time).
CHEAP = {"kmeans_iters": 2, "beam_width": 1, "calib_sequences": 4, "calib_seq_len": 128}


def cheap_config(preset: str) -> RVQConfig:
    """``preset`` (a name in configs/ or a YAML path) with :data:`CHEAP`'s fields."""
    return RVQConfig.load(preset).replace(**CHEAP)


def rss_mib(field: str = "VmRSS") -> float:
    """Resident (``VmRSS``) or peak resident (``VmHWM``, reset at exec) memory of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trimmed_rss_mib() -> float:
    """RSS after ``gc`` and glibc's ``malloc_trim(0)``: memory the process holds for live objects,
    without what the allocator kept from freed temporaries."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return rss_mib()


def e2e_child(spec: str, new_tokens: int, static: bool, compile_: bool) -> None:
    """Runs in a fresh process: load one model, time greedy decoding, print one JSON line."""
    import transformers  # noqa: F401  (counted in the baseline RSS)

    import rvqllm
    from rvqllm.models import load_model
    from rvqllm.reference import reference_model_dir

    base_rss = rss_mib()
    t0 = time.perf_counter()
    if spec == "fp32":
        model, _ = load_model("reference")
    else:
        model = rvqllm.load(spec)
    load_s = time.perf_counter() - t0
    model.eval()
    loaded_rss = rss_mib()
    loaded_trim = trimmed_rss_mib()
    tensor_mib = sum(t.numel() * t.element_size() for t in
                     {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()) / 2**20
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    ids = tok("In the beginning God created the heaven and the earth.", return_tensors="pt").input_ids
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id)
    if static:
        kw["cache_implementation"] = "static"
    if compile_:
        model.forward = torch.compile(model.forward, dynamic=False)
    with torch.inference_mode():
        # warm-up: builds kernels and caches; with a static cache / compile, the same length (the cache's
        # shape depends on it, and a new shape would recompile), twice (compile, then first replay)
        warm = new_tokens if (compile_ or static) else 8
        for _ in range(2 if compile_ else 1):
            model.generate(ids, max_new_tokens=warm, min_new_tokens=warm, **kw)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        dt = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    final_rss = rss_mib()
    print(json.dumps({"spec": spec, "tokens": n, "seconds": dt, "tok_s": n / dt, "load_s": load_s,
                      "base_rss_mib": base_rss, "loaded_rss_mib": loaded_rss, "loaded_trim_mib": loaded_trim,
                      "final_rss_mib": final_rss, "final_trim_mib": trimmed_rss_mib(),
                      "peak_rss_mib": rss_mib("VmHWM"),
                      "tensor_mib": tensor_mib, "threads": torch.get_num_threads()}))


def ensure_quantized(path: Path, preset: str) -> Path:
    if (path / "config.json").exists():
        return path
    import rvqllm
    from rvqllm.data import calibration_tokens, load_text
    from rvqllm.models import load_model

    cfg = cheap_config(preset)
    model, tok = load_model("reference")
    calib = calibration_tokens([load_text("kjv", split="calib")], tok, cfg.calib_sequences, cfg.calib_seq_len,
                               cfg.seed)
    t0 = time.perf_counter()
    rvqllm.quantize(model, cfg, calib)
    print(f"# quantized the reference model with {preset} + {CHEAP} in {time.perf_counter() - t0:.0f} s "
          f"({torch.get_num_threads()} threads)", flush=True)
    rvqllm.save(model, path, tok)
    return path


def e2e(args) -> None:
    from rvqllm.size import folder_bytes

    ckpt = ensure_quantized(Path(args.ckpt or Path.home() / ".cache" / "rvqllm" / "bench" / f"{args.e2e_preset}-cheap"),
                            args.e2e_preset)
    rows = []
    for spec in ("fp32", str(ckpt)):
        cmd = [sys.executable, __file__, "--e2e-child", spec, "--new-tokens", str(args.new_tokens),
               "--threads", str(torch.get_num_threads())] + (["--static-cache"] if args.static_cache else []) \
            + (["--compile"] if args.compile else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    fp, q = rows
    print(f"\n# end to end: greedy generate, {fp['tokens']} new tokens, threads={fp['threads']}, "
          f"static cache={args.static_cache}, torch.compile={args.compile}; checkpoint {ckpt} ({folder_bytes(ckpt) / 2**20:.1f} MiB on disk)")
    print("MiB: tensors = the model's parameters+buffers; RSS = resident set; (trim) = after gc + malloc_trim")
    print("| model | tokens/s | vs fp32 | tensors | RSS after imports | RSS loaded (trim) | RSS after "
          "generate (trim) | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    qname = f"checkpoint {ckpt.name}" if args.ckpt else f"{args.e2e_preset} (cheap config)"
    for r, name in ((fp, "fp32 baseline"), (q, qname)):
        print(f"| {name} | {r['tok_s']:.2f} | {r['tok_s'] / fp['tok_s']:.2f}x | {r['tensor_mib']:.0f} | "
              f"{r['base_rss_mib']:.0f} | {r['loaded_rss_mib']:.0f} ({r['loaded_trim_mib']:.0f}) | "
              f"{r['final_rss_mib']:.0f} ({r['final_trim_mib']:.0f}) | {r['peak_rss_mib']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--shapes", choices=["model", "7b", "all"], default="all")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 128])
    ap.add_argument("--presets", nargs="+", default=["2bit", "3bit", "4bit"])
    ap.add_argument("--cache", choices=["hot", "cold", "both"], default="both")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--times", action="store_true", help="also print the two medians (F.linear / rvq, us)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    ap.add_argument("--e2e", action="store_true", help="also time decoding of the reference model")
    ap.add_argument("--e2e-preset", default="2bit")
    ap.add_argument("--ckpt", help="an existing quantized checkpoint to time instead of quantizing one")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--static-cache", action="store_true", help="generate with cache_implementation='static'")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model's forward (end to end)")
    ap.add_argument("--e2e-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.e2e_child:
        e2e_child(args.e2e_child, args.new_tokens, args.static_cache, args.compile)
        return
    if not args.no_kernels:
        kernel_table(args)
    if args.e2e:
        e2e(args)


if __name__ == "__main__":
    main()
