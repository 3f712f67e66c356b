"""The CLI's edges (issue 12): every command against missing paths, files where folders belong and the
other way round, the wrong kind of folder, a missing tokenizer, a read-only or full disk, and Ctrl-C.

Each must end with exit status 2 and one line on stderr that names the problem and the fix; nothing
half-written may appear at the output, and the input model stays byte-for-byte the same. Tiny random
models throughout (tests/conftest.py, tests/test_reliability.py); one real process, for SIGINT.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rvqllm
from rvqllm import cli, resume
from rvqllm.cli import main
from rvqllm.errors import RVQError
from tests.conftest import tiny_llama
from tests.test_reliability import (
    CALIB,
    CFG,
    TAMPERS,
    folder_digest,
    make_config,
    make_model_folder,
    make_text,
    make_tokenizer,
)

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json")
EVAL = ("--text", "{text}", "--windows", "1", "--context", "8", "--quiet")


def _without_tokenizer(folder: Path) -> Path:
    for name in TOKENIZER_NAMES:
        (folder / name).unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """Inputs shared by the module (never written to: :func:`inputs_untouched` checks every test)."""
    root = tmp_path_factory.mktemp("edges")
    model = make_model_folder(root / "model")
    notok = _without_tokenizer(make_model_folder(root / "notok"))
    m = tiny_llama()
    rvqllm.quantize(m, CFG, CALIB)
    ckpt = rvqllm.save(m, root / "ckpt", make_tokenizer()[0])
    ckpt_notok = _without_tokenizer(Path(shutil.copytree(ckpt, root / "ckpt_notok")))
    (root / "a_file").write_text("not a folder")
    (root / "empty").mkdir()
    return {"root": root, "model": model, "notok": notok, "ckpt": ckpt, "ckpt_notok": ckpt_notok,
            "text": make_text(root / "text.txt"), "cfg": make_config(root / "cfg.yaml"),
            "file": root / "a_file", "empty": root / "empty"}


@pytest.fixture(autouse=True)
def inputs_untouched(request):
    """Whatever a test does, the shared inputs (models, checkpoints, texts) stay byte-for-byte the same."""
    if "env" not in request.fixturenames:
        yield
        return
    env = request.getfixturevalue("env")
    before = folder_digest(env["root"])
    yield
    assert folder_digest(env["root"]) == before


def run(capfd, *argv) -> tuple[int, str, str]:
    """``rvqllm ARGV`` in this process: ``(exit status, stdout, stderr)`` (file-descriptor level)."""
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def one_line(rc: int, err: str, *needles: str, prefix: str = "error: ") -> str:
    """Exit status 2 and exactly one line on stderr, starting with ``prefix`` and holding every needle."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Couldn't instantiate" not in lines[0] and "Traceback" not in err
    return lines[0]


def quantize_argv(env, out: Path, *extra, model: Path | None = None) -> list:
    return ["quantize", model or env["model"], "--out", out, "--config", env["cfg"], "--calib", env["text"],
            "--quiet", *extra]


def eval_opts(env) -> list[str]:
    return [a.format(text=env["text"]) for a in EVAL]


# ------------------------------------------------------------------------------------------ 1. tokenizer
@pytest.mark.integration
def test_model_without_tokenizer_names_the_files_and_the_option(env, tmp_path, capfd):
    rc, _, err = run(capfd, *quantize_argv(env, tmp_path / "q", model=env["notok"]))
    one_line(rc, err, f"no tokenizer in {env['notok']}", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "vocab.json + merges.txt", "--tokenizer PATH_OR_ID")
    assert list(tmp_path.iterdir()) == []
    rc, _, err = run(capfd, *quantize_argv(env, tmp_path / "q", "--tokenizer", env["model"], model=env["notok"]))
    assert rc == 0, err
    assert all((tmp_path / "q" / n).is_file() for n in TOKENIZER_NAMES)  # the checkpoint carries the tokenizer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.mark.unit
