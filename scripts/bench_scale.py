#!/usr/bin/env python
"""Scale benchmark: quantize a few decoder blocks of real-shaped models, extrapolate to the whole model.

For each shape (``--shapes``: tinyllama-1.1b, llama-3-8b, llama-3-70b; real widths from
``rvqllm.synthetic.SHAPES``) this writes a random-weight Llama checkpoint with ``--blocks`` (3) decoder
blocks (``rvqllm.synthetic.write_synthetic_llama``; by default with the model's real vocabulary, so the
embeddings and ``lm_head`` cost what they really cost), then runs, in a subprocess::

    <python> -m rvqllm.cli quantize FOLDER --config PRESET --out OUT --device DEVICE --json --calib kjv
             [--calib-sequences N] [--calib-seq-len L]

and reads the per-block accounting of its JSON (the fields are listed in docs/SCALE.md; a missing one
stops the benchmark with a message naming it). It prints, per shape:

- seconds per block by stage (load, calibrate, code, tune, forward, write): the mean over the typical
  blocks, 2..m-1 (the first is warm-up; the last has no next block to feed and computes the distillation
  teacher; both are shown on their own rows), with peak host RSS and device memory;
- the whole model, an estimate: ``blocks = first + (N - 2) x typical + last``; distillation
  ``x P_full / P_run`` (P = weights the distillation multiplies by: block linears + lm_head; the same
  calibration tokens), or, when ``--results`` holds runs of the same set-up at other ``--blocks`` counts,
  the line ``a + b x blocks`` through them at N (fixed part + per block; better); everything else (the
  run's wall time minus blocks and distillation) as measured; peak memory: a block's peak (blocks
  stream, so it does not grow with N), and for distillation its rise above the block peak scaled by
  ``N / blocks measured`` (an upper bound: its fixed part, the lm_head and logits, is scaled too), or
  the fitted line;
- the goals, as ratios (< 1 meets it): Llama-3-8B ``2bit`` under 1 GPU-hour; Llama-3-70B fits one
  80 GiB GPU with a 24 GiB host; TinyLlama ``2bit-fast`` under 45 min on a 2-core CPU.

Each run (or skip) is appended to ``--results`` as a JSON line (command, machine facts, the CLI's JSON,
the summary); ``--table FILE ...`` prints the tables again from such files without running anything.
``--budget-seconds`` stops starting shapes that the time left cannot hold (estimated from the shapes
already run, by parameter count) and kills a run at the budget; it says which it skipped and why.

    python scripts/bench_scale.py --shapes tinyllama-1.1b --preset 2bit-fast --device cpu --results out/scale.jsonl
    python scripts/bench_scale.py --shapes tinyllama-1.1b llama-3-8b llama-3-70b --device cuda \\
        --budget-seconds 480 --results out/scale.jsonl          # a lent GPU machine, ~9 min
    python scripts/bench_scale.py --table out/scale.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rvqllm.synthetic import (  # noqa: E402
    SHAPES,
    block_linear_params,
    block_params,
    model_params,
    read_record,
    synthetic_kwargs,
    write_synthetic_llama,
)

STAGES = ("load", "calibrate", "code", "tune", "forward", "write")
GIB = 1024  # MiB

#: the goals of docs/SCALE.md, one per shape
GOALS = {
    "llama-3-8b": {"preset": "2bit", "what": "Llama-3-8B `2bit` in under 1 GPU-hour", "kind": "time",
                   "limit_s": 3600.0, "device": "cuda"},
    "llama-3-70b": {"preset": "2bit", "what": "Llama-3-70B fits one 80 GiB GPU with a 24 GiB host", "kind": "memory",
                    "device_mib": 80.0 * GIB, "host_mib": 24.0 * GIB, "device": "cuda"},
    "tinyllama-1.1b": {"preset": "2bit-fast", "what": "TinyLlama-1.1B `2bit-fast` in under 45 min on a 2-core CPU",
                       "kind": "time", "limit_s": 45 * 60.0, "device": "cpu", "cores": 2},
}


class SpecError(SystemExit):
    """The CLI's JSON lacks a field this benchmark needs (exits with the message)."""


# --------------------------------------------------------------------------------------------- the CLI's JSON

