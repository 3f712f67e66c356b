"""The comparison table: one row per model, perplexity per text, ratio to the baseline."""

from __future__ import annotations


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


def format_table(rows: list[dict], texts: list[str]) -> str:
    """Markdown table. Each row: ``{"model", "bpw", "bytes", "ppl": {text: float}}``; the first row is the
    baseline that ratios refer to."""
    head = ["model", "bpw (block linears)", "size on disk"]
    for t in texts:
        head += [f"ppl {t}", f"× base {t}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]["ppl"] if rows else {}
    for r in rows:
        cells = [r["model"], f"{r['bpw']:.3f}" if isinstance(r["bpw"], float) else str(r["bpw"]), _mib(r.get("bytes"))]
        for t in texts:
            p = r["ppl"].get(t)
            cells += [f"{p:.3f}" if p is not None else "—", f"{p / base[t]:.3f}" if p is not None and base.get(t) else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
