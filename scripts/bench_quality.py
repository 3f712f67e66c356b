"""Quality benchmark: perplexity against bits per weight on the reference model (PROTOCOL.md).

Calibrates on the default calibration texts (``rvqllm.reference.CALIB_TEXTS``: the KJV-OT, Shakespeare,
fortunes, Python-code and Wikipedia calibration splits; ``--calib`` to change) and evaluates
ppl-512x``windows`` on the test splits of ``rvqllm.reference.EVAL_TEXTS``: KJV-NT, Shakespeare and
Wikipedia (the calibration's domains), Django's documentation (held-out technical text) and news and
Usenet posts (kinds of text no calibration text is), for:

- ``fp16``: the baseline;
- ``rtn2`` / ``rtn3`` / ``rtn4``: round-to-nearest scalar quantization, group 128, fp16 scale + zero (the floor);
- ``preset:NAME``: an rvqllm preset (``configs/NAME.yaml``), with its quantization wall time;
- ``ablate:NAME``: each technique of preset NAME flipped in turn (off when the preset has it on), one row
  each, with its ppl and its quantization wall time (the cost of the technique);
- ``rd``: the Gaussian rate-distortion benchmark of the RVQ core (``scripts/bench_rd.py``).

Every finished row is appended to ``--results`` (JSON lines) at once, so runs can be split over
processes (one per core, ``OMP_NUM_THREADS=1``) and a killed run keeps what it measured; ``--table``
prints the markdown tables from results files without running anything.

    python scripts/bench_quality.py --rows fp16 rtn2 rtn3 rtn4 preset:2bit --results out/quality.jsonl
    python scripts/bench_quality.py --rows ablate:2bit --calib-seqs 16 --calib-len 256 --windows 8 \\
        --results out/ablation.jsonl
    python scripts/bench_quality.py --table out/quality.jsonl out/ablation.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_rd beside this file

from rvqllm.reference import CALIB_TEXTS, EVAL_TEXTS, HELD_OUT_TEXTS  # noqa: E402

TEXTS = EVAL_TEXTS
HELD_OUT = [t for t in HELD_OUT_TEXTS if t in TEXTS]
LABEL = {"kjv": "KJV-NT", "shakespeare": "Shakespeare", "django": "Django docs (held out)",
         "wiki": "Wikipedia", "news": "news (out of domain)", "usenet": "Usenet posts (out of domain)"}

#: technique -> (config field, value that turns it off, value that turns it on)
TECHNIQUES = {
    "block fine-tuning": ("finetune_epochs", 0, 2),
    "fine-tuning towards the float model's activations": ("finetune_target", "block", "model"),
    "beam search (8)": ("beam_width", 1, 8),
    "error feedback": ("error_feedback", False, True),
    "diag(H)-weighted k-means": ("hessian_weighted", False, True),
    "Hessian damp 0.1 (GPTQ's 0.01 when off)": ("hessian_damp", 0.01, 0.1),
    "codebook re-fit": ("codebook_refits", 0, 2),
    "Hadamard rotation": ("rotate", False, True),
    "whole-model distillation": ("distill_epochs", 0, 2),
    "codes that move in distillation (1% per update)": ("distill_code_fraction", 0.0, 0.01),
    "tuning in bfloat16 (autocast)": ("tune_dtype", "float32", "bfloat16"),
    "calibration passes in bfloat16 (autocast)": ("calib_dtype", "float32", "bfloat16"),
}


def _evaluate(model, tok, windows: int) -> dict[str, dict]:
    from rvqllm.data import load_text
    from rvqllm.eval import evaluate

    res = evaluate(model, tok, {t: load_text(t, "test") for t in TEXTS}, windows=windows)
    return {t: {"ppl": r.ppl, "tokens": r.tokens} for t, r in res.items()}


def _quantized_row(cfg, args, save_as: str | None = None) -> dict:
    import rvqllm
    from rvqllm.data import SAMPLED, calibration_tokens, load_text, sampled_tokens
    from rvqllm.models import load_model
    from rvqllm.size import summarize

    model, tok = load_model("reference")
    cfg = cfg.replace(calib_sequences=args.calib_seqs or cfg.calib_sequences,
                      calib_seq_len=args.calib_len or cfg.calib_seq_len)
    texts = [t for t in args.calib if t != SAMPLED]
    sampled = cfg.calib_sequences // len(args.calib) if SAMPLED in args.calib else 0  # its share, like any text's
    parts = [calibration_tokens([load_text(t, "calib") for t in texts], tok, cfg.calib_sequences - sampled,
                                cfg.calib_seq_len, cfg.seed)] if texts else []
    if sampled:
        t0 = time.perf_counter()
        parts.append(sampled_tokens(model, tok, sampled, cfg.calib_seq_len, cfg.seed))
        print(f"sampled {sampled} x {cfg.calib_seq_len} tokens in {time.perf_counter() - t0:.1f} s", flush=True)
    calib = torch.cat(parts)
    t0, c0 = time.perf_counter(), time.process_time()
    report = rvqllm.quantize(model, cfg, calib)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    finetune = sum(b.get("finetune_seconds", 0.0) for b in report.blocks.values())
    size = summarize(model.rvq_layers)
    disk = {}
    if save_as is not None and args.save_dir is not None:
        from rvqllm.size import folder_bytes

        folder = rvqllm.save(model, args.save_dir / save_as, tok, overwrite=True)
        disk = {"checkpoint": str(folder), "disk_mib": folder_bytes(folder) / 2**20}
    return {**disk, "bpw": size["bpw"], "codebooks_bpw": size["codebooks_bpw"], "weights": size["weights"],
            "quantize_seconds": seconds, "quantize_cpu_seconds": cpu, "finetune_seconds": finetune,
            "distill_seconds": report.distill.get("seconds", 0.0),
            "distill": {k: v for k, v in report.distill.items() if not k.startswith("peak")},
            "calib": f"{cfg.calib_sequences}x{cfg.calib_seq_len}", "calib_texts": list(args.calib),
            "ppl": _evaluate(model, tok, args.windows)}


def run_row(row: str, args, emit) -> None:
    """Measure one row spec; ``emit(result)`` gets each result as soon as it is measured (an ablation
    gives one per technique)."""
    from rvqllm.baselines import rtn_quantize_
    from rvqllm.config import RVQConfig
    from rvqllm.models import load_model

    base = {"row": row, "windows": args.windows, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if row == "fp16":
        model, tok = load_model("reference")
        emit({**base, "method": "fp16 baseline", "bpw": 16.0, "ppl": _evaluate(model, tok, args.windows)})
        return
    if row.startswith("rtn"):
        bits = int(row[3:])
        model, tok = load_model("reference")
        info = rtn_quantize_(model, bits, 128)
        emit({**base, "method": f"round-to-nearest {bits}-bit, g128", "bpw": info["bpw"],
              "ppl": _evaluate(model, tok, args.windows)})
        return
    if row.startswith("preset:"):
        name = row.split(":", 1)[1]
        emit({**base, "method": f"rvqllm {name}", **_quantized_row(RVQConfig.load(name), args, f"smollm2-135m-{name}")})
        return
    if row.startswith("ablate:"):
        name = row.split(":", 1)[1]
        cfg = RVQConfig.load(name)
        if not args.no_preset_row:
            emit({**base, "method": f"rvqllm {name}", "change": "none (the preset)", **_quantized_row(cfg, args)})
        known = set(cfg.to_dict())
        for tech, (field, off, on) in TECHNIQUES.items():
            if field not in known or (args.techniques and field not in args.techniques):
                continue
            if field == "finetune_target" and cfg.finetune_epochs == 0:
                continue  # no fine-tuning to aim
            is_on = getattr(cfg, field) not in (off, None)
            change = f"{tech} off" if is_on else f"{tech} on (not in the preset)"
            edits = {field: off if is_on else on}
            if field == "error_feedback" and is_on and cfg.rotate:
                edits["rotate"] = False  # rotation needs error feedback (the config refuses it alone)
                change += " (and rotation, which needs it)"
            row_cfg = cfg.replace(**edits)
            emit({**base, "method": f"rvqllm {name}", "change": change, **_quantized_row(row_cfg, args)})
        return
    if row == "rd":
        import bench_rd

        emit({**base, "method": "gaussian-rd", "rd": bench_rd.run(args.rd_train, args.rd_test, 0)})
        return
    raise SystemExit(f"unknown row {row!r}: use fp16, rtn2/rtn3/rtn4, preset:NAME, ablate:NAME or rd")


def _append(path: Path | None, result: dict) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(line + "\n")


def _ppl_cells(r: dict, fp16: dict | None) -> str:
    """One cell per text: ``ppl (xratio, ln ln-ratio)``, then ``ln(ratio_t) / ln(ratio_kjv)`` for each held-out
    text t (issue 13's generalisation rule: at most 1.25), ``/``-separated in the order of
    :data:`HELD_OUT`; ``-`` where a row (an older one) lacks a text."""
    cells, logs = [], {}
    for t in TEXTS:
        if t not in r["ppl"]:
            cells.append("-")
            continue
        p = r["ppl"][t]["ppl"]
        if fp16 and fp16.get(t):
            logs[t] = math.log(p / fp16[t])
            cells.append(f"{p:.2f} (x{p / fp16[t]:.2f}, ln {logs[t]:.3f})")
        else:
            cells.append(f"{p:.2f}")
    rules = [f"{logs[t] / logs['kjv']:.2f}" if t in logs and logs.get("kjv", 0.0) > 0 else "-" for t in HELD_OUT]
    cells.append(" / ".join(rules))
    return " | ".join(cells)


def _text_header() -> str:
    return " | ".join(LABEL[t] for t in TEXTS) + f" | ln t / ln KJV ({' / '.join(HELD_OUT)})"


def _calib(r: dict) -> str:
    """``64x512 kjv+shakespeare+fortunes+code``; rows from before the texts were recorded say only the size."""
    texts = r.get("calib_texts")
    return r.get("calib", "-") + (" " + "+".join(texts) if texts else "")


def tables(results: list[dict]) -> str:
    """Markdown tables (ppl vs bpw, ablation, Gaussian RD) from result dicts."""
    lines = []
    for windows in sorted({r["windows"] for r in results if "ppl" in r}):
        rs = [r for r in results if r.get("windows") == windows and "ppl" in r]
        fp = next((r for r in rs if r["method"] == "fp16 baseline"), None)
        fp16 = {t: fp["ppl"][t]["ppl"] for t in TEXTS if t in fp["ppl"]} if fp else None
        main = [r for r in rs if "change" not in r]
        if main:
            lines += [f"### ppl-512x{windows} against bpw (block linears, all-in)", "",
                      f"| method | calibration | bpw | {_text_header()} | quantize wall s |",
                      "|---|---|---|" + "---|" * (len(TEXTS) + 1) + "---|"]
            for r in sorted(main, key=lambda r: (r["bpw"], r["method"])):
                wall = f"{r['quantize_seconds']:.0f}" if "quantize_seconds" in r else "-"
                lines.append(f"| {r['method']} | {_calib(r)} | {r['bpw']:.3f} | {_ppl_cells(r, fp16)} | {wall} |")
            lines.append("")
        abl = [r for r in rs if "change" in r]
        if abl:
            lines += [f"### Ablation (ppl-512x{windows})", "",
                      f"| preset | change | calibration | bpw | {_text_header()} | "
                      "quantize CPU s | wall s | of which fine-tuning (wall) s | distillation (wall) s |",
                      "|---|---|---|---|" + "---|" * (len(TEXTS) + 1) + "---|---|---|---|"]
            for r in abl:
                cpu = f"{r['quantize_cpu_seconds']:.0f}" if "quantize_cpu_seconds" in r else "-"
                distill = f"{r['distill_seconds']:.0f}" if "distill_seconds" in r else "-"
                lines.append(f"| {r['method']} | {r['change']} | {_calib(r)} | {r['bpw']:.3f} | "
                             f"{_ppl_cells(r, fp16)} | {cpu} | {r['quantize_seconds']:.0f} | {r['finetune_seconds']:.0f} | "
                             f"{distill} |")
            lines.append("")
    for r in results:
        if r.get("method") == "gaussian-rd":
            lines += ["### RVQ core on a unit Gaussian source at 2 bits per dimension (codebooks not counted)", "",
                      "| configuration | MSE per dimension | seconds |", "|---|---|---|"]
            lines += [f"| {x['name']} | {x['mse']:.4f} | {x['seconds']:.1f} |" for x in r["rd"]]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=[], help="fp16 rtn2 rtn3 rtn4 preset:NAME ablate:NAME rd")
    ap.add_argument("--windows", type=int, default=64, help="512-token windows per test text (64 = ppl-512x64)")
    ap.add_argument("--calib-seqs", type=int, default=None, help="override the presets' calibration sequences")
    ap.add_argument("--calib-len", type=int, default=None, help="override the presets' calibration length")
    ap.add_argument("--calib", nargs="+", default=list(CALIB_TEXTS),
                    help="calibration texts (default: %(default)s): reference names or any rvqllm text source; "
                         "'sampled' takes its share of the sequences as text sampled from the model itself")
    ap.add_argument("--rd-train", type=int, default=1 << 17)
    ap.add_argument("--rd-test", type=int, default=1 << 15)
    ap.add_argument("--techniques", nargs="*", default=None,
                    help="ablate only these config fields (default: all of " + ", ".join(
                        f for f, _, _ in TECHNIQUES.values()) + ")")
    ap.add_argument("--no-preset-row", action="store_true", help="ablation: skip the unchanged preset's row")
    ap.add_argument("--save-dir", type=Path, default=None, help="save each preset row's checkpoint here")
    ap.add_argument("--results", type=Path, default=None, help="append each row as a JSON line here")
    ap.add_argument("--table", type=Path, nargs="*", default=None, help="print tables from these results files")
    args = ap.parse_args()
    if args.table is not None:
        results = [json.loads(line) for p in args.table for line in p.read_text().splitlines() if line.strip()]
        print(tables(results))
        return
    if not args.rows:
        ap.error("give --rows to measure or --table to print")
    done: list[dict] = []

    def emit(result: dict) -> None:
        _append(args.results, result)
        done.append(result)

    for row in args.rows:
        run_row(row, args, emit)
    print(tables(done))


if __name__ == "__main__":
    main()