def _need(obj: dict, key: str, kinds: tuple[type, ...], where: str, nullable: bool = False):
    if not isinstance(obj, dict) or key not in obj:
        raise SpecError(f"`rvqllm quantize --json` gave no {where}{key}: bench_scale.py reads the fields listed in "
                        "docs/SCALE.md (has the streaming pipeline landed?)")
    value = obj[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds) + (" or null" if nullable else "")
        raise SpecError(f"`rvqllm quantize --json`: {where}{key} is {value!r}, expected {want} (docs/SCALE.md)")
    return value


def check_cli_json(d: dict) -> None:
    """Raise :class:`SpecError` naming the first field of the spec (docs/SCALE.md) that ``d`` lacks."""
    num = (int, float)
    _need(d, "quantize_seconds", num, "")
    _need(d, "peak_rss_mib", num, "")
    _need(d, "threads", (int,), "")
    _need(d, "device", (str,), "")
    blocks = _need(d, "blocks", (list,), "")
    if not blocks:
        raise SpecError("`rvqllm quantize --json`: blocks is an empty list (no block was quantized?)")
    for i, b in enumerate(blocks):
        w = f"blocks[{i}]."
        _need(b, "block", (int,), w)
        secs = _need(b, "seconds", (dict,), w)
        for s in STAGES:
            _need(secs, s, num, w + "seconds.")
        _need(b, "total_seconds", num, w)
        _need(b, "peak_rss_mib", num, w)
        _need(b, "peak_device_mib", num, w, nullable=True)
    dist = _need(d, "distill", (dict,), "")
    if dist:
        _need(dist, "seconds", num, "distill.")
        _need(dist, "peak_rss_mib", num, "distill.")
        _need(dist, "peak_device_mib", num, "distill.", nullable=True)


def parse_cli_stdout(text: str) -> dict:
    """The JSON object ``rvqllm ... --json`` printed (the last top-level object if anything else was printed)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].rstrip() == "{":
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
    raise SpecError("`rvqllm quantize --json` printed no JSON object on stdout")


# --------------------------------------------------------------------------------------------- the arithmetic

def distill_params(shape: str, blocks: int, vocab: int) -> int:
    """Weights one distillation step multiplies by, ``blocks x block linears + vocab x hidden`` (the lm_head;
    the embedding lookup and norms cost next to nothing)."""
    s = SHAPES[shape]
    return blocks * block_linear_params(s["hidden"], s["intermediate"], s["heads"], s["kv_heads"]) \
        + vocab * s["hidden"]


def _max(values) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _row(b: dict) -> dict:
    return {**b["seconds"], "total": b["total_seconds"], "peak_rss_mib": b["peak_rss_mib"],
            "peak_device_mib": b["peak_device_mib"]}


def _kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def _comparable(a: dict, b: dict) -> bool:
    """Two ok runs that differ at most in how many blocks they measured (same shape, preset, device kind,
    vocabulary, calibration, threads and machine)."""
    def key(r: dict) -> tuple:
        mach = r.get("machine", {})
        return (r["shape"], r["preset"], _kind(r["cli"]["device"]), r["vocab_size"], r.get("calib_tokens_desc"),
                r["cli"]["threads"], mach.get("cores"), mach.get("device_name"))
    return a.get("status", "ok") == b.get("status", "ok") == "ok" and "cli" in a and "cli" in b and key(a) == key(b)


def _line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares ``(a, b)`` of ``y = a + b x``, or None with fewer than two distinct x."""
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def distill_fit(record: dict, others: list[dict], n_full: int) -> dict | None:
    """Distillation against the number of blocks, fitted over ``record`` and the comparable runs among
    ``others`` that measured other block counts: ``{"blocks": [m...], key: {"a", "b", "full"}}`` for
    ``seconds``, ``peak_device_mib``, ``peak_rss_mib`` (``full = a + b * N``), or None if all measured the
    same count. It splits distillation into a fixed part (lm_head, teacher) and a part per block, which the
    P scaling of one run cannot."""
    runs = [record, *(r for r in others if r is not record and _comparable(record, r))]
    runs = [r for r in runs if r["cli"].get("distill")]
    if record not in runs:
        return None
    out: dict = {"blocks": sorted({len(r["cli"]["blocks"]) for r in runs})}
    if len(out["blocks"]) < 2:
        return None
    for key in ("seconds", "peak_device_mib", "peak_rss_mib"):
        pts = [(len(r["cli"]["blocks"]), r["cli"]["distill"][key]) for r in runs
               if r["cli"]["distill"].get(key) is not None]
        line = _line(pts)
        if line is not None:
            out[key] = {"a": line[0], "b": line[1], "full": line[0] + line[1] * n_full}
    return out


