"""Reliability and safety (issue 5): validated loading, atomic saves, resume after SIGKILL, bounded
memory, and a clear one-line error for every bad input we could think of."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rvqllm
from rvqllm import checkpoint
from rvqllm.checkpoint import INDEX_NAME, shard_name, write_index, write_shard
from rvqllm.cli import main
from rvqllm.errors import RVQError
from rvqllm.validate import CONFIG_SUM_KEY, TENSOR_SUMS_KEY, checksum_metadata
from tests.conftest import tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
CFG = rvqllm.RVQConfig(vector_dim=8, stages=2, bits=6, kmeans_iters=5, calib_batch_size=4)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ helpers
def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path (to prove nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def make_checkpoint(folder: Path, build=tiny_llama, cfg: rvqllm.RVQConfig = CFG) -> Path:
    model = build()
    rvqllm.quantize(model, cfg, CALIB)
    return rvqllm.save(model, folder)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: its shards (sharded layout) or model.safetensors."""
    single = folder / "model.safetensors"
    return [single] if single.exists() else sorted(folder.glob("model-*-of-*.safetensors"))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whichever layout."""
    out = {}
    for path in weight_files(folder):
        out.update(load_file(str(path)))
    return out


def read_ckpt(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return read_tensors(folder), json.loads((folder / "config.json").read_text())


def shard_holding(folder: Path, suffix: str) -> Path:
    """The weights file holding the first tensor whose name ends with ``suffix``."""
    for path in weight_files(folder):
        data = path.read_bytes()
        if any(k.endswith(suffix) for k in json.loads(data[8:8 + int.from_bytes(data[:8], "little")])):
            return path
    raise AssertionError(suffix)


def write_as_stranger(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write tensors + config with freshly computed, *valid* checksums: what a tamperer can do.

    Keeps the folder's layout: a sharded checkpoint gets each tensor back into the shard its index names
    (a new name into the last shard), every shard re-signed with specs from ``config`` and a new index."""
    config = json.loads(json.dumps(config))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if not (folder / INDEX_NAME).exists():
        meta = {"format": "pt", **checksum_metadata(tensors, config)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    files = [p.name for p in weight_files(folder)]
    parts: dict[str, dict[str, torch.Tensor]] = {f: {} for f in files}
    for name, t in tensors.items():
        parts[weight_map.get(name, files[-1])][name] = t
    layers = config.get("quantization_config", {}).get("layers", {})
    for f, part in parts.items():
        specs = {n: s for n, s in layers.items() if f"{n}.codes" in part} if isinstance(layers, dict) else {}
        write_shard(folder / f, part, specs)
    write_index(folder, config)


def first_layer(config: dict) -> str:
    return next(iter(config["quantization_config"]["layers"]))


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(120)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"), words


def make_model_folder(folder: Path, model=None, layers: int = 2) -> Path:
    """A tiny random Llama (or ``model``) + a word-level tokenizer saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if model is None:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True))
    tok, _ = make_tokenizer()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_text(path: Path, n_words: int = 4000) -> Path:
    _, words = make_tokenizer()
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (n_words,), generator=g).tolist()))
    return path


def make_config(path: Path, **changes) -> Path:
    base = {"vector_dim": 8, "stages": 2, "bits": 6, "kmeans_iters": 5, "calib_sequences": 8,
            "calib_seq_len": 32, "calib_batch_size": 4}
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in {**base, **changes}.items()) + "\n")
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A valid checkpoint of a tiny Llama and the logits of the model it loads as."""
    folder = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    return folder, logits(rvqllm.load(folder))


@pytest.fixture
def bad(ckpt, tmp_path) -> Path:
    """A private copy of the valid checkpoint, to damage."""
    return Path(shutil.copytree(ckpt[0], tmp_path / "bad"))


def assert_one_line_error(err: BaseException, *needles: str) -> None:
    msg = str(err)
    assert isinstance(err, RVQError), f"{type(err).__name__}: {msg}"
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


# ------------------------------------------------------------------------------------------ 1. loading is validation
@pytest.mark.unit
def test_valid_checkpoint_loads_with_identical_outputs(ckpt):
    folder, want = ckpt
    sums = 0
    for path in weight_files(folder):
        data = path.read_bytes()
        sums += len(json.loads(json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"][TENSOR_SUMS_KEY]))
    assert CONFIG_SUM_KEY in json.loads((folder / INDEX_NAME).read_text())["metadata"]
    assert sums == len(read_ckpt(folder)[0])
    assert torch.equal(logits(rvqllm.load(folder)), want)


def _flip_data_byte(folder: Path) -> str:
    path = shard_holding(folder, ".codes")
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k.endswith(".codes"))
    begin = 8 + n + header[name]["data_offsets"][0]
    data[begin + 3] ^= 0x01
    path.write_bytes(bytes(data))
    return name


def _set_code_past_codebook(folder: Path) -> str:
    tensors, config = read_ckpt(folder)
    name = first_layer(config)
    tensors[f"{name}.codes"][1, 2, 0] = 1 << config["quantization_config"]["layers"][name]["bits"]
    write_as_stranger(folder, tensors, config)
    return f"{name}.codes"


def _drop_tensor(folder: Path) -> str:
    tensors, config = read_ckpt(folder)
    name = f"{first_layer(config)}.scales"
    del tensors[name]
    write_as_stranger(folder, tensors, config)
    return name


def _wrong_shape(folder: Path) -> str:
    tensors, config = read_ckpt(folder)
    name = f"{first_layer(config)}.codebooks"
    tensors[name] = tensors[name][:, :-1]
    write_as_stranger(folder, tensors, config)
    return name


def _wrong_dtype(folder: Path) -> str:
    tensors, config = read_ckpt(folder)
    name = f"{first_layer(config)}.codes"
    tensors[name] = tensors[name].to(torch.int16)
    write_as_stranger(folder, tensors, config)
    return name


def _nan_scale(folder: Path) -> str:
    tensors, config = read_ckpt(folder)
    name = f"{first_layer(config)}.scales"
    tensors[name][0] = float("inf")
    write_as_stranger(folder, tensors, config)
    return name


def _nan_embedding(folder: Path) -> str:
    tensors, config = read_ckpt(folder)
    tensors["model.embed_tokens.weight"][3, 3] = float("nan")
    write_as_stranger(folder, tensors, config)
    return "model.embed_tokens.weight"


def _config_disagrees(folder: Path) -> str:
    tensors, config = read_ckpt(folder)
    name = first_layer(config)
    config["quantization_config"]["layers"][name]["stages"] = 3
    write_as_stranger(folder, tensors, config)
    return name


def _config_layer_size_disagrees(folder: Path) -> str:
    tensors, config = read_ckpt(folder)
    name = first_layer(config)
    config["quantization_config"]["layers"][name]["in_features"] = 72
    write_as_stranger(folder, tensors, config)
    return name


def _config_edited(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 0.5  # would change every output; caught by the config checksum
    (folder / "config.json").write_text(json.dumps(config))
    return "config.json"


def _truncate(folder: Path) -> str:
    path = weight_files(folder)[0]
    path.write_bytes(path.read_bytes()[:-100])
    return "truncated"


def _no_checksums(folder: Path) -> str:
    path = weight_files(folder)[0]
    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})
    return "no checksums"


def _unknown_version(folder: Path) -> str:
    tensors, config = read_ckpt(folder)
    config["quantization_config"]["format_version"] = 99
    write_as_stranger(folder, tensors, config)
    return "version 99"


def _extra_tensor(folder: Path) -> str:
    tensors, config = read_ckpt(folder)
    tensors["model.layers.0.backdoor"] = torch.zeros(3)
    write_as_stranger(folder, tensors, config)
    return "model.layers.0.backdoor"


def _bad_spec(folder: Path) -> str:
    tensors, config = read_ckpt(folder)
    config["quantization_config"]["layers"][first_layer(config)]["bits"] = 40
    write_as_stranger(folder, tensors, config)
    return "bits=40"


def _missing_weights(folder: Path) -> str:
    weight_files(folder)[0].unlink()
    return "missing"


TAMPERS = {
    "flipped byte": (_flip_data_byte, "stored checksum"),
    "truncated": (_truncate, "truncated"),
    "code past codebook": (_set_code_past_codebook, "past the codebook size"),
    "missing tensor": (_drop_tensor, "lacks tensor"),
    "wrong shape": (_wrong_shape, "has shape"),
    "wrong dtype": (_wrong_dtype, "expected U8"),
    "inf scale": (_nan_scale, "NaN or Inf"),
    "nan embedding": (_nan_embedding, "NaN or Inf"),
    "config stages disagree": (_config_disagrees, "has shape"),
    "config size disagrees": (_config_layer_size_disagrees, "model config makes it"),
    "config edited": (_config_edited, "does not match the checksum"),
    "no checksums": (_no_checksums, "carries no checksums"),
    "unknown version": (_unknown_version, "format version 99"),
    "unexpected tensor": (_extra_tensor, "no place for"),
    "spec out of range": (_bad_spec, "not an integer in 1..16"),
    "missing weights file": (_missing_weights, "is missing"),
}


@pytest.mark.unit
@pytest.mark.parametrize("tamper", list(TAMPERS), ids=list(TAMPERS))
def test_tampered_checkpoint_is_refused_with_one_line(tamper, bad):
    mutate, expected = TAMPERS[tamper]
    what = mutate(bad)
    with pytest.raises(RVQError) as info:
        rvqllm.load(bad)
    assert_one_line_error(info.value, expected)
    if what not in ("truncated", "no checksums", "missing", "version 99", "config.json") and "=" not in what:
        assert what in str(info.value)  # the message names the tensor / layer


@pytest.mark.unit
def test_weights_file_is_standard_safetensors_with_stable_bytes(ckpt, tmp_path):
    from safetensors import safe_open

    from rvqllm.validate import write_safetensors

    tensors, _ = read_ckpt(ckpt[0])
    weight_map = json.loads((ckpt[0] / INDEX_NAME).read_text())["weight_map"]
    assert sorted(weight_map) == sorted(tensors)
    for path in weight_files(ckpt[0]):
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["format"] == "pt"
            assert sorted(f.keys()) == sorted(k for k, v in weight_map.items() if v == path.name)
    write_safetensors(tmp_path / "a.safetensors", tensors, {"b": "1", "a": "2", "format": "pt"})
    shuffled = dict(reversed(list(tensors.items())))
    write_safetensors(tmp_path / "b.safetensors", shuffled, {"format": "pt", "a": "2", "b": "1"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    again = load_file(str(tmp_path / "a.safetensors"))
    assert all(torch.equal(again[k], t) and again[k].dtype == t.dtype for k, t in tensors.items())


@pytest.mark.unit
def test_kernels_never_see_unvalidated_codes(bad, monkeypatch):
    """The forward op must not run while loading; a bad code fails in validation, before any decode."""
    import rvqllm.nn as qnn

    calls = []
    monkeypatch.setattr(qnn, "rvq_linear", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(qnn, "dequantize", lambda *a, **k: calls.append(a))
    _set_code_past_codebook(bad)
    with pytest.raises(RVQError, match="past the codebook size"):
        rvqllm.load(bad)
    assert calls == []


@pytest.mark.unit
def test_pickle_is_never_loaded(bad, tmp_path):
    """A checkpoint carrying a (malicious) pickle instead of safetensors is refused without unpickling it."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for path in [*weight_files(bad), bad / INDEX_NAME]:
        path.unlink()
    torch.save({"x": Evil()}, bad / "pytorch_model.bin")
    with pytest.raises(RVQError, match="is missing"):
        rvqllm.load(bad)
    assert not marker.exists()


@pytest.mark.unit
def test_remote_code_is_never_run(bad, tmp_path):
    marker = tmp_path / "pwned"
    tensors, config = read_ckpt(bad)
    config["model_type"] = "evil_model"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (bad / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    write_as_stranger(bad, tensors, config)
    with pytest.raises(RVQError) as info:
        rvqllm.load(bad)
    assert_one_line_error(info.value, "config.json")
    assert not marker.exists()


@pytest.mark.unit
def test_no_pickle_or_remote_code_in_the_package():
    """No ``torch.load``/``pickle`` and no ``trust_remote_code=True`` anywhere in rvqllm's source."""
    for path in (ROOT / "rvqllm").rglob("*.py"):
        text = path.read_text()
        for bad in ("torch.load(", "import pickle", "pickle.load", "trust_remote_code=True"):
            assert bad not in text, f"{path}: {bad}"


# ------------------------------------------------------------------------------------------ 2. atomic saves
def _half_write_then_enospc(filename, tensors, metadata=None):
    Path(filename).write_bytes(b"\0" * 1000)  # some bytes made it before the disk filled up
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)


@pytest.mark.unit
def test_full_disk_during_save_keeps_old_checkpoint(ckpt, tmp_path, monkeypatch):
    out = Path(shutil.copytree(ckpt[0], tmp_path / "out"))
    before = folder_digest(out)
    model = tiny_llama()
    rvqllm.quantize(model, CFG.replace(seed=1), CALIB)
    monkeypatch.setattr(checkpoint, "write_safetensors", _half_write_then_enospc)
    with pytest.raises(RVQError) as info:
        rvqllm.save(model, out, overwrite=True)
    assert_one_line_error(info.value, "disk is full", "unchanged")
    assert folder_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-written sibling left behind
    assert torch.equal(logits(rvqllm.load(out)), ckpt[1])


@pytest.mark.unit
def test_full_disk_during_first_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_llama()
    rvqllm.quantize(model, CFG, CALIB)
    monkeypatch.setattr(checkpoint, "write_safetensors", _half_write_then_enospc)
    with pytest.raises(RVQError, match="nothing was written"):
        rvqllm.save(model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_replaces_whole_checkpoint(ckpt, tmp_path, monkeypatch, exchange):
    out = Path(shutil.copytree(ckpt[0], tmp_path / "out"))
    if not exchange:
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    model = tiny_gpt2()
    rvqllm.quantize(model, CFG, CALIB)
    want = logits(model)
    rvqllm.save(model, out, overwrite=True)
    assert torch.equal(logits(rvqllm.load(out)), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.unit
def test_a_checkpoint_that_would_not_load_is_never_published(ckpt, tmp_path, monkeypatch):
    out = Path(shutil.copytree(ckpt[0], tmp_path / "out"))
    before = folder_digest(out)
    model = tiny_llama()
    rvqllm.quantize(model, CFG, CALIB)
    import rvqllm.validate as validate

    def refuse(folder, *a, **k):
        raise RVQError(f"{folder}: simulated validation failure")

    monkeypatch.setattr(validate, "validate_checkpoint", refuse)
    with pytest.raises(RVQError, match="simulated"):
        rvqllm.save(model, out, overwrite=True)
    assert folder_digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.unit
def test_stale_temporaries_of_a_killed_save_are_removed(ckpt, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    model = tiny_llama()
    rvqllm.quantize(model, CFG, CALIB)
    rvqllm.save(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["file", "foreign folder"])
def test_overwrite_refuses_what_is_not_a_checkpoint(tmp_path, kind):
    target = tmp_path / "precious"
    if kind == "file":
        target.write_text("my thesis")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("my thesis")
    model = tiny_llama()
    rvqllm.quantize(model, CFG, CALIB)
    with pytest.raises(RVQError) as info:
        rvqllm.save(model, target, overwrite=True)
    assert_one_line_error(info.value, str(target))
    assert (target.read_text() if kind == "file" else (target / "notes.txt").read_text()) == "my thesis"


# ------------------------------------------------------------------------------------------ 3. resume
class _Kill(BaseException):
    """Stands in for a kill inside the process (the real SIGKILL test is below)."""


@pytest.mark.integration
def test_resume_after_interruption_is_bit_identical_and_ignores_uncommitted_files(tmp_path):
    ref = tiny_llama()
    rvqllm.quantize(ref, CFG, CALIB)
    run = tmp_path / "run"

    def die_in_block_1(name, done, total):
        if name.startswith("model.layers.1.") and name.endswith("v_proj"):
            raise _Kill

    with pytest.raises(_Kill):
        rvqllm.quantize(tiny_llama(), CFG, CALIB, die_in_block_1, run_dir=run)
    assert json.loads((run / "progress.json").read_text()) == {"blocks_done": 1, "distilled": False}
    (run / checkpoint.shard_name(1, 3)).write_bytes(b"half a file")  # what a kill mid-write leaves
    resumed = tiny_llama()
    report = rvqllm.quantize(resumed, CFG, CALIB, run_dir=run, resume=True)
    assert sum(1 for r in report.layers.values() if r.get("resumed")) == 7
    for (n, a), (m, b) in zip(ref.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert n == m and a.dtype == b.dtype and torch.equal(a, b), n


@pytest.mark.unit
def test_resume_refuses_a_different_run_or_a_damaged_one(tmp_path):
    run = tmp_path / "run"

    def stop(name, done, total):
        if done == 8:
            raise _Kill

    with pytest.raises(_Kill):
        rvqllm.quantize(tiny_llama(), CFG, CALIB, stop, run_dir=run)
    with pytest.raises(RVQError) as info:
        rvqllm.quantize(tiny_llama(), CFG.replace(seed=5), CALIB, run_dir=run, resume=True)
    assert_one_line_error(info.value, "different RVQ config")
    with pytest.raises(RVQError, match="different calibration"):
        rvqllm.quantize(tiny_llama(), CFG, (CALIB + 1) % 128, run_dir=run, resume=True)
    path = run / checkpoint.shard_name(0, 3)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RVQError, match="checksum"):
        rvqllm.quantize(tiny_llama(), CFG, CALIB, run_dir=run, resume=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rvqllm.cli", *args]


@pytest.mark.integration
def test_sigkill_then_resume_gives_the_same_bytes(tmp_path):
    """Really kill ``rvqllm quantize`` (SIGKILL) after its first block is committed, resume, compare bytes."""
    model = make_model_folder(tmp_path / "model", layers=4)
    text = make_text(tmp_path / "calib.txt")
    cfg = make_config(tmp_path / "cfg.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    common = [str(model), "--config", str(cfg), "--calib", str(text), "--quiet"]
    model_before = folder_digest(model)

    full = tmp_path / "full"
    subprocess.run(_cli("quantize", *common, "--out", str(full)), env=env, check=True, capture_output=True)

    out = tmp_path / "resumed"
    progress = tmp_path / "resumed.partial" / "progress.json"
    proc = subprocess.Popen(_cli("quantize", *common, "--out", str(out)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(progress.read_text())["blocks_done"] >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()  # nothing that looks like a checkpoint
    done = json.loads(progress.read_text())["blocks_done"]
    assert 1 <= done < 4

    refused = subprocess.run(_cli("quantize", *common, "--out", str(out)), env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr

    res = subprocess.run(_cli("quantize", *common, "--out", str(out), "--resume", "--json"), env=env,
                         check=True, capture_output=True, text=True)
    assert json.loads(res.stdout)["resumed_layers"] == 7 * done
    a, b = read_tensors(full), read_tensors(out)
    assert [p.name for p in weight_files(out)] == [shard_name(i, 5) for i in range(5)]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert folder_digest(out) == folder_digest(full)  # byte-identical, every file
    assert not (tmp_path / "resumed.partial").exists()
    assert folder_digest(model) == model_before  # the input model is never modified


# ------------------------------------------------------------------------------------------ 4. bounded memory
_MEM_SCRIPT = textwrap.dedent("""
    import json, sys, torch, rvqllm
    from transformers import LlamaConfig, LlamaForCausalLM
    n, mode, run = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)).eval()
    calib = torch.randint(0, 128, (n, 64), generator=torch.Generator().manual_seed(0))
    cfg = rvqllm.RVQConfig(vector_dim=8, stages=1, bits=4, kmeans_iters=2, error_feedback=False, calib_batch_size=64)
    def status(key):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: import-time peaks do not count
    rvqllm.quantize(model, cfg, calib, run_dir=run if mode == "disk" else None)
    print(json.dumps({"before_kib": before, "peak_kib": status("VmHWM")}))
""")


def _growth_mib(tmp_path: Path, runs: list[tuple[int, str]]) -> list[float]:
    """Peak RSS during ``quantize`` minus RSS before it (MiB), one subprocess per ``(n_sequences, mode)``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _MEM_SCRIPT, str(n), mode, str(tmp_path / f"run-{n}-{mode}")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n, mode in runs]
    peaks = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        res = json.loads(out.strip().splitlines()[-1])
        peaks.append((res["peak_kib"] - res["before_kib"]) / 1024)
    return peaks


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_calibration_size_does_not_grow_memory(tmp_path):
    """64x more calibration sequences: with the run folder the peak stays flat; in memory it grows.

    Allocator noise between runs is several MiB (measured: +27..+44 MiB for 64..4096 sequences on disk,
    the spread larger on a loaded machine), so the large run holds 64 MiB of activations per copy.
    """
    small, large = 64, 4096
    activations_mib = large * 64 * 64 * 4 / 2**20  # one copy of block inputs for the large run: 64 MiB
    disk_small, disk_large, mem_large = _growth_mib(tmp_path, [(small, "disk"), (large, "disk"), (large, "memory")])
    print(f"peak RSS growth during quantize, MiB: disk n={small}: {disk_small:.1f}, disk n={large}: "
          f"{disk_large:.1f}, memory n={large}: {mem_large:.1f}")
    assert disk_large - disk_small < 0.5 * activations_mib
    assert mem_large - disk_small > 1.0 * activations_mib  # in memory: inputs + outputs; the test can tell


# ------------------------------------------------------------------------------------------ 5. bad input, tried
@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"root": root, "model": make_model_folder(root / "model"), "text": make_text(root / "calib.txt"),
            "cfg": make_config(root / "cfg.yaml")}


def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


def quantize_args(env, out: Path, *extra: str, model: Path | None = None, cfg: Path | None = None,
                  text: Path | None = None) -> list[str]:
    return ["quantize", str(model or env["model"]), "--out", str(out), "--config", str(cfg or env["cfg"]),
            "--calib", str(text or env["text"]), "--quiet", *extra]


def assert_clean_failure(rc: int, err: str, *needles: str, parent: Path | None = None) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    if parent is not None:  # nothing half-written: no output, no run folder, no temporaries
        assert [p.name for p in parent.iterdir()] == [], list(parent.iterdir())


def _nonmodel(env, tmp):
    (tmp / "notes").mkdir()
    return {"model": tmp / "notes"}


def _nan_model(env, tmp):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(env["model"])
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    return {"model": make_model_folder(tmp / "nan", m)}


def _bert(env, tmp):
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    m = BertLMHeadModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=96, vocab_size=128, max_position_embeddings=64))
    return {"model": make_model_folder(tmp / "bert", m)}


def _t5(env, tmp):
    from transformers import T5Config, T5ForConditionalGeneration

    m = T5ForConditionalGeneration(T5Config(d_model=64, d_ff=96, num_layers=1, num_heads=4, d_kv=16, vocab_size=128))
    return {"model": make_model_folder(tmp / "t5", m)}


def _text(content):
    def make(env, tmp):
        (tmp / "t.txt").write_text(content)
        return {"text": tmp / "t.txt"}
    return make


def _cfg(**changes):
    def make(env, tmp):
        return {"cfg": make_config(tmp / "c.yaml", **changes)}
    return make


BAD_INPUTS = {
    "missing path": (lambda env, tmp: {"model": tmp / "nope"}, "not found"),
    "non-model folder": (_nonmodel, "not a model folder"),
    "no linear layers": (_cfg(skip=["layers"]), "no linear layers"),
    "non-causal (bert)": (_bert, "not causal"),
    "encoder-decoder (t5)": (_t5, "not a causal LM"),
    "empty calibration text": (_text(""), "calibration text is empty"),
    "calibration text too short": (_text("w1 w2 w3"), "shorter than one sequence"),
    "nan weights": (_nan_model, "NaN/Inf"),
    "vector dim divides no layer": (_cfg(vector_dim=7), "divides no layer"),
    "bits out of range": (_cfg(bits=17), "bits=17 is out of range"),
    "stages out of range": (_cfg(stages=0), "stages=0 is out of range"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_one_clean_error(case, cli_env, tmp_path, capsys):
    make, needle = BAD_INPUTS[case]
    inputs_dir = tmp_path / "inputs"
    inputs_dir.mkdir()
    outs = tmp_path / "outs"
    outs.mkdir()
    rc, err = run_cli(capsys, *quantize_args(cli_env, outs / "q", **make(cli_env, inputs_dir)))
    assert_clean_failure(rc, err, needle, parent=outs)


@pytest.mark.integration
def test_existing_output_is_refused_and_kept(cli_env, ckpt, tmp_path, capsys):
    out = Path(shutil.copytree(ckpt[0], tmp_path / "out"))
    before = folder_digest(out)
    rc, err = run_cli(capsys, *quantize_args(cli_env, out))
    assert_clean_failure(rc, err, "exists", "--overwrite")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep me")
    rc, err = run_cli(capsys, *quantize_args(cli_env, notes, "--overwrite"))
    assert_clean_failure(rc, err, "not an rvqllm checkpoint")
    rc, err = run_cli(capsys, *quantize_args(cli_env, cli_env["model"] / "sub", "--overwrite"))
    assert_clean_failure(rc, err, "input model")
    assert folder_digest(out) == before and (notes / "a.txt").read_text() == "keep me"


@pytest.mark.integration
def test_full_disk_in_the_cli(cli_env, ckpt, tmp_path, capsys, monkeypatch):
    out = Path(shutil.copytree(ckpt[0], tmp_path / "out"))
    before = folder_digest(out)
    write = checkpoint.write_safetensors

    def full_at_the_last_shard(filename, tensors, metadata=None):  # the blocks fit, the checkpoint does not
        first, _, last = Path(filename).name.partition("-of-")
        if first.removeprefix("model-") == last.split(".")[0]:
            return _half_write_then_enospc(filename, tensors, metadata)
        return write(filename, tensors, metadata)

    monkeypatch.setattr(checkpoint, "write_safetensors", full_at_the_last_shard)
    rc, err = run_cli(capsys, *quantize_args(cli_env, out, "--overwrite"))
    assert_clean_failure(rc, err, "disk is full")
    assert folder_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial"]  # the run can be resumed
    monkeypatch.setattr(checkpoint, "write_safetensors", write)
    rc, err = run_cli(capsys, *quantize_args(cli_env, out, "--overwrite", "--resume"))
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.integration
@pytest.mark.parametrize("tamper", ["flipped byte", "code past codebook", "config edited", "truncated"])
def test_corrupt_checkpoint_in_the_cli(tamper, bad, capsys):
    TAMPERS[tamper][0](bad)
    text = make_text(bad.parent / "eval.txt")
    for cmd in (["info", str(bad), "--verify"],
                ["eval", str(bad), "--text", str(text), "--windows", "1", "--context", "8", "--quiet"]):
        rc, err = run_cli(capsys, *cmd)
        assert_clean_failure(rc, err, TAMPERS[tamper][1])


@pytest.mark.integration
def test_debug_shows_the_traceback_and_a_real_process_does_not(tmp_path, capsys):
    with pytest.raises(RVQError):
        main(["--debug", "info", str(tmp_path / "nope")])
    with pytest.raises(RVQError):
        main(["info", str(tmp_path / "nope"), "--debug"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(_cli("quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []
