"""``rvqllm quantize | eval | info | report | demo``: the command-line edge.

This is the only module that reads the environment or prints; errors a user can cause are printed as
one line (``error: ...``) with exit code 2, and a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .config import RVQConfig, available_presets
from .errors import ResumableError, RVQError
from .reference import CALIB_TEXTS, EVAL_TEXTS, TEXTS

DEFAULT_PRESET = "2bit"  #: `rvqllm quantize`'s preset
DEMO_PRESET = "2bit-fast"  #: `rvqllm demo`'s preset: minutes on a laptop; the demo's last line names the best one
#: perplexity windows per text in `rvqllm demo` (ppl-512x16: a quarter of the ppl-512x64 protocol, same windows first)
DEMO_WINDOWS = 16
BEST_PRESET = "2bit"
#: minutes the 2bit preset's quantization of the reference took on this project's 2-core CPU (alone on an AMD
#: EPYC: 1,793.2 s in session 25, 1,956.3 s in session 26, 1,611.5 s in session 27, 1,536.2 s in session 29, the
#: README's time line; session 16's took 1,711.9 s on an Intel Xeon, session 12's 24 min): printed by the demo
BEST_PRESET_MINUTES = "16-33"  # 2bit alone on 2 cores: 16.1 min on an Intel Xeon (session 32), 25.6-32.6 on an AMD EPYC (sessions 26-29)
DEFAULT_TEXTS = list(EVAL_TEXTS)  #: kjv, shakespeare, wiki (calibration's domains), django (held out), news, usenet (out of domain)


class _Progress:
    """tqdm progress bars on stderr, silenced by --quiet/--json."""

    live: set = set()  #: bars not finished yet (closed before an error line, so that it starts a line of its own)

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bars: dict[str, object] = {}

    def __call__(self, key: str, done: int, total: int, label: str | None = None) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = tqdm(total=total, desc=key, unit="step", file=sys.stderr, dynamic_ncols=True)
            _Progress.live.add(bar)
        if label:
            bar.set_postfix_str(label[-40:], refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            self.bars.pop(key)
            _Progress.live.discard(bar)

    @staticmethod
    def close_all() -> None:
        for bar in list(_Progress.live):
            bar.close()
        _Progress.live.clear()


def _say(args: argparse.Namespace, *msg: object) -> None:
    if not (args.quiet or getattr(args, "json", False)):
        print(*msg, file=sys.stderr)


def _calibration(args, tokenizer, cfg: RVQConfig):
    from .data import calibration_tokens, load_text

    texts = [load_text(s, split="calib", text_column=args.text_column) for s in args.calib]
    return calibration_tokens(texts, tokenizer, cfg.calib_sequences, cfg.calib_seq_len, cfg.seed)


def _load_config(args) -> RVQConfig:
    if Path(args.config).is_dir():
        raise RVQError(f"--config {args.config} is a folder: give a preset name ({', '.join(available_presets())}) "
                       "or a YAML file")
    cfg = RVQConfig.load(args.config)
    changes = {k: v for k, v in {
        "calib_sequences": args.calib_sequences, "calib_seq_len": args.calib_seq_len, "seed": args.seed,
        "calib_batch_size": getattr(args, "calib_batch_size", None),
    }.items() if v is not None}
    return cfg.replace(**changes) if changes else cfg


def _check_writable(target: Path, option: str, *, inside: bool = False) -> None:
    """Refuse, before any work, an output ``target`` that cannot be written: a file in its way, or a
    folder without write permission. ``inside``: files are written in ``target`` itself (a report folder);
    else beside it (a checkpoint is assembled in a sibling and renamed into place)."""
    if target.exists() and not target.is_dir():
        raise RVQError(f"{option} {target} is a file, not a folder: choose another {option}")
    target = Path(os.path.abspath(target))
    where = target if inside else target.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise RVQError(f"{option} {target} cannot be created: {where} is a file, not a folder; choose another {option}")
    if not os.access(where, os.W_OK | os.X_OK):
        raise RVQError(f"{option} {target} cannot be written: {where} is read-only for you (permission denied); "
                       f"choose another {option} on a writable location")


def cmd_quantize(args: argparse.Namespace) -> dict:
    import torch

    from .checkpoint import check_output_folder
    from .meter import peak_rss_mib
    from .placement import placement_from_env, shutdown

    cfg = _load_config(args)
    out = Path(args.out)
    _check_writable(out, "--out")
    check_output_folder(out, args.overwrite)
    _check_input_untouched(args.model, out)
    placement = placement_from_env(args.device)
    try:
        if not placement.is_main:
            args.quiet, args.json = True, False  # one voice: rank 0 reports
        result = _quantize(args, cfg, out, placement)
    finally:
        shutdown(placement)
    # the meter resets the kernel's high-water mark per block: the run's peak is the largest of them all
    peaks = [b.get("peak_rss_mib", 0.0) for b in result.get("blocks", [])]
    peaks.append(result.get("distill", {}).get("peak_rss_mib", 0.0))
    result["peak_rss_mib"] = round(max([peak_rss_mib(), *peaks]), 1)
    result["threads"] = torch.get_num_threads()
    return result


def _quantize(args: argparse.Namespace, cfg: RVQConfig, out: Path, placement) -> dict:
    import shutil

    import torch

    from .checkpoint import publish
    from .models import open_source
    from .pipeline import run
    from .resume import run_dir_for
    from .size import folder_bytes, summarize

    run_dir = run_dir_for(out)
    resume = getattr(args, "resume", False)
    if run_dir.exists() and not resume and not args.overwrite:
        raise RVQError(f"an interrupted run left {run_dir}: pass --resume to continue it, "
                       "or --overwrite to start over")
    if resume and not (run_dir / "run.json").is_file():
        _say(args, f"no interrupted run in {run_dir}: starting from the first block")
    _say(args, f"loading {args.model} ...")
    source, tokenizer = open_source(args.model, tokenizer=args.tokenizer, say=lambda m: _say(args, m))
    calib = _calibration(args, tokenizer, cfg)
    _say(args, f"calibration: {calib.shape[0]} sequences x {calib.shape[1]} tokens from {', '.join(args.calib)}; "
               f"device {placement.device}" + (f", {placement.world} ranks" if placement.world > 1 else ""))
    if placement.is_main and not (resume and (run_dir / "run.json").is_file()):
        _check_disk(source, cfg, calib, out)
    bar = _Progress(args.quiet or args.json)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    finished: list[int] = []  # blocks this process quantized (a resumed run skips the committed ones)

    def on_block(i: int, n: int, acc: dict) -> None:
        finished.append(i)
        left = (time.perf_counter() - t0) / len(finished) * (n - i - 1)
        dev = f", device {acc['peak_device_mib'] / 1024:.1f} GiB" if acc.get("peak_device_mib") is not None else ""
        if not (args.quiet or args.json):
            from tqdm import tqdm

            tqdm.write(f"block {i + 1}/{n}: {acc['total_seconds']:.1f} s ("
                       + ", ".join(f"{k} {v:.1f}" for k, v in acc["seconds"].items() if v >= 0.05)
                       + f"), peak RSS {acc['peak_rss_mib'] / 1024:.2f} GiB{dev}, ETA {left / 60:.1f} min",
                       file=sys.stderr)  # above the progress bar, not into it

    had_run = resume and (run_dir / "run.json").is_file()
    try:
        report = run(source, cfg, calib, placement, progress=lambda name, d, n: bar("quantize", d, n, name),
                     on_block=on_block, run_dir=run_dir, resume=resume, reset_host_peak=True)
    except BaseException as err:
        # keep what a resume can continue from (a kill, Ctrl-C, a full disk, out of memory); an input error
        # or a run with nothing finished leaves nothing behind
        # (a file that could not be written comes as an RVQError caused by the OSError)
        resumable = (isinstance(err, KeyboardInterrupt | OSError | ResumableError)
                     or isinstance(err.__cause__, OSError)) and _blocks_done(run_dir) > 0
        if placement.is_main and not had_run and not resumable:
            shutil.rmtree(run_dir, ignore_errors=True)
        if placement.is_main and resumable:
            args.kept_run = run_dir  # main() says so in the one line it prints
        raise
    args.kept_run = run_dir  # every block is committed: a failed save is resumed by saving again
    seconds = time.perf_counter() - t0
    model = source.model
    result = {"out": str(out), "config": cfg.to_dict(), "quantize_seconds": round(seconds, 1),
              "device": str(placement.device), "ranks": placement.world, "calib_tokens": report.calib_tokens,
              "resumed_layers": sum(1 for r in report.layers.values() if r.get("resumed")),
              "blocks": [{"block": i, **b} for i, b in sorted(report.blocks.items())], "distill": report.distill,
              **({"mixed": report.mixed} if report.mixed else {})}
    if not placement.is_main:
        return result
    publish(run_dir, out, model=model, tokenizer=tokenizer, overwrite=args.overwrite)
    args.kept_run = None
    shutil.rmtree(run_dir, ignore_errors=True)  # its shards are the checkpoint's files now (hard links)
    summary = summarize(model.rvq_layers)
    result.update({"bpw": summary["bpw"], "bytes": folder_bytes(out), "layers": summary["layers"],
                   "finetune_seconds": round(sum(b.get("finetune_seconds", 0.0) for b in report.blocks.values()), 1)})
    _say(args, f"saved {out}: {summary['layers']} layers at {summary['bpw']:.3f} bpw, "
               f"{result['bytes'] / 2**20:.1f} MiB, quantized in {seconds:.0f} s on {placement.device}")
    tuned = [b for b in report.blocks.values() if b.get("error_before", 0) > 0]
    if tuned:
        gain = [b["error_after"] / b["error_before"] for b in tuned]
        undone = sum(not b.get("finetune_kept", True) for b in tuned)
        retried = sum(b.get("finetune_attempts", 1) > 1 for b in tuned)
        _say(args, f"block fine-tuning: {result['finetune_seconds']:.0f} s; block output error x"
                   f"{sum(gain) / len(gain):.2f} on average; {retried} blocks retried at a lower rate, "
                   f"{undone} kept as coded (tuning made them worse)")
    if report.mixed:
        _say(args, f"mixed precision: code shapes chosen by sensitivity in {report.mixed['seconds']:.0f} s: "
                   + ", ".join(f"{n} layers {k}" for k, n in report.mixed["shapes"].items()))
    if report.distill:
        _say(args, f"distillation at learning rate {report.distill['lr']:.2g}: {report.distill['seconds']:.0f} s; "
                   f"KL {report.distill['kl_before']:.4f} -> "
                   f"{report.distill['kl_after']:.4f}")
    return result


def _blocks_done(run_dir: Path) -> int:
    """Blocks an (interrupted) run folder has committed; 0 when it has none or cannot be read."""
    try:
        return int(json.loads((run_dir / "progress.json").read_text())["blocks_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _check_disk(source, cfg: RVQConfig, calib, out: Path) -> None:
    """Refuse to start when the output's filesystem cannot hold the run and the checkpoint."""
    import shutil

    from .size import estimate_run_bytes

    layers = {n: s for i in range(len(source)) for n, s in source.layers(i, cfg.skip).items()}
    hidden = max((s[1] for s in layers.values()), default=0)
    hidden = getattr(source.model.config.get_text_config(), "hidden_size", hidden) or hidden
    need = estimate_run_bytes(layers, source.other_bytes(), cfg, int(calib.numel()), int(hidden), blocks=len(source))
    where = out.resolve().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need["total"] * 1.05:
        raise RVQError(f"not enough disk space in {where}: this run needs about {need['total'] / 2**30:.2f} GiB "
                       f"(checkpoint {need['checkpoint'] / 2**30:.2f} GiB, run folder {need['run'] / 2**30:.2f} GiB) "
                       f"and {free / 2**30:.2f} GiB are free; free space or choose another --out")


