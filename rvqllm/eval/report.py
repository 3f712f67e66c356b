"""Reports: the comparison table (markdown), the same rows as JSON, a plot of perplexity against bits per
weight, and the README model card written into a checkpoint folder.

A *row* is one evaluated model::

    {"model": str, "bpw": float (16.0 for the fp16 baseline), "bytes": int | None,
     "ppl": {text: float}, "tokens": {text: int}, "tasks": {task: {metric: float}} (optional),
     "baseline": bool (optional; the first row is the baseline when none says so)}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


def _task_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """``(task, metric)`` pairs present in any row, in first-seen order (``acc`` and ``acc_norm`` style
    metrics; counts such as ``sample_len`` are left out)."""
    cols: list[tuple[str, str]] = []
    for r in rows:
        for task, metrics in (r.get("tasks") or {}).items():
            for metric in metrics:
                if metric != "sample_len" and (task, metric) not in cols:
                    cols.append((task, metric))
    return cols


def _ratio(p: float | None, base: float | None) -> str:
    """``x (ln y)``: the ratio to the baseline and its natural log (logs average sanely across texts)."""
    if p is None or not base or p <= 0:
        return "—"
    return f"{p / base:.3f} (ln {math.log(p / base):.3f})"


def format_table(rows: list[dict], texts: list[str]) -> str:
    """Markdown table. Each row: ``{"model", "bpw", "bytes", "ppl": {text: float}}`` (+ optional
    ``"tasks"``). When the first row is the baseline (``"baseline": True``, or 16 bits per weight) every
    row gets its ratio to it beside each perplexity; without a baseline there are no ratio columns."""
    ratios = bool(rows) and _is_baseline(rows[0], 0, rows)
    head = ["model", "bpw (block linears)", "size on disk"]
    for t in texts:
        head += [f"ppl {t}", f"× base {t}"] if ratios else [f"ppl {t}"]
    cols = _task_columns(rows)
    head += [f"{task} {metric}" for task, metric in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]["ppl"] if ratios else {}
    for r in rows:
        cells = [r["model"], f"{r['bpw']:.3f}" if isinstance(r["bpw"], float) else str(r["bpw"]), _mib(r.get("bytes"))]
        for t in texts:
            p = r["ppl"].get(t)
            cells.append(f"{p:.3f}" if p is not None else "—")
            if ratios:
                cells.append(_ratio(p, base.get(t)))
        for task, metric in cols:
            v = (r.get("tasks") or {}).get(task, {}).get(metric)
            cells.append("—" if v is None else f"{v:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(rows: list[dict], path: str | Path, **meta: Any) -> Path:
    """``{"rows": rows, **meta}`` as indented JSON (``meta``: protocol, commands, ...)."""
    path = Path(path)
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str) + "\n")
    return path


def _is_baseline(row: dict, index: int, rows: list[dict]) -> bool:
    if any("baseline" in r for r in rows):
        return bool(row.get("baseline"))
    return index == 0 and row.get("bpw") == 16.0


def plot(rows: list[dict], texts: list[str], path: str | Path, title: str = "") -> Path:
    """PNG: perplexity (log scale) against bits per weight, one colour per text; each checkpoint is a
    point (named beside the first text's), the fp16 baseline a dashed horizontal line per text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    quantized = [r for i, r in enumerate(rows) if not _is_baseline(r, i, rows)]
    baselines = [r for i, r in enumerate(rows) if _is_baseline(r, i, rows)]
    for k, text in enumerate(texts):
        c = colors[k % len(colors)]
        pts = sorted((r["bpw"], r["ppl"][text], r["model"]) for r in quantized if r["ppl"].get(text) is not None)
        if pts:
            # markers only: the checkpoints may come from different configs, not one curve
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=c, label=f"rvq checkpoints, {text}")
            for x, y, name in pts if k == 0 else []:
                ax.annotate(Path(name).name, (x, y), textcoords="offset points", xytext=(5, -3), fontsize=7)
        for b in baselines:
            if b["ppl"].get(text) is not None:
                ax.axhline(b["ppl"][text], color=c, linestyle="--", linewidth=1,
                           label=f"fp16 baseline, {text} ({b['ppl'][text]:.2f})")
    ax.set_xlabel("bits per weight (block linear layers, all-in)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "perplexity against bits per weight")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def model_card(folder: str | Path, row: dict, baseline: dict | None, protocol: str, command: str = "") -> str:
    """README.md text for a checkpoint folder: what it is, how to load it, its config, bpw, size and
    the measured figures (with the protocol and, when given, the command that measured them)."""
    from ..checkpoint import read_quantization_config
    from ..size import summarize

    q = read_quantization_config(folder)
    s = summarize(q["layers"])
    cfg = q.get("rvq_config", {})
    base_model = baseline["model"].removesuffix(" (fp16 baseline)") if baseline else "unknown"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [rvqllm, rvq, quantized]",
        "---",
        f"# {Path(folder).name}",
        "",
        f"Residual-vector-quantized ({q['quant_method']}, format v{q['format_version']}) version of `{base_model}`, "
        "made with rvqllm.",
        "",
        "```python",
        "import rvqllm  # registers the rvq format with transformers",
        "from transformers import AutoModelForCausalLM",
        f"model = AutoModelForCausalLM.from_pretrained(\"{Path(folder).name}\")",
        "```",
        "",
        "## Size",
        f"- {s['layers']} quantized layers, {s['weights']:,} weights: **{s['bpw']:.3f} bpw** all-in "
        f"(codes {s['codes_bpw']:.3f} + codebooks {s['codebooks_bpw']:.3f} + scales {s['scales_bpw']:.3f}"
        + (f" + signs {s['signs_bpw']:.3f}" if s.get("signs_bpw") else "") + ")",
        f"- weights on disk: {_mib(row.get('bytes'))}" + (f" (fp16 baseline {_mib(baseline.get('bytes'))})" if baseline else ""),
        "",
        "## Config",
        *(f"- `{k}`: {v}" for k, v in cfg.items()),
        "",
        f"## Measured ({protocol})",
        format_table([baseline, row] if baseline else [row], list(row["ppl"])),
    ]
    if command:
        lines += ["", f"Measured with: `{command}`"]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, row: dict, baseline: dict | None, protocol: str, command: str = "") -> Path:
    """Write :func:`model_card` as ``folder/README.md`` (replacing an older card)."""
    path = Path(folder) / "README.md"
    path.write_text(model_card(folder, row, baseline, protocol, command))
    return path