def summarize(record: dict, others: list[dict] | tuple = ()) -> dict:
    """The per-stage means, whole-model extrapolation and goal ratios of one run ``record`` (as appended to
    ``--results``: ``shape``, ``preset``, ``vocab_size``, ``wall_seconds``, ``machine``, ``cli``: the CLI JSON).
    ``others``: more runs; comparable ones with other block counts give the distillation fit (:func:`distill_fit`).

    Seconds: the first block is warm-up and the last one is not typical (it has no next block to feed, so
    no ``forward``, and with distillation its ``calibrate`` also computes the teacher's logits), so the
    per-block figure is the mean over the ``middle`` blocks (2..m-1, needs m >= 3). Whole model, N blocks:
    ``blocks_full = first + (N - 2) * mean(middle) + last``. With m = 2 there is no middle block: the
    last stands in (``first + (N - 1) * last``, flagged); with m = 1, ``N * first``.
    ``distill_full = distill * P_full / P_run`` (:func:`distill_params`; calibration tokens unchanged), or,
    when runs of the same set-up at two or more block counts are at hand, the line through them at N
    (:func:`distill_fit`); ``distill_upper = distill * N / m`` is shown as an upper bound;
    ``mixed_full = mixed * N / m`` (``bpw_budget``'s sensitivity pass, before the blocks, visits each block);
    ``other = wall - sum(blocks.total) - distill - mixed`` (process start, opening the model, tokenizing, saving, and
    whatever the CLI times outside its blocks) taken as measured; ``total_full = blocks_full + distill_full + mixed_full + other``.
    Memory (MiB): ``block peak`` = max over blocks; ``distill_full = block peak + max(0, distill peak - block
    peak) * N / blocks measured`` (an upper bound: all of the rise is taken to grow with the blocks), or the
    fitted line at N;
    ``peak_full = max(block peak, distill_full)``, and for host RSS also the run's whole peak (the largest
    of its top-level, block and distillation figures: the top-level one is a high-water mark since the
    CLI's last reset), which streaming keeps from growing with N.
    """
    cli, shape = record["cli"], record["shape"]
    check_cli_json(cli)
    s = SHAPES[shape]
    n_full = s["blocks"]
    blocks = sorted(cli["blocks"], key=lambda b: b["block"])
    m = len(blocks)
    first, last = blocks[0], blocks[-1]
    middle = blocks[1:-1] if m >= 3 else blocks[1:] or blocks[:1]

    def mean(key_fn) -> float:
        return sum(key_fn(b) for b in middle) / len(middle)

    stage_mean = {st: mean(lambda b, st=st: b["seconds"][st]) for st in STAGES}
    total_mean = mean(lambda b: b["total_seconds"])
    block_sum = sum(b["total_seconds"] for b in blocks)
    distill = cli["distill"] or {}
    distill_s = float(distill.get("seconds", 0.0))
    wall = float(record.get("wall_seconds") or cli["quantize_seconds"])
    p_run = distill_params(shape, len(blocks), record["vocab_size"])
    p_full = distill_params(shape, n_full, s["vocab"])
    scale = p_full / p_run
    mem_scale = n_full / len(blocks)
    if m >= 3:
        blocks_full = first["total_seconds"] + (n_full - 2) * total_mean + last["total_seconds"]
    elif m == 2:
        blocks_full = first["total_seconds"] + (n_full - 1) * last["total_seconds"]
    else:
        blocks_full = n_full * first["total_seconds"]
    fit = distill_fit(record, list(others), n_full)
    distill_pscaled = distill_s * scale
    distill_full = fit["seconds"]["full"] if fit and "seconds" in fit else distill_pscaled
    mixed_s = float((cli.get("mixed") or {}).get("seconds", 0.0))  # bpw_budget's sensitivity pass: every block
    mixed_full = mixed_s * mem_scale  # visits every block twice, so it scales with their number
    other = wall - block_sum - distill_s - mixed_s
    inside_other = cli["quantize_seconds"] - block_sum - distill_s - mixed_s
    total_full = blocks_full + distill_full + mixed_full + other

    def mem(key: str, run_peak: float | None) -> dict:
        block_peak = _max(b[key] for b in blocks)
        dist_peak = distill.get(key) if distill else None
        dist_full = None
        if dist_peak is not None:
            base = block_peak or 0.0
            dist_full = base + max(0.0, dist_peak - base) * mem_scale
            if fit and key in fit:
                dist_full = fit[key]["full"]
        return {"block_peak": block_peak, "distill_peak": dist_peak, "distill_full": dist_full,
                "run_peak": run_peak, "full": _max([block_peak, dist_full, run_peak])}

    summary = {
        "blocks_measured": m, "blocks_full": n_full, "typical": m >= 3,
        "stage_mean": stage_mean, "total_mean": total_mean,
        "middle_peak_rss_mib": _max(b["peak_rss_mib"] for b in middle),
        "middle_peak_device_mib": _max(b["peak_device_mib"] for b in middle),
        "first": _row(first), "last": _row(last),
        "block_sum_s": block_sum, "distill_s": distill_s, "mixed_s": mixed_s, "mixed_full_s": mixed_full,
        "other_s": other, "other_inside_quantize_s": inside_other,
        "wall_s": wall, "params_run": p_run, "params_full": p_full, "scale": scale, "mem_scale": mem_scale,
        "blocks_full_s": blocks_full, "distill_full_s": distill_full, "total_full_s": total_full,
        "distill_pscaled_s": distill_pscaled, "distill_upper_s": distill_s * mem_scale, "distill_fit": fit,
        "device_mib": mem("peak_device_mib", None),
        # the CLI's top-level figure is the high-water mark since its last reset (Linux), so take the largest
        "host_mib": mem("peak_rss_mib", _max([cli["peak_rss_mib"], *(b["peak_rss_mib"] for b in blocks),
                                              distill.get("peak_rss_mib")])),
    }
    summary["goals"] = goals(record, summary)
    return summary