def _check_input_untouched(model_spec: str, out: Path) -> None:
    """Refuse an output folder that is or contains the input model, or lies inside its folder."""
    from .models import resolve

    where, gguf = resolve(model_spec)
    src = Path(where) / gguf if gguf else Path(where)
    if not src.exists():
        return
    src, dst = src.resolve(), out.resolve()
    if dst == src or dst in src.parents or (not gguf and src in dst.parents):
        raise RVQError(f"output folder {out} overlaps the input model folder {src}: the input model is never "
                       "modified; choose an output folder outside it")


def checkpoint_config(folder: str | Path) -> tuple[dict, dict]:
    """``(config.json, its quantization_config)`` of a checkpoint folder, checked; a model folder that is not
    a checkpoint is refused with what to do with it instead."""
    from .validate import check_quantization_config, read_config

    config = read_config(folder)
    if "quantization_config" not in config:
        raise RVQError(f"{folder} is a model folder, not an rvqllm checkpoint (its config.json has no "
                       f"quantization_config): quantize it with `rvqllm quantize {folder} --out DIR`, or give it "
                       "as --baseline to compare checkpoints with")
    return config, check_quantization_config(config, folder)


def quick_check(folder: str | Path) -> dict:
    """Cheap consistency check of a checkpoint folder; returns its ``quantization_config``.

    :func:`checkpoint_config`, then :func:`rvqllm.validate.check_headers`: every weights file present with
    exactly the size its header declares, the checksums the headers hold, and the tensors the config
    implies (names, shapes, dtypes), in work bounded by the files whatever the config declares. Headers
    only, a few KiB per file: a truncated, missing or swapped file is caught, a flipped data byte is not
    (``rvqllm info DIR --verify`` and loading check every byte)."""
    from .validate import check_headers

    _, q = checkpoint_config(folder)
    check_headers(Path(folder))
    return q