def test_tokenizer_config_alone_is_one_clear_line(env, tmp_path, capfd):
    """A folder with tokenizer_config.json but no vocabulary: transformers' message runs over five lines."""
    shutil.copytree(env["notok"], tmp_path / "m")
    shutil.copy(env["model"] / "tokenizer_config.json", tmp_path / "m")
    rc, _, err = run(capfd, *quantize_argv(env, tmp_path / "q", model=tmp_path / "m"))
    one_line(rc, err, "cannot build a tokenizer from tokenizer_config.json", "tokenizer.json", "--tokenizer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.integration
def test_eval_and_report_take_tokenizer(env, tmp_path, capfd):
    opts = eval_opts(env)
    rc, _, err = run(capfd, "eval", env["ckpt_notok"], *opts)
    one_line(rc, err, f"no tokenizer in {env['ckpt_notok']}", "no --baseline", "--tokenizer PATH_OR_ID")
    rc, _, err = run(capfd, "eval", env["ckpt"], "--baseline", env["notok"], *opts)
    one_line(rc, err, f"no tokenizer in {env['notok']}", "--tokenizer")
    rc, out, err = run(capfd, "eval", env["ckpt_notok"], "--baseline", env["notok"], "--tokenizer", env["model"],
                       *opts, "--json")
    assert rc == 0, err
    rows = json.loads(out)["rows"]
    assert [r.get("baseline", False) for r in rows] == [True, False]
    rc, out, err = run(capfd, "eval", env["ckpt_notok"], "--tokenizer", env["ckpt"], *opts, "--json")
    assert rc == 0, err  # a checkpoint folder is a tokenizer source too
    rep = tmp_path / "report"
    rc, _, err = run(capfd, "report", env["ckpt_notok"], "--baseline", env["notok"], "--tokenizer", env["model"],
                     "--out-dir", rep, "--no-card", *opts)
    assert rc == 0, err
    assert sorted(p.name for p in rep.iterdir()) == ["report.json", "report.md", "report.png"]


@pytest.mark.integration
def test_python_api_takes_a_tokenizer_source(env):
    from rvqllm.models import load_model, open_source

    texts = {"t": env["text"].read_text()}
    model = rvqllm.load(env["ckpt_notok"])
    by_path = rvqllm.evaluate(model, str(env["model"]), texts, context=8, windows=1)
    by_object = rvqllm.evaluate(model, make_tokenizer()[0], texts, context=8, windows=1)
    assert by_path["t"].ppl == pytest.approx(by_object["t"].ppl)
    with pytest.raises(RVQError, match="evaluate needs a tokenizer"):
        rvqllm.evaluate(model, None, texts)
    with pytest.raises(RVQError) as info:
        load_model(str(env["notok"]))
    assert "\n" not in str(info.value) and "--tokenizer" in str(info.value)
    _, tok = load_model(str(env["notok"]), tokenizer=str(env["model"]))
    assert tok("w1 w2").input_ids == make_tokenizer()[0]("w1 w2").input_ids
    _, tok = open_source(str(env["notok"]), tokenizer=env["model"])
    assert tok is not None
    with pytest.raises(RVQError, match="already quantized"):
        load_model(str(env["ckpt"]))


# ------------------------------------------------------------------------------------------ 2. info's cheap check
CAUGHT_CHEAPLY = {  # tamper -> what the one line says
    "truncated": "truncated", "missing weights file": "is missing", "missing tensor": "lacks tensor",
    "wrong shape": "but the config makes it", "wrong dtype": "is I16, expected U8",
    "config stages disagree": "but the config makes it", "config size disagrees": "but the model config makes it",
    "unexpected tensor": "has no place for",
    "config edited": "does not match the checksum", "no checksums": "carries no checksums",
    "unknown version": "format version 99", "spec out of range": "not an integer in 1..16",
}
ONLY_BY_VERIFY = ["flipped byte", "code past codebook", "inf scale", "nan embedding"]


@pytest.mark.integration
@pytest.mark.parametrize("tamper", list(CAUGHT_CHEAPLY), ids=list(CAUGHT_CHEAPLY))
def test_info_catches_a_broken_checkpoint_from_headers_alone(tamper, env, tmp_path, capfd, monkeypatch):
    import rvqllm.validate as validate

    def no_data(*a, **k):
        raise AssertionError("info without --verify read tensor data")

    bad = Path(shutil.copytree(env["ckpt"], tmp_path / "bad"))
    TAMPERS[tamper][0](bad)
    before = folder_digest(bad)
    with monkeypatch.context() as m:
        m.setattr(validate, "_read_checksummed", no_data)
        rc, out, err = run(capfd, "info", bad)
    line = one_line(rc, err, CAUGHT_CHEAPLY[tamper])
    if tamper not in ("unknown version", "spec out of range"):  # those are refused as they are read
        assert f"rvqllm info {bad} --verify" in line and "re-create or re-download" in line
    assert out == "" and folder_digest(bad) == before


@pytest.mark.integration
def test_info_is_cheap_and_verify_still_checks_every_byte(env, tmp_path, capfd, monkeypatch):
    import rvqllm.validate as validate

    def no_data(*a, **k):
        raise AssertionError("info without --verify read tensor data")

    with monkeypatch.context() as m:
        m.setattr(validate, "_read_checksummed", no_data)
        rc, out, err = run(capfd, "info", env["ckpt"])
        assert rc == 0 and "bpw" in out, err
    for tamper in ONLY_BY_VERIFY:
        bad = Path(shutil.copytree(env["ckpt"], tmp_path / tamper.replace(" ", "-")))
        TAMPERS[tamper][0](bad)
        rc, _, err = run(capfd, "info", bad, "--quiet")
        assert rc == 0, err  # data, not headers: a cheap check cannot see it
        rc, _, err = run(capfd, "info", bad, "--verify", "--quiet")
        line = one_line(rc, err, TAMPERS[tamper][1])
        assert "--verify` runs every check" not in line


# ------------------------------------------------------------------------------------------ 3. wrong paths, every command
def _cases(env, work: Path) -> dict[str, tuple[list, tuple[str, ...]]]:
    e, o = env, eval_opts(env)
    q = ["--config", e["cfg"], "--calib", e["text"], "--quiet"]
    return {
        "quantize: missing model": (["quantize", work / "nope", "--out", work / "q", *q], ("not found",)),
        "quantize: model is a file": (["quantize", e["file"], "--out", work / "q", *q], ("not a model folder",)),
        "quantize: empty model folder": (["quantize", e["empty"], "--out", work / "q", *q], ("no config.json",)),
        "quantize: a checkpoint as the model": (["quantize", e["ckpt"], "--out", work / "q", *q],
                                                ("already quantized", "original model")),
        "quantize: out is a file": (["quantize", e["model"], "--out", e["file"], *q], ("is a file, not a folder", "--out")),
        "quantize: out under a file": (["quantize", e["model"], "--out", e["file"] / "q", *q],
                                       ("is a file, not a folder", "--out")),
        "quantize: out inside the model": (["quantize", e["model"], "--out", e["model"] / "q", *q],
                                           ("overlaps the input model",)),
        "quantize: config is a folder": (["quantize", e["model"], "--out", work / "q", "--config", e["empty"],
                                          "--calib", e["text"], "--quiet"], ("is a folder", "preset")),
        "quantize: missing calibration": (["quantize", e["model"], "--out", work / "q", "--config", e["cfg"],
                                           "--calib", work / "nope.txt", "--quiet"], ("not found",)),
        "quantize: calibration is a folder": (["quantize", e["model"], "--out", work / "q", "--config", e["cfg"],
                                               "--calib", e["empty"], "--quiet"], (str(e["empty"]),)),
        "quantize: tokenizer missing": (["quantize", e["notok"], "--out", work / "q", "--tokenizer",
                                         work / "nope", *q], ("--tokenizer", "no such folder")),
        "quantize: tokenizer is a file": (["quantize", e["notok"], "--out", work / "q", "--tokenizer", e["file"],
                                           *q], ("--tokenizer", "is a file")),
        "quantize: tokenizer folder empty": (["quantize", e["notok"], "--out", work / "q", "--tokenizer",
                                              e["empty"], *q], ("no tokenizer in", "tokenizer.json")),
        "eval: missing checkpoint": (["eval", work / "nope", *o], ("does not exist",)),
        "eval: checkpoint is a file": (["eval", e["file"], *o], ("is not a folder",)),
        "eval: empty folder": (["eval", e["empty"], *o], ("no config.json",)),
        "eval: a model folder": (["eval", e["model"], *o], ("is a model folder, not an rvqllm checkpoint",
                                                            "--baseline", "rvqllm quantize")),
        "eval: second checkpoint missing": (["eval", e["ckpt"], work / "nope", "--baseline", e["model"], *o],
                                            ("does not exist",)),
        "eval: baseline missing": (["eval", e["ckpt"], "--baseline", work / "nope", *o], ("not found",)),
        "eval: baseline is a file": (["eval", e["ckpt"], "--baseline", e["file"], *o], ("not a model folder",)),
        "eval: a checkpoint as baseline": (["eval", e["ckpt"], "--baseline", e["ckpt"], *o], ("already quantized",)),
        "eval: text missing": (["eval", e["ckpt"], "--text", work / "nope.txt", "--quiet"], ("not found",)),
        "info: missing": (["info", work / "nope"], ("does not exist",)),
        "info: a file": (["info", e["file"]], ("is not a folder",)),
        "info: empty folder": (["info", e["empty"]], ("no config.json",)),
        "info: a model folder": (["info", e["model"], "--verify"], ("is a model folder", "rvqllm quantize")),
        "report: missing checkpoint": (["report", work / "nope", "--baseline", e["model"], "--out-dir", work / "r",
                                        *o], ("does not exist",)),
        "report: a model folder": (["report", e["model"], "--baseline", e["model"], "--out-dir", work / "r", *o],
                                   ("is a model folder",)),
        "report: out-dir is a file": (["report", e["ckpt"], "--baseline", e["model"], "--out-dir", e["file"], *o],
                                      ("--out-dir", "is a file")),
        "report: out-dir under a file": (["report", e["ckpt"], "--baseline", e["model"], "--out-dir",
                                          e["file"] / "r", *o], ("--out-dir", "is a file")),
        "demo: out under a file": (["demo", "--out", e["file"] / "d", "--quiet"], ("is a file, not a folder",)),
        "demo: out is a file": (["demo", "--out", e["file"], "--quiet"], ("is a file, not a folder",)),
        "demo: config is a folder": (["demo", "--out", work / "d", "--config", e["empty"], "--quiet"],
                                     ("is a folder",)),
    }


CASES = list(_cases({k: Path(k) for k in ("root", "model", "notok", "ckpt", "ckpt_notok", "text", "cfg", "file",
                                          "empty")}, Path("w")))


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_wrong_path_is_one_line_and_writes_nothing(case, env, tmp_path, capfd):
    argv, needles = _cases(env, tmp_path)[case]
    rc, out, err = run(capfd, *argv)
    one_line(rc, err, *needles)
    assert list(tmp_path.iterdir()) == [] and out == ""


@pytest.mark.integration
def test_without_quiet_there_is_one_error_line(env, tmp_path, capfd):
    """Status lines may come first; the error is still one line, without a traceback."""
    rc, _, err = run(capfd, "quantize", env["notok"], "--out", tmp_path / "q", "--config", env["cfg"],
                     "--calib", env["text"])
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--tokenizer" in errors[0] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ read-only, full disk
@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_location(env, tmp_path, capfd):
    ro = tmp_path / "ro"
    ro.mkdir()
    card = Path(shutil.copytree(env["ckpt"], tmp_path / "ckpt"))
    try:
        ro.chmod(0o555)
        card.chmod(0o555)
        for argv in (quantize_argv(env, ro / "q"), quantize_argv(env, ro / "deeper" / "q"),
                     ["report", env["ckpt"], "--baseline", env["model"], "--out-dir", ro / "r", *eval_opts(env)],
                     ["demo", "--out", ro / "d", "--quiet"]):
            rc, _, err = run(capfd, *argv)
            one_line(rc, err, str(ro), "permission denied", "writable")
        rc, _, err = run(capfd, "report", card, "--baseline", env["model"], "--out-dir", tmp_path / "r",
                         *eval_opts(env))
        one_line(rc, err, "model card", str(card), "--no-card")
        assert list(ro.iterdir()) == [] and not (tmp_path / "r").exists()
    finally:
        ro.chmod(0o755)
        card.chmod(0o755)


def _full_disk_after(blocks: int, run_dir: Path):
    """A ``write_safetensors`` that fills the disk once ``blocks`` blocks are committed in ``run_dir``."""
    from rvqllm.validate import write_safetensors

    def write(path, tensors, metadata=None):
        if cli._blocks_done(run_dir) >= blocks:
            Path(path).write_bytes(b"\0" * 100)  # some bytes made it before the disk filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_safetensors(path, tensors, metadata)
    return write


@pytest.mark.integration
def test_full_disk_mid_run_keeps_the_finished_block_for_resume(env, tmp_path, capfd, monkeypatch):
    """The disk fills while block 1 is written: block 0 is kept, --resume finishes the same checkpoint."""
    from rvqllm import checkpoint

    out = tmp_path / "q"
    with monkeypatch.context() as m:
        full = _full_disk_after(1, tmp_path / "q.partial")
        m.setattr(resume, "write_safetensors", full)
        m.setattr(checkpoint, "write_safetensors", full)
        rc, _, err = run(capfd, *quantize_argv(env, out))
    one_line(rc, err, "the disk is full", f"kept in {out}.partial", "--resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.partial"]
    assert not [p for p in (tmp_path / "q.partial").rglob("*.tmp")]  # no half-written file is left
    rc, out_json, err = run(capfd, *quantize_argv(env, out, "--resume", "--json"))
    assert rc == 0, err
    assert json.loads(out_json)["resumed_layers"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert run(capfd, "info", out, "--verify", "--quiet")[0] == 0


@pytest.mark.integration
def test_full_disk_before_any_block_leaves_nothing(env, tmp_path, capfd, monkeypatch):
    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(resume, "write_safetensors", full)
    rc, _, err = run(capfd, *quantize_argv(env, tmp_path / "q"))
    one_line(rc, err, "the disk is full", "nothing was written")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ Ctrl-C
def _interrupt_in_block(block: int):
    def progress(self, key, done, total, label=None):
        if label and label.startswith(f"model.layers.{block}."):
            raise KeyboardInterrupt
    return progress


@pytest.mark.integration
@pytest.mark.parametrize("block", [0, 1])
def test_ctrl_c_mid_quantize(block, env, tmp_path, capfd, monkeypatch):
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        m.setattr(cli._Progress, "__call__", _interrupt_in_block(block))
        rc, _, err = run(capfd, *quantize_argv(env, out))
    if block == 0:  # nothing finished: nothing kept
        one_line(rc, err, "nothing was written", prefix="interrupted: ")
        assert list(tmp_path.iterdir()) == []
        return
    one_line(rc, err, f"kept in {out}.partial", "rerun the same command with --resume", prefix="interrupted: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.partial"]
    rc, _, err = run(capfd, *quantize_argv(env, out))  # forgetting --resume is refused, and says how
    one_line(rc, err, "--resume")
    rc, _, err = run(capfd, *quantize_argv(env, out, "--resume"))
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.mark.integration
def test_ctrl_c_in_eval_and_report(env, tmp_path, capfd, monkeypatch):
    import rvqllm.eval as ev

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", interrupted)
    rc, out, err = run(capfd, "eval", env["ckpt"], "--baseline", env["model"], *eval_opts(env))
    one_line(rc, err, "nothing was written", prefix="interrupted: ")
    rc, out, err = run(capfd, "report", env["ckpt"], "--baseline", env["model"], "--out-dir", tmp_path / "r",
                       *eval_opts(env))
    one_line(rc, err, "no report file was replaced", prefix="interrupted: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_to_a_real_quantize(tmp_path, sig):
    """Ctrl-C (SIGINT), or SIGTERM (``kill``, a batch scheduler's time limit), to `rvqllm quantize` once a
    block is committed: one line, exit 2, resumable."""
    model = make_model_folder(tmp_path / "model", layers=4)
    text = make_text(tmp_path / "calib.txt")
    cfg = make_config(tmp_path / "cfg.yaml")
    before = folder_digest(model)
    out, partial = tmp_path / "out" / "q", tmp_path / "out" / "q.partial"
    argv = [sys.executable, "-m", "rvqllm.cli", "quantize", str(model), "--out", str(out), "--config", str(cfg),
            "--calib", str(text), "--quiet"]
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,  # Ctrl-C as in a terminal, even if we ignore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads((partial / "progress.json").read_text())["blocks_done"] >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.002)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    prefix = "interrupted: " if sig == signal.SIGINT else "terminated (SIGTERM): "
    one_line(proc.returncode, stderr, f"kept in {partial}", "--resume", prefix=prefix)
    assert stdout == ""
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.partial"]  # no checkpoint, half or whole
    assert 1 <= json.loads((partial / "progress.json").read_text())["blocks_done"] < 4
    assert folder_digest(model) == before


# ------------------------------------------------------------------------------------------ 4. demo's preset
@pytest.mark.unit
def test_demo_defaults_to_the_fast_preset_and_ends_with_the_best_one(tmp_path, capfd, monkeypatch):
    parser = cli.build_parser()
    assert parser.parse_args(["demo"]).config == "2bit-fast"
    assert parser.parse_args(["quantize", "m", "--out", "o"]).config == "2bit"
    seen = {}

    def fake_quantize(args):
        seen["config"] = args.config
        return {"quantize_seconds": 1.0, "threads": 2}

    monkeypatch.setattr(cli, "cmd_quantize", fake_quantize)
    monkeypatch.setattr(cli, "_evaluate_rows", lambda args, q, b: (
        [{"model": "base", "bpw": 16.0, "bytes": 1, "ppl": {"kjv": 2.0}},
         {"model": str(q[0]), "bpw": 2.1, "bytes": 1, "ppl": {"kjv": 3.0}}], ["kjv"]))
    rc, out, _ = run(capfd, "demo", "--out", tmp_path / "d", "--quiet")
    assert rc == 0 and seen["config"] == "2bit-fast"
    assert out.strip().splitlines()[-1] == cli.best_preset_line()
    assert "--config 2bit " in cli.best_preset_line() and f"{cli.BEST_PRESET_MINUTES} min" in cli.best_preset_line()
    rc, out, _ = run(capfd, "demo", "--out", tmp_path / "d", "--config", "2bit", "--quiet")
    assert rc == 0 and "best quality" not in out


@pytest.mark.integration
def test_a_tokenizer_past_the_model_vocabulary_is_one_line(env, tmp_path, capfd):
    """A tokenizer that is not the model's (ids beyond its embedding's rows) is refused before any block
    is coded, naming the id, the rows and the option; nothing is written."""
    from rvqllm.synthetic import build_tokenizer

    model = tiny_llama()  # 128 embedding rows; the byte tokenizer has 259 tokens
    model.save_pretrained(tmp_path / "small_vocab")
    build_tokenizer().save_pretrained(tmp_path / "small_vocab")
    text = tmp_path / "accents.txt"
    text.write_text("Caf\u00e9 na\u00efve r\u00e9sum\u00e9 ~ \u00fcber.\n" * 200)  # bytes past 124: ids past 127
    argv = quantize_argv(env, tmp_path / "q", model=tmp_path / "small_vocab")
    argv[argv.index("--calib") + 1] = text
    capfd.readouterr()  # transformers' save progress bars
    rc, _, err = run(capfd, *argv)
    one_line(rc, err, "embedding has 128 rows", "--tokenizer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accents.txt", "small_vocab"]