def goals(record: dict, summary: dict) -> list[dict]:
    """The goal rows of ``record``'s shape: ``{goal, value, limit, unit, ratio, applies, note}``."""
    goal = GOALS.get(record["shape"])
    if goal is None:
        return []
    notes = []
    if record["preset"] != goal["preset"]:
        notes.append(f"ran preset {record['preset']}, the goal is for {goal['preset']}")
    kind = _kind(record["cli"]["device"])
    if kind != goal["device"]:
        notes.append(f"ran on {kind}, the goal is for {goal['device']}")
    cores = record.get("machine", {}).get("cores")
    if goal.get("cores") and cores != goal["cores"]:
        notes.append(f"ran on {cores} cores, the goal is for {goal['cores']}")
    if record.get("vocab_kind") == "small":
        notes.append("small vocabulary: the real embeddings and lm_head are not in the fixed costs")
    if record.get("calib_differs"):
        notes.append("calibration differs from the preset's")
    if summary["blocks_measured"] < 3:
        notes.append(f"{summary['blocks_measured']} block(s) measured: no typical block (use --blocks 3)")
    rows = []
    if goal["kind"] == "time":
        v = summary["total_full_s"]
        rows.append({"goal": goal["what"], "value": v, "limit": goal["limit_s"], "unit": "s",
                     "ratio": v / goal["limit_s"]})
    else:
        dev, host = summary["device_mib"]["full"], summary["host_mib"]["full"]
        rows.append({"goal": goal["what"] + ": device", "value": dev, "limit": goal["device_mib"], "unit": "MiB",
                     "ratio": None if dev is None else dev / goal["device_mib"]})
        rows.append({"goal": goal["what"] + ": host", "value": host, "limit": goal["host_mib"], "unit": "MiB",
                     "ratio": None if host is None else host / goal["host_mib"]})
    for r in rows:
        r["applies"] = not notes
        r["note"] = "; ".join(notes)
    return rows


# --------------------------------------------------------------------------------------------- the tables

def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:,.0f}"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _dur(x: float) -> str:
    if x >= 3600:
        return f"{_s(x)} s ({x / 3600:.2f} h)"
    return f"{_s(x)} s" + (f" ({x / 60:.1f} min)" if x >= 120 else "")