def _check_checkpoints(folders: list[Path]) -> None:
    """The cheap check of every checkpoint, before minutes of evaluation (``rvqllm info --verify`` does all)."""
    for folder in folders:
        quick_check(folder)


def _tokenizers(args, quantized: list[Path], baseline: str | None) -> tuple[object | None, dict[Path, object]]:
    """``(--tokenizer's tokenizer or None, {checkpoint: tokenizer or None})``, loaded before any evaluation; a
    checkpoint without tokenizer files takes --tokenizer's, else the baseline's (``None`` here)."""
    from .models import TOKENIZER_FILES, load_tokenizer, resolve_tokenizer, tokenizer_files

    given = getattr(args, "tokenizer", None)
    override = load_tokenizer(*resolve_tokenizer(given)) if given else None
    own: dict[Path, object] = {}
    for folder in quantized:
        if override is not None:
            own[folder] = override
        elif tokenizer_files(folder):
            own[folder] = load_tokenizer(folder)
        elif baseline is None:
            from .validate import validate_checkpoint

            validate_checkpoint(folder)  # a damaged checkpoint says so first: that is the bigger problem
            raise RVQError(f"no tokenizer in {folder}: none of {', '.join(TOKENIZER_FILES)} found there, and no "
                           "--baseline to take one from; give one with --tokenizer PATH_OR_ID (a folder holding "
                           "them, e.g. the original model's, a .gguf file or a hub id)")
        else:
            own[folder] = None
    return override, own


