"""Distillation experiments without re-coding: stop a run before its distillation, then branch it.

The whole-model distillation is the last stage of a run and the only one most tuning experiments change;
calibration and coding take the other half of `2bit`'s 27 minutes. This script saves that half:

    python scripts/redistill.py prepare --config 2bit --out out/base          # leaves out/base.partial
    python scripts/redistill.py branch out/base.partial --config VARIANT.yaml --out out/variant -- --json

``prepare`` runs ``rvqllm quantize`` until every block is coded and committed and the float model's
top-k targets are on disk (the run folder, rvqllm.resume), then stops where the distillation would
start. ``branch`` copies that folder to ``<out>.partial``, points its recorded config at ``VARIANT`` (only
fields that act in the distillation may differ: anything else would need the blocks coded again, and
is refused) and resumes it: the distillation runs from the coded model, and the checkpoint is published
to ``--out`` as ``rvqllm quantize --config VARIANT`` would have written it (coding is deterministic: the
KL before distillation equals a fresh run's to the last digit). Arguments after ``--`` go to
``rvqllm quantize`` (``--json``, ``--calib ...``: give ``prepare`` and ``branch`` the same ones).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from rvqllm.resume import run_dir_for

#: config fields used only by the whole-model distillation (with no block fine-tuning, also these two)
DISTILL_ONLY = {"description", "distill_epochs", "distill_lr", "distill_lr_tail", "distill_lr_decay",
                "distill_code_fraction", "distill_code_every", "distill_code_lr", "distill_chunk_tokens"}
TUNING = {"finetune_batch", "tune_dtype"}


def _stopped_before_distillation(folder: Path) -> bool:
    """Whether run folder ``folder`` has every block committed and is not distilled yet."""
    progress, run = folder / "progress.json", folder / "run.json"
    if not (progress.is_file() and run.is_file()):
        return False
    blocks = len(json.loads(run.read_text())["layers"])
    return json.loads(progress.read_text()) == {"blocks_done": blocks, "distilled": False}


class _Stop(KeyboardInterrupt):
    """Stops the run where the distillation would start; resumable, like Ctrl-C."""


def _prepare(model: str, config: str, out: Path, rest: list[str]) -> int:
    from rvqllm import pipeline
    from rvqllm.cli import main
    from rvqllm.config import RVQConfig

    if RVQConfig.load(config).distill_epochs <= 0:
        sys.exit(f"redistill: {config} has distill_epochs 0: nothing to stop before (use a config that distils)")

    def stop(*args, **kwargs):
        raise _Stop

    pipeline.distill_model = stop
    main(["quantize", model, "--config", config, "--out", str(out), *rest])
    partial = run_dir_for(out)
    if not _stopped_before_distillation(partial):
        sys.exit(f"redistill: the run did not reach its distillation; see the message above ({partial})")
    print(f"redistill: every block coded, distillation targets on disk: {partial}")
    return 0


def _branch(model: str, source: Path, config: str, out: Path, rest: list[str]) -> int:
    from rvqllm.cli import main
    from rvqllm.config import RVQConfig

    if not _stopped_before_distillation(source):
        sys.exit(f"redistill: {source} is not stopped before its distillation (a block not committed, already "
                 "distilled, or no run folder): prepare one first")
    run = json.loads((source / "run.json").read_text())
    old, new, defaults = run["config"], RVQConfig.load(config).to_dict(), RVQConfig().to_dict()
    changed = sorted(k for k in set(old) | set(new) if old.get(k, defaults.get(k)) != new.get(k))
    allowed = DISTILL_ONLY | (TUNING if new["finetune_epochs"] == 0 else set())
    if not set(changed) <= allowed or new["distill_epochs"] <= 0:
        sys.exit(f"redistill: {config} differs from the prepared run in {sorted(set(changed) - allowed)} "
                 f"(distill_epochs {new['distill_epochs']}): only {sorted(allowed)} may change, with distill_epochs > 0")
    target = run_dir_for(out)
    if target.exists() or out.exists():
        sys.exit(f"redistill: {target if target.exists() else out} exists: remove it or choose another --out")
    shutil.copytree(source, target)
    run["config"] = new
    (target / "run.json").write_text(json.dumps(run, indent=1))
    print(f"redistill: {source} -> {target}, changed: {', '.join(changed) or 'nothing'}", file=sys.stderr)
    return main(["quantize", model, "--config", config, "--out", str(out), "--resume", *rest])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["prepare", "branch"])
    ap.add_argument("source", nargs="?", type=Path, help="branch: the prepared run folder (<out>.partial)")
    ap.add_argument("--model", default="reference", help="the model, as rvqllm quantize takes it (default: reference)")
    ap.add_argument("--config", required=True, help="prepare: the run's config; branch: the variant's")
    ap.add_argument("--out", required=True, type=Path)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = ap.parse_args(argv[:cut]), argv[cut + 1 :]
    from rvqllm.errors import RVQError

    try:
        if args.action == "prepare":
            return _prepare(args.model, args.config, args.out, rest)
        if args.source is None:
            sys.exit("redistill: branch needs the prepared run folder (<out>.partial) as its first argument")
        return _branch(args.model, args.source, args.config, args.out, rest)
    except RVQError as err:  # a config that does not load: its one-line message
        sys.exit(f"redistill: {err}")


if __name__ == "__main__":
    sys.exit(main())