def format_record(record: dict, others: list[dict] | tuple = ()) -> str:
    """Markdown for one results line: the run's header, per-block stages, whole-model estimate, goals
    (``others``: more runs, for the distillation fit of :func:`summarize`)."""
    shape, status = record["shape"], record.get("status", "ok")
    head = f"### {shape}: preset {record.get('preset')}, --device {record.get('device')}"
    if status != "ok":
        return f"{head}\n\n{status}: {record.get('reason', '')}\n"
    sm = summarize(record, others)  # from the CLI's JSON, so a results file reads with today's arithmetic
    cli, mach = record["cli"], record.get("machine", {})
    s = SHAPES[shape]
    m, n = sm["blocks_measured"], sm["blocks_full"]
    bp = block_params(s["hidden"], s["intermediate"], s["heads"], s["kv_heads"])
    calib = record.get("calib_tokens_desc") or "-"
    lines = [
        head + f", ran on {cli['device']}" + (f" ({mach['device_name']})" if mach.get("device_name")
                                               and str(cli["device"]).startswith("cuda") else ""), "",
        f"Synthetic {shape}: {m} of {n} decoder blocks ({bp / 1e6:,.1f}M weights each), hidden {s['hidden']}, "
        f"vocabulary {record['vocab_size']:,} ({record.get('vocab_kind', '?')}), written in "
        f"{_s(record.get('write_seconds'))} s; calibration {calib}; {cli['threads']} thread(s) on "
        f"{mach.get('cores', '?')} cores; torch {mach.get('torch', '?')}.", "",
    ]
    if m >= 3:
        which = f"mean of blocks 2..{m - 1}" if m > 3 else "block 2"
        intro = (f"Seconds per block by stage: {which} (the typical block; block 1 is warm-up and block {m}, the "
                 "last, has no next block to feed and computes the distillation teacher: both on their own rows, "
                 "out of the per-block figure); peak memory in MiB.")
    elif m == 2:
        which = "block 2 (the last)"
        intro = ("Seconds per block by stage: **only 2 blocks measured, so the block after the warm-up is the last "
                 "one, which is not typical** (no forward to the next block; with distillation its calibrate also "
                 "computes the teacher): it stands in for every block after the first. Use --blocks 3 or more. "
                 "Peak memory in MiB.")
    else:
        which = "block 1 (only one measured)"
        intro = ("Seconds per block by stage: one block measured, at once warm-up and last: it stands in for every "
                 "block. Use --blocks 3 or more. Peak memory in MiB.")

    def row(label: str, r: dict) -> str:
        return (f"| {label} | " + " | ".join(_s(r[st]) for st in STAGES)
                + f" | {_s(r['total'])} | {_mib(r['peak_rss_mib'])} | {_mib(r['peak_device_mib'])} |")

    lines += [
        intro, "",
        "| blocks | " + " | ".join(STAGES) + " | total | peak host RSS | peak device |",
        "|---|" + "---|" * (len(STAGES) + 3),
        row(which, {**sm["stage_mean"], "total": sm["total_mean"], "peak_rss_mib": sm["middle_peak_rss_mib"],
                    "peak_device_mib": sm["middle_peak_device_mib"]}),
    ]
    if m >= 2:
        lines.append(row("block 1 (warm-up)", sm["first"]))
    if m >= 3:
        lines.append(row(f"block {m} (last)", sm["last"]))
    how = {1: f"{n} x block 1", 2: f"block 1 + {n - 1} x block 2 (the last; not typical)"}.get(
        m, f"block 1 + {n - 2} x the typical block + block {m} (the last)")
    dev, host = sm["device_mib"], sm["host_mib"]
    ratio = f"P_full / P_run = {sm['params_full'] / 1e9:.2f}G / {sm['params_run'] / 1e9:.3f}G = {sm['scale']:.1f}"
    fit = sm["distill_fit"]
    pscaled = (f"x {ratio} (block linears + lm_head; same calibration tokens); upper bound x {n}/{m}: "
               f"{_dur(sm['distill_upper_s'])}")
    if fit and "seconds" in fit:
        f = fit["seconds"]
        dist_how = (f"line through the runs of this set-up at {', '.join(map(str, fit['blocks']))} blocks: "
                    f"{_s(f['a'])} s + {_s(f['b'])} s x blocks; (P scaling alone: {_dur(sm['distill_pscaled_s'])})")
    else:
        dist_how = pscaled + " (run other --blocks counts into the same --results for a fitted line)"
    mem_how = (f"line through {', '.join(map(str, fit['blocks']))} blocks" if fit else
               f"block peak + its rise x {n}/{m} (upper bound)")
    lines += [
        "", f"Whole model ({n} blocks), an estimate, not a measurement:", "",
        f"| part | measured ({m} block{'s' if m > 1 else ''}) | whole model | how |", "|---|---|---|---|",
        f"| decoder blocks | {_dur(sm['block_sum_s'])} | {_dur(sm['blocks_full_s'])} | {how} |",
        f"| distillation | {_dur(sm['distill_s'])} | {_dur(sm['distill_full_s'])} | {dist_how} |",
        *([f"| sensitivity pass (bpw_budget) | {_dur(sm['mixed_s'])} | {_dur(sm['mixed_full_s'])} | x {n}/{m} blocks |"]
          if sm.get("mixed_s") else []),
        f"| everything else | {_dur(sm['other_s'])} | {_dur(sm['other_s'])} | as measured: wall - blocks - "
        f"distillation - sensitivity pass (of which {_s(sm['other_inside_quantize_s'])} s inside quantize_seconds) |",
        f"| total (wall) | {_dur(sm['wall_s'])} | **{_dur(sm['total_full_s'])}** | |",
        f"| peak device memory, MiB | {_mib(_max([dev['block_peak'], dev['distill_peak']]))} | "
        f"**{_mib(dev['full'])}** | a block's peak; distillation: {mem_how} |",
        f"| peak host RSS, MiB | {_mib(host['run_peak'])} | **{_mib(host['full'])}** | the run's peak (the largest "
        f"figure it reports); distillation: {mem_how} |",
    ]
    if sm["goals"]:
        lines += ["", "| goal | whole model (estimate) | limit | ratio (< 1 meets it) | applies |", "|---|---|---|---|---|"]
        for g in sm["goals"]:
            val = _dur(g["value"]) if g["unit"] == "s" else f"{_mib(g['value'])} MiB"
            lim = _dur(g["limit"]) if g["unit"] == "s" else f"{_mib(g['limit'])} MiB"
            ratio = "-" if g["ratio"] is None else f"{g['ratio']:.2f}"
            lines.append(f"| {g['goal']} | {val} | {lim} | {ratio} | {'yes' if g['applies'] else 'no: ' + g['note']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- the machine

def machine_facts() -> dict:
    """Cores, torch version, CPU and GPU names, memory; the GPU read with nvidia-smi (no CUDA context here)."""
    import torch

    facts = {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
             "platform": platform.platform(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["host_mib"] = int(line.split()[1]) / 1024
                break
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            if out:
                name, total = (x.strip() for x in out[0].split(",", 1))
                facts.update({"device_name": name, "device_mib": float(total), "gpus": len(out)})
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return facts


def _cli_supports_device(python: str, env: dict) -> bool:
    res = subprocess.run([python, "-m", "rvqllm.cli", "quantize", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    return res.returncode == 0 and "--device" in res.stdout


# --------------------------------------------------------------------------------------------- running

def _model_folder(args, shape: str, root: Path, kwargs: dict) -> tuple[Path, float, bool]:
    """The synthetic model for ``shape`` (reused from ``--keep``'s cache when it matches): (folder, write s, reused)."""
    folder = root / f"{shape}-{args.blocks}b-{args.vocab}-s{args.seed}"
    rec = read_record(folder)
    if args.keep and rec is not None and all(rec.get(k) == v for k, v in kwargs.items() if k != "vocab") \
            and (kwargs["vocab"] is None or rec.get("vocab") == kwargs["vocab"]) and rec.get("seed") == args.seed:
        return folder, 0.0, True
    t0 = time.perf_counter()
    write_synthetic_llama(folder, **kwargs, seed=args.seed, overwrite=True)
    return folder, time.perf_counter() - t0, False


def _run_cli(cmd: list[str], env: dict, timeout: float | None, log: Path) -> tuple[int | None, str, float]:
    """Run ``cmd`` in its own process group (same session: whatever ends this benchmark's session ends it
    too), stderr to ``log``: (return code or None on timeout, stdout, wall s). The group is killed at the
    timeout and if this process is interrupted or terminated."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                process_group=0)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return None, out or "", time.perf_counter() - t0
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C, SIGTERM): take the run down with us
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, out, time.perf_counter() - t0


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _estimate(shape: str, blocks: int, vocab: int, done: list[dict]) -> float | None:
    """Seconds a run of ``shape`` should take (write + CLI), scaled from the largest shape already run: its
    blocks and distillation by the parameter ratio, the rest as it was. None before any run."""
    ok = [r for r in done if r.get("status") == "ok"]
    if not ok:
        return None
    ref = max(ok, key=lambda r: r["summary"]["params_run"])
    sm = ref["summary"]
    ratio = distill_params(shape, blocks, vocab) / sm["params_run"]
    write_ratio = model_params(**{**SHAPES[shape], "blocks": blocks, "vocab": vocab}) / max(1, ref["model_params"])
    return (sm["block_sum_s"] + sm["distill_s"] + sm.get("mixed_s", 0.0)) * ratio + max(0.0, sm["other_s"]) \
        + (ref.get("write_seconds") or 0.0) * write_ratio


def _append(path: Path | None, record: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def run_shape(shape: str, preset: str, args, env: dict, machine: dict, work: Path, models: Path,
              done: list[dict], t_start: float, others: list[dict] = ()) -> dict:
    """Write, quantize and summarize one shape; returns its results record (status ok/skipped/timeout/failed).
    ``done``: this invocation's records (for the budget); ``others``: all known runs (for the distillation fit)."""
    kwargs = synthetic_kwargs(shape, blocks=args.blocks, real_vocab=args.vocab == "real")
    vocab = kwargs["vocab"] or 320
    params = model_params(**{**SHAPES[shape], "blocks": args.blocks, "vocab": vocab})
    record = {"bench": "scale", "shape": shape, "preset": preset, "device": args.device, "blocks": args.blocks,
              "vocab_kind": args.vocab, "vocab_size": vocab, "model_params": params, "calib": args.calib,
              "calib_sequences": args.calib_sequences, "calib_seq_len": args.calib_seq_len, "machine": machine,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    left = None if args.budget_seconds is None else args.budget_seconds - (time.perf_counter() - t_start)
    est = _estimate(shape, args.blocks, vocab, done)
    if left is not None and (left < 20 or (est is not None and est > left)):
        why = f"{left:.0f} s of --budget-seconds {args.budget_seconds:.0f} left"
        why += f", and it needs about {est:.0f} s (scaled by parameters from the shapes already run)" \
            if est is not None else ""
        return {**record, "status": "skipped", "reason": why}
    free = shutil.disk_usage(models if models.exists() else models.parent).free
    if free < params * 2 * 2.5:
        return {**record, "status": "skipped", "reason": f"{free / 2**30:.1f} GiB free disk, the model and its "
                f"checkpoint need about {params * 2 * 2.5 / 2**30:.1f} GiB"}
    _say(f"{shape}: writing {args.blocks} blocks + vocabulary {vocab} ({params / 1e9:.2f}G weights) into {models} ...")
    folder, write_s, reused = _model_folder(args, shape, models, kwargs)
    record.update({"model": str(folder), "write_seconds": write_s, "model_reused": reused,
                   "model_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))})
    out = work / f"q-{shape}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [args.python, "-m", "rvqllm.cli", "quantize", str(folder), "--config", preset, "--out", str(out),
           "--device", args.device, "--json", "--calib", *args.calib]
    if args.calib_sequences:
        cmd += ["--calib-sequences", str(args.calib_sequences)]
    if args.calib_seq_len:
        cmd += ["--calib-seq-len", str(args.calib_seq_len)]
    record["command"] = shlex.join(cmd)
    left = None if args.budget_seconds is None else args.budget_seconds - (time.perf_counter() - t_start)
    timeout = left if left is None else max(1.0, left - 5.0)
    _say(f"{shape}: {record['command']}" + (f"  (killed after {timeout:.0f} s)" if timeout else ""))
    log = work / f"q-{shape}.stderr.log"
    rc, stdout, wall = _run_cli(cmd, env, timeout, log)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    record["wall_seconds"] = wall
    if rc is None:
        return {**record, "status": "timeout", "reason": f"killed at the budget after {wall:.0f} s; the log ended:\n"
                + _tail(log)}
    if rc != 0:
        return {**record, "status": "failed", "reason": f"exit {rc}; the log ended:\n" + _tail(log)}
    cli = parse_cli_stdout(stdout)
    check_cli_json(cli)
    record["cli"] = cli
    cfg = cli.get("config") or {}
    if cfg.get("calib_sequences") and cfg.get("calib_seq_len"):
        record["calib_tokens_desc"] = f"{cfg['calib_sequences']} x {cfg['calib_seq_len']} tokens of " \
                                      f"{', '.join(args.calib)}"
    record["calib_differs"] = bool(args.calib_sequences or args.calib_seq_len)
    record["status"] = "ok"
    record["summary"] = summarize(record, others)
    return record


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                    help="shapes to run, in this order (smallest first uses --budget-seconds best)")
    ap.add_argument("--preset", default=None,
                    help="rvqllm preset for every shape (default: each shape's goal preset: "
                         + ", ".join(f"{k} {g['preset']}" for k, g in GOALS.items()) + ")")
    ap.add_argument("--device", default="auto", help="passed to rvqllm quantize: auto, cpu, cuda, cuda:N")
    ap.add_argument("--blocks", type=int, default=3,
                    help="decoder blocks to write and quantize (default 3: warm-up, one typical block, the last; "
                         "with 2 the block after the warm-up is the last, which is not typical)")
    ap.add_argument("--calib", nargs="+", default=["kjv"], help="calibration sources passed to rvqllm quantize "
                    "(default: the offline reference KJV; a .txt file works where the reference is not installed)")
    ap.add_argument("--calib-sequences", type=int, default=None, help="override the preset's calibration sequences "
                    "(default: the preset's: 256 for 2bit, 48 for 2bit-fast)")
    ap.add_argument("--calib-seq-len", type=int, default=None, help="override the preset's tokens per sequence (512)")
    ap.add_argument("--vocab", choices=("real", "small"), default="real",
                    help="real: the model's own vocabulary (embeddings and lm_head at full size; default); small: the "
                         "byte tokenizer's 320 (quicker to write; fixed costs then miss the real embeddings)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="wall-clock budget for the whole benchmark: skip shapes that cannot finish, kill one at the end")
    ap.add_argument("--results", type=Path, default=None, help="append each run (or skip) as a JSON line here")
    ap.add_argument("--keep", action="store_true", help="keep the written models (in --models-dir) and reuse them")
    ap.add_argument("--models-dir", type=Path, default=None,
                    help="where --keep keeps the models (default: ~/.cache/rvqllm/synthetic)")
    ap.add_argument("--python", default=sys.executable, help="the Python that runs rvqllm (default: this one)")
    ap.add_argument("--table", type=Path, nargs="*", default=None, help="print the tables of these results files")
    args = ap.parse_args(argv)

    if args.table is not None:
        records = [json.loads(line) for p in args.table for line in p.read_text().splitlines() if line.strip()]
        for r in records:
            print(format_record(r, records))
        return 0
    if args.blocks < 1:
        ap.error("--blocks must be at least 1")
    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a `timeout` kill still ends the run it started
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PYTHONUNBUFFERED": "1"}
    if not _cli_supports_device(args.python, env):
        raise SystemExit("`rvqllm quantize` here has no --device option (or does not start): this benchmark needs the "
                         "streaming pipeline's CLI (docs/SCALE.md)")
    machine = machine_facts()
    work = Path(tempfile.mkdtemp(prefix="rvqllm-bench-scale-"))
    if args.keep:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        models = args.models_dir or Path(base) / "rvqllm" / "synthetic"
    else:
        models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []
    history = []  # earlier runs in --results: comparable ones at other block counts give the distillation fit
    if args.results is not None and args.results.is_file():
        history = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    try:
        for shape in args.shapes:
            preset = args.preset or GOALS[shape]["preset"]
            try:
                record = run_shape(shape, preset, args, env, machine, work, models, done, t_start,
                                   history + done)
            except SpecError as err:
                record = {"bench": "scale", "shape": shape, "preset": preset, "device": args.device,
                          "status": "failed", "reason": str(err), "machine": machine}
                _append(args.results, record)
                raise
            done.append(record)
            _append(args.results, record)
            print(format_record(record, history + done), flush=True)
            if not args.keep and record.get("model"):
                shutil.rmtree(record["model"], ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    skipped = [r for r in done if r["status"] != "ok"]
    for r in skipped:
        print(f"{r['shape']}: {r['status']}: {r['reason'].splitlines()[0]}")
    print(f"bench_scale: {len(done) - len(skipped)} of {len(done)} shapes measured in "
          f"{time.perf_counter() - t_start:.0f} s" + (f"; results appended to {args.results}" if args.results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