def _evaluate_rows(args, quantized: list[Path], baseline: str | None) -> tuple[list[dict], list[str]]:
    from .checkpoint import load
    from .data import load_text, source_label
    from .eval import evaluate
    from .models import load_model, resolve
    from .size import folder_bytes, summarize

    _check_checkpoints(quantized)  # a broken checkpoint fails now, not after the baseline's evaluation
    override, own = _tokenizers(args, quantized, baseline)
    texts = {source_label(s): load_text(s, "test", text_column=args.text_column) for s in args.text}
    bar = _Progress(args.quiet or args.json)
    rows = []

    def run(label, model, tokenizer):
        res = evaluate(model, tokenizer, texts, context=args.context, windows=args.windows,
                       progress=lambda n, d, t: bar(f"ppl {label} {n}", d, t))
        return {k: r.ppl for k, r in res.items()}, {k: r.tokens for k, r in res.items()}

    def tasks(label, model, tok) -> dict:
        if not getattr(args, "tasks", None):
            return {}
        from .eval.lm_eval_bridge import run_tasks

        _say(args, f"lm-eval {', '.join(args.tasks)} on {label} ...")
        return {"tasks": run_tasks(model, tok, args.tasks, limit=args.task_limit, include_path=args.include_path)}

    tokenizer = None
    if baseline:
        from .eval import baseline_cache
        from .models import load_tokenizer, resolve_tokenizer

        where, gguf = resolve(baseline)
        given = getattr(args, "tokenizer", None)
        key = None if getattr(args, "tasks", None) else baseline_cache.key(
            where, gguf, str(resolve_tokenizer(given)[0]) if given else None, texts, args.context, args.windows)
        cached = None if getattr(args, "no_cache", False) else baseline_cache.get(key)
        size = folder_bytes(Path(where) / gguf if gguf else where) if Path(where).exists() else None
        label = f"{baseline} (fp16 baseline)"
        if cached:
            tokenizer = override or load_tokenizer(where, gguf)
            ppl, tokens = cached["ppl"], cached["tokens"]
            _say(args, f"baseline perplexity: cached from {cached['measured']} (--no-cache measures it again)")
            extra = {}
        else:
            model, tokenizer = load_model(baseline, tokenizer=override)
            ppl, tokens = run("baseline", model, tokenizer)
            baseline_cache.put(key, ppl, tokens)
            extra = tasks("baseline", model, tokenizer)
            del model
        rows.append({"model": label, "bpw": 16.0, "bytes": size, "ppl": ppl, "tokens": tokens, "baseline": True,
                     **({"cached": cached["measured"]} if cached else {}), **extra})
    for folder in quantized:
        model = load(folder)
        tok = own[folder] or tokenizer
        ppl, tokens = run(folder.name, model, tok)
        rows.append({"model": str(folder), "bpw": summarize(model.rvq_layers)["bpw"], "bytes": folder_bytes(folder),
                     "ppl": ppl, "tokens": tokens, **tasks(folder.name, model, tok)})
        del model
    return rows, list(texts)


def cmd_eval(args: argparse.Namespace) -> dict:
    from .eval.report import format_table

    if not args.checkpoints and not args.baseline:
        raise RVQError("nothing to evaluate: give checkpoint folders, a --baseline, or both")
    rows, names = _evaluate_rows(args, [Path(d) for d in args.checkpoints], args.baseline)
    table = format_table(rows, names)
    if not args.json:
        print(f"perplexity: context {args.context}, {args.windows} windows, "
              f"{args.windows * (args.context - 1)} predicted tokens per text")
        print(table)
    return {"rows": rows, "context": args.context, "windows": args.windows, "table": table}


def cmd_report(args: argparse.Namespace) -> dict:
    """Evaluate checkpoints beside the baseline; write report.md/.json/.png and a README card per checkpoint."""
    from .eval.report import format_table, model_card, plot, write_json

    folders = [Path(d) for d in args.checkpoints]
    out = Path(args.out_dir)
    for f in folders:
        if f.is_dir() and not (f / "config.json").exists():
            raise RVQError(f"{f} is not an rvqllm checkpoint folder (no config.json): give folders written by "
                           "`rvqllm quantize`")
    _check_checkpoints(folders)
    _check_writable(out, "--out-dir", inside=True)
    for f in [] if args.no_card else folders:
        if not os.access(f, os.W_OK | os.X_OK):
            raise RVQError(f"cannot write the model card README.md into {f} (read-only for you): pass --no-card, "
                           "or make the folder writable")
    rows, names = _evaluate_rows(args, folders, args.baseline)
    protocol = (f"ppl-{args.context}x{args.windows}: context {args.context}, {args.windows} windows, "
                f"{args.windows * (args.context - 1)} predicted tokens per text")
    command = "rvqllm " + " ".join(sys.argv[1:]) if sys.argv and "report" in sys.argv else ""
    table = format_table(rows, names)
    out.mkdir(parents=True, exist_ok=True)
    # each file is written under a temporary name and renamed: a failure never leaves half a file
    _write_atomic(out / "report.md", lambda p: p.write_text(
        f"Perplexity {protocol}.\n\n{table}\n" + (f"\nCommand: `{command}`\n" if command else "")))
    _write_atomic(out / "report.json", lambda p: write_json(rows, p, protocol=protocol, command=command, texts=names))
    png = _write_atomic(out / "report.png", lambda p: plot(
        rows, names, p, title=f"rvqllm: perplexity vs bits per weight ({protocol.split(':')[0]})"))
    base = next((r for r in rows if r.get("baseline")), None)
    cards = []
    if not args.no_card:
        for folder, row in zip(folders, [r for r in rows if not r.get("baseline")], strict=True):
            text = model_card(folder, row, base, protocol, command)
            cards.append(str(_write_atomic(folder / "README.md", lambda p, t=text: p.write_text(t))))
    if not args.json:
        print(f"perplexity: {protocol}")
        print(table)
        _say(args, f"wrote {out / 'report.md'}, {out / 'report.json'}, {png}" + (f"; model cards: {', '.join(cards)}" if cards else ""))
    return {"rows": rows, "table": table, "files": [str(out / "report.md"), str(out / "report.json"), str(png)],
            "model_cards": cards}


def _write_atomic(path: Path, write) -> Path:
    """``write(tmp)`` then rename ``tmp`` to ``path``: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")  # the suffix tells plot() the format
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def cmd_info(args: argparse.Namespace) -> dict:
    from .size import folder_bytes, layer_bpw, summarize
    from .validate import check_headers, validate_checkpoint

    _, q = checkpoint_config(args.checkpoint)
    if args.verify:
        checked = validate_checkpoint(args.checkpoint)
        _say(args, f"verified: {len(checked.tensors)} tensors, checksums, shapes, dtypes, code ranges, finite values")
    else:
        try:
            check_headers(Path(args.checkpoint))  # headers only
        except RVQError as err:
            raise RVQError(f"{err} (`rvqllm info {args.checkpoint} --verify` runs every check)") from err
    s = summarize(q["layers"])
    info = {"folder": args.checkpoint, "format_version": q["format_version"], "config": q.get("rvq_config", {}),
            **s, "bytes": folder_bytes(args.checkpoint)}
    if not args.json:
        print(f"{args.checkpoint}: rvq format v{q['format_version']}, {s['layers']} quantized layers, "
              f"{s['weights']:,} weights")
        shared = any(spec.get("shared_codebooks") for spec in q["layers"].values())
        print(f"bpw {s['bpw']:.4f} = codes {s['codes_bpw']:.4f} + codebooks {s['codebooks_bpw']:.4f}"
              + (" (one shared codebook, stored once)" if shared else "") + f" + scales {s['scales_bpw']:.4f}" + (f" + signs {s['signs_bpw']:.4f}" if s["signs_bpw"] else "")
              + f"; weights on disk {info['bytes'] / 2**20:.2f} MiB")
        print("config: " + ", ".join(f"{k}={v}" for k, v in q.get("rvq_config", {}).items() if k != "description"))
        if args.layers:
            for name, spec in q["layers"].items():
                code = (f"trellis L={spec['trellis_state_bits']} k={spec['trellis_step_bits']} table=2^{spec['bits']}"
                        if "trellis_state_bits" in spec else
                        f"d={spec['vector_dim']} S={spec['stages']} b={spec['bits']}")
                print(f"  {name}: {spec['out_features']}x{spec['in_features']} {code} bpw={layer_bpw(spec):.3f}"
                      + (" (shared codebook not counted)" if spec.get("shared_codebooks") else ""))
    return info


def cmd_demo(args: argparse.Namespace) -> dict:
    """Quantize the reference model with a preset, then print the table against the fp16 baseline."""
    import os

    from .eval.report import format_table

    args.model = "reference"
    out = Path(args.out or f"out/smollm2-135m-{Path(args.config).stem}")
    args.out = str(out)
    if out.exists() and (out / "config.json").exists() and not args.overwrite:
        _say(args, f"{out} exists: re-using it (pass --overwrite to quantize again)")
        qres = None
    else:
        args.overwrite = args.overwrite or out.exists()  # an interrupted demo is still refused without --resume
        qres = cmd_quantize(args)
    rows, names = _evaluate_rows(args, [out], "reference")
    table = format_table(rows, names)
    if not args.json:
        print(f"\nSmolLM2-135M-Instruct, preset {args.config}; perplexity: context {args.context}, "
              f"{args.windows} windows, {args.windows * (args.context - 1)} predicted tokens per text"
              + (" (the full ppl-512x64 protocol: add --windows 64)" if args.windows != 64 else ""))
        if qres:
            print(f"quantization: {qres['quantize_seconds']} s on {qres['threads']} threads ({os.cpu_count()} cores)")
        print(table)
        if Path(args.config).stem != BEST_PRESET:
            print(best_preset_line())
    return {"quantize": qres, "rows": rows, "table": table}


def best_preset_line() -> str:
    """The demo's last line: how to get the best quality, and what it costs."""
    return (f"best quality: rvqllm demo --config {BEST_PRESET} (its quantization took about {BEST_PRESET_MINUTES} min "
            "on a 2-core CPU)")


def _preset_description(name: str) -> str:
    try:
        return RVQConfig.load(name).description or "(no description)"
    except RVQError as err:
        return f"(unreadable: {err})"


def build_parser() -> argparse.ArgumentParser:
    presets = "; ".join(f"{n}: {_preset_description(n)}" for n in available_presets())
    p = argparse.ArgumentParser(prog="rvqllm", description="Residual vector quantization of Hugging Face causal LMs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
        sp.add_argument("--json", action="store_true", help="print one JSON object with the results")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    def quant_opts(sp, preset: str = DEFAULT_PRESET):
        sp.add_argument("--config", default=preset,
                        help=f"preset name ({presets}) or YAML file (default: {preset}); more stages/bits cost time "
                             "and size, gain quality")
        sp.add_argument("--calib", nargs="+", default=list(CALIB_TEXTS),
                        help=f"calibration text sources (default: {' '.join(CALIB_TEXTS)}): reference names ({', '.join(TEXTS)}), "
                             ".txt/.jsonl/.parquet "
                             "files or data folders, datasets names as NAME[:CONFIG[:SPLIT]] (e.g. "
                             "wikitext:wikitext-2-raw-v1); text from the domain you care about helps quality")
        sp.add_argument("--calib-sequences", type=int, help="override the preset: calibration sequences "
                        "(time grows linearly; more is steadier)")
        sp.add_argument("--calib-seq-len", type=int, help="override the preset: tokens per calibration sequence "
                        "(time grows linearly with it; the presets use 512)")
        sp.add_argument("--seed", type=int, help="override the preset's seed (where calibration windows are drawn, "
                        "k-means starts); results vary a little with it, never the cost")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace the output folder (an rvqllm checkpoint) and any interrupted run of it")
        sp.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its last finished decoder block (<out>.partial/)")
        sp.add_argument("--device", default="auto",
                        help="where the quantization runs: auto (CUDA when present), cpu, cuda, cuda:N; under "
                             "torchrun each rank takes cuda:LOCAL_RANK")
        sp.add_argument("--calib-batch-size", type=int, help="override the preset: calibration sequences per forward "
                        "pass (lower it when the device runs out of memory)")
        tokenizer_opt(sp)
        text_column(sp)

    def tokenizer_opt(sp):
        if not any(a.dest == "tokenizer" for a in sp._actions):
            sp.add_argument("--tokenizer", metavar="PATH_OR_ID",
                            help="tokenizer to use instead of the model's own, needed for a model or checkpoint "
                                 "folder without one: a folder with tokenizer.json / tokenizer_config.json, a .gguf "
                                 "file or a hub id (e.g. the original model's)")

    def text_column(sp):
        if not any(a.dest == "text_column" for a in sp._actions):
            sp.add_argument("--text-column", default="text",
                            help="column/field holding the text in .jsonl/.parquet files and datasets (default: text)")

    def eval_opts(sp):
        text_column(sp)
        tokenizer_opt(sp)
        sp.add_argument("--no-cache", action="store_true",
                        help="measure the baseline's perplexity again instead of reusing the number measured earlier "
                             "on this machine for the same model files, texts, protocol and library versions")
        sp.add_argument("--text", nargs="+", default=DEFAULT_TEXTS,
                        help=f"evaluation texts (default: {' '.join(EVAL_TEXTS)}; django is held out, news and usenet "
                             f"are kinds of text the default calibration has none of): reference names ({', '.join(TEXTS)}), "
                             ".txt/.jsonl/.parquet files or "
                             "data folders, datasets names as NAME[:CONFIG[:SPLIT]] (e.g. wikitext:wikitext-2-raw-v1)")
        sp.add_argument("--context", type=int, default=512, help="tokens per window (ppl-512x64 protocol: 512)")
        sp.add_argument("--windows", type=int, default=64,
                        help="windows per text (default: %(default)s; the ppl-512x64 protocol uses 64)")
        sp.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="lm-eval tasks to run beside perplexity (offline: rvq_kjv_next_verse; hub tasks such "
                             "as hellaswag need internet); minutes per task on CPU")
        sp.add_argument("--task-limit", type=int, help="at most this many documents per lm-eval task (quick runs)")
        sp.add_argument("--include-path", help="folder of your own lm-eval YAML tasks")

    q = sub.add_parser("quantize", help="quantize a model and save the checkpoint")
    q.add_argument("model", help="'reference', a model folder, a .gguf file or a hub id")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    quant_opts(q)
    common(q)

    e = sub.add_parser("eval", help="perplexity and size of checkpoints beside a baseline")
    e.add_argument("checkpoints", nargs="*", help="rvqllm checkpoint folders (none: the baseline alone)")
    e.add_argument("--baseline", help="the unquantized model ('reference', a folder, a .gguf or a hub id)")
    eval_opts(e)
    common(e)

    r = sub.add_parser("report", help="compare checkpoints and the baseline: markdown table, JSON, PNG plot, "
                                      "and a README model card in each checkpoint folder")
    r.add_argument("checkpoints", nargs="+", help="rvqllm checkpoint folders")
    r.add_argument("--baseline", default="reference", help="the unquantized model (default: the reference)")
    r.add_argument("--out-dir", default="report", help="folder for report.md, report.json, report.png")
    r.add_argument("--no-card", action="store_true", help="do not write README.md model cards into the checkpoints")
    eval_opts(r)
    common(r)

    i = sub.add_parser("info", help="format, bits per weight and size of a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--layers", action="store_true", help="one line per quantized layer")
    i.add_argument("--verify", action="store_true", help="validate every tensor (as loading does)")
    common(i)

    d = sub.add_parser("demo", help="quantize the built-in reference model and compare it with fp16")
    d.add_argument("--out", help="checkpoint folder (default: out/smollm2-135m-<preset>)")
    quant_opts(d, DEMO_PRESET)
    eval_opts(d)
    common(d)
    d.set_defaults(windows=DEMO_WINDOWS)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit or preemption), handled like Ctrl-C: one line,
    exit status 2, a quantization's finished blocks kept for ``--resume``."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status. In the main thread SIGTERM stops the command as Ctrl-C
    does (the handler that was there before is restored on return)."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        return _main(argv)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False) or getattr(args, "json", False):
        # silence the progress bars of the libraries we drive too (lm-eval's own bars stay: it has no switch)
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    handlers = {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "demo": cmd_demo,
                "report": cmd_report}
    if not args.debug:  # a hub fetch that fails retries with a warning per try: the error line says it all
        import logging

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    args.kept_run = None  # set by a quantization that stops with a resumable run folder
    try:
        result = handlers[args.command](args)
    except RVQError as err:
        _Progress.close_all()
        if args.debug:
            raise
        kept = getattr(args, "kept_run", None) is not None and "--resume" not in str(err)
        print(f"error: {err}" + (f"; {_after_stop(args)}" if kept else ""), file=sys.stderr)
        return 2
    except OSError as err:  # the environment (disk full, permissions, a vanished file), not a bug
        _Progress.close_all()
        if args.debug:
            raise
        print(f"error: {_os_error(err)}; {_after_stop(args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        _Progress.close_all()
        if args.debug:
            raise
        word = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"{word}: {_after_stop(args)}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    return 0


def _os_error(err: OSError) -> str:
    """One line for an ``OSError``: what failed, on which path, and what to check."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"the disk is full{where}: free space or choose a location with more room"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{err.strerror}{where}: choose a location you can write to, or fix its permissions"
    return f"{err.strerror or err}{where}: check the path, permissions and free disk space"


def _after_stop(args: argparse.Namespace) -> str:
    """What a stopped command left behind and how to go on: resume a kept run folder, or start again."""
    kept = getattr(args, "kept_run", None)
    if kept is not None and Path(kept).exists():
        return (f"the finished blocks are kept in {kept}: rerun the same command with --resume to continue "
                "(or with --overwrite to start over)")
    if args.command in ("quantize", "demo"):
        return "nothing was written: run the command again to start over"
    return "no report file was replaced" if args.command == "report" else "nothing was written"


if __name__ == "__main__":
    sys.exit(main())
