"""The sharded checkpoint: one safetensors shard per decoder block + one for the rest + an index.

save -> the files described in :mod:`rvqllm.checkpoint` -> rvqllm.load and from_pretrained give the
in-memory model's logits; the first single-file layout still loads; damaged shards or index are refused
with one line; publish assembles a folder of block shards atomically and keeps them resumable on failure.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import rvqllm
from rvqllm import checkpoint
from rvqllm.checkpoint import (
    INDEX_NAME,
    block_tensors,
    publish,
    quantization_config,
    read_shard,
    rest_tensors,
    shard_name,
    write_index,
    write_shard,
)
from rvqllm.errors import RVQError
from rvqllm.validate import (
    CONFIG_SUM_KEY,
    TENSOR_SUMS_KEY,
    checksum_metadata,
    config_digest,
    tensor_digest,
    write_safetensors,
)
from tests.conftest import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.integration

CFG = rvqllm.RVQConfig(vector_dim=4, stages=1, bits=4, beam_width=1, kmeans_iters=2, calib_sequences=4,
                       calib_seq_len=16)
CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
BUILDS = {"llama": (tiny_llama, "model.layers"), "gpt2": (tiny_gpt2, "transformer.h")}


def quantized(build, seed: int = 0):
    model = build()
    rvqllm.quantize(model, CFG.replace(seed=seed), CALIB)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def header(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_one_line(err: BaseException, *needles: str) -> None:
    msg = str(err)
    assert isinstance(err, RVQError) and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


@pytest.fixture(scope="module", params=list(BUILDS))
def saved(request, tmp_path_factory):
    """``(arch, folder written by rvqllm.save, the quantized model, its logits on IDS)``."""
    build, _ = BUILDS[request.param]
    model = quantized(build)
    folder = rvqllm.save(model, tmp_path_factory.mktemp(request.param) / "ckpt")
    return request.param, folder, model, logits(model)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = quantized(tiny_llama)
    return rvqllm.save(model, tmp_path_factory.mktemp("llama") / "ckpt"), model, logits(model)


@pytest.fixture
def bad(llama, tmp_path) -> Path:
    return Path(shutil.copytree(llama[0], tmp_path / "bad"))


# ------------------------------------------------------------------------------------------ layout
def test_save_writes_one_shard_per_block_and_an_index(saved):
    arch, folder, model, _ = saved
    prefix = BUILDS[arch][1]
    n = 3  # two blocks + the rest
    shards = [shard_name(i, n) for i in range(n)]
    assert shards[0] == "model-00001-of-00003.safetensors"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*shards, INDEX_NAME, "config.json", "generation_config.json"])
    index = json.loads((folder / INDEX_NAME).read_text())
    config = json.loads((folder / "config.json").read_text())
    meta = index["metadata"]
    assert meta["format_version"] == "1" and meta["quant_method"] == "rvq"
    assert meta[CONFIG_SUM_KEY] == config_digest(config)
    tensors = all_tensors(folder)
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert meta["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    specs = quantization_config(model)["layers"]
    for i in range(n - 1):
        path = folder / shards[i]
        names = {k for k, v in index["weight_map"].items() if v == shards[i]}
        state = {k for k in model.state_dict() if k.startswith(f"{prefix}.{i}.")}
        assert names == state  # quantized layers and the block's float params (norms)
        assert any(k.endswith(".codes") for k in names) and any("ln" in k or "norm" in k for k in names)
        got, got_specs = read_shard(path)
        assert set(got) == names
        assert got_specs == {k: s for k, s in specs.items() if k.startswith(f"{prefix}.{i}.")}
        assert set(json.loads(header(path)["__metadata__"][TENSOR_SUMS_KEY])) == names
    rest = {k for k, v in index["weight_map"].items() if v == shards[-1]}
    assert rest and not any(k.startswith(f"{prefix}.") for k in rest)
    assert "lm_head.weight" not in rest  # tied to the embeddings: stored once
    assert read_shard(folder / shards[-1])[1] == {}


def test_load_and_from_pretrained_give_the_in_memory_logits(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    _, folder, _, want = saved
    assert torch.equal(logits(rvqllm.load(folder)), want)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(logits(hf), want, rtol=0, atol=1e-5)
    hf.save_pretrained(tmp_path / "again")  # through rvqllm.save: the same shards, byte for byte
    again = digest(tmp_path / "again")
    assert {k: v for k, v in again.items() if k.startswith("model-")} == \
        {k: v for k, v in digest(folder).items() if k.startswith("model-")}
    assert torch.equal(logits(rvqllm.load(tmp_path / "again")), want)


def test_saves_are_byte_identical_and_store_the_storage_dtype(tmp_path):
    model = quantized(tiny_gpt2)
    a = rvqllm.save(model, tmp_path / "a", dtype=torch.float16)
    b = rvqllm.save(model, tmp_path / "b", dtype=torch.float16)
    assert digest(a) == digest(b)
    tensors = all_tensors(a)
    name = "transformer.h.0.attn.c_attn"
    assert tensors[f"{name}.codebooks"].dtype == torch.float16 and tensors[f"{name}.codes"].dtype == torch.uint8
    assert tensors[f"{name}.bias"].dtype == torch.float16 and tensors["transformer.h.0.ln_1.weight"].dtype == torch.float16
    assert json.loads((a / "config.json").read_text())["dtype"] == "float16"
    torch.testing.assert_close(logits(rvqllm.load(a)), logits(model), rtol=0, atol=0.05)


def test_rvqllm_info_reads_a_sharded_checkpoint(llama, capsys):
    from rvqllm.cli import main

    folder = llama[0]
    assert main(["info", str(folder), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] == sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------ the first layout
def write_single_file(folder: Path) -> None:
    """Rewrite a sharded checkpoint in the first layout: one model.safetensors with every tensor and the
    config checksum in its metadata."""
    tensors = all_tensors(folder)
    config = json.loads((folder / "config.json").read_text())
    for p in [*folder.glob("model-*.safetensors"), folder / INDEX_NAME]:
        p.unlink()
    write_safetensors(folder / "model.safetensors", tensors,
                      {"format": "pt", "quant_method": "rvq", "format_version": "1", **checksum_metadata(tensors, config)})


def test_single_file_checkpoint_still_loads_and_validates(bad, llama):
    from transformers import AutoModelForCausalLM

    write_single_file(bad)
    assert torch.equal(logits(rvqllm.load(bad)), llama[2])
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(bad)), llama[2], rtol=0, atol=1e-5)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-3] ^= 0x10
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(RVQError) as info:
        rvqllm.load(bad)
    assert_one_line(info.value, "model.safetensors", "stored checksum")


def test_both_layouts_present_reads_model_safetensors_like_transformers(bad, llama):
    single = Path(shutil.copytree(bad, bad.parent / "single"))
    write_single_file(single)
    shutil.copy(single / "model.safetensors", bad / "model.safetensors")
    (bad / INDEX_NAME).write_text("not json")  # ignored: model.safetensors wins
    assert torch.equal(logits(rvqllm.load(bad)), llama[2])


# ------------------------------------------------------------------------------------------ damage
def _weight_map(folder: Path) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())


def _write_index_json(folder: Path, index: dict) -> None:
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _missing_shard(folder):
    (folder / shard_name(1, 3)).unlink()


def _listed_in_wrong_shard(folder):
    index = _weight_map(folder)
    index["weight_map"]["model.layers.0.input_layernorm.weight"] = shard_name(1, 3)
    _write_index_json(folder, index)


def _outside_file(target):
    def damage(folder):
        index = _weight_map(folder)
        index["weight_map"]["model.norm.weight"] = target
        _write_index_json(folder, index)
    return damage


def _config_edited(folder):
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))


def _shard_of_another_checkpoint(folder):
    other = rvqllm.save(quantized(tiny_llama, seed=3), folder.parent / "other")
    shutil.copy(other / shard_name(0, 3), folder / shard_name(0, 3))


def _index_not_json(folder):
    (folder / INDEX_NAME).write_text('{"weight_map": ')


def _repeated_key(folder):
    text = (folder / INDEX_NAME).read_text()
    (folder / INDEX_NAME).write_text(text.replace('"weight_map": {', '"weight_map": {\n"model.norm.weight": '
                                                  f'"{shard_name(0, 3)}",', 1))


def _tensor_not_listed(folder):
    index = _weight_map(folder)
    del index["weight_map"]["model.norm.weight"]
    _write_index_json(folder, index)


def _listed_but_absent(folder):
    index = _weight_map(folder)
    index["weight_map"]["model.layers.0.extra"] = shard_name(0, 3)
    _write_index_json(folder, index)


def _truncated_shard(folder):
    path = folder / shard_name(0, 3)
    path.write_bytes(path.read_bytes()[:-7])


def _flipped_byte(folder):
    path = folder / shard_name(1, 3)
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x04
    path.write_bytes(bytes(data))


DAMAGE = {
    "missing shard": (_missing_shard, ["model-00002-of-00003.safetensors", "is missing"]),
    "tensor in the wrong shard": (_listed_in_wrong_shard, ["model-00001-of-00003.safetensors",
                                                          "input_layernorm", "places in model-00002"]),
    "parent path": (_outside_file("../model-00001-of-00003.safetensors"), ["not a shard file of this folder"]),
    "absolute path": (_outside_file("/etc/passwd"), ["not a shard file of this folder", "/etc/passwd"]),
    "sub folder": (_outside_file("sub/model-00001-of-00003.safetensors"), ["not a shard file of this folder"]),
    "other count": (_outside_file("model-00001-of-00004.safetensors"), ["different checkpoints"]),
    "config edited": (_config_edited, ["config.json does not match the checksum stored in " + INDEX_NAME]),
    "shard of another checkpoint": (_shard_of_another_checkpoint, ["model-00001-of-00003", "another checkpoint"]),
    "index not json": (_index_not_json, [INDEX_NAME, "not valid JSON"]),
    "repeated key": (_repeated_key, [INDEX_NAME, "twice"]),
    "tensor not listed": (_tensor_not_listed, ["model.norm.weight", "does not list"]),
    "listed but absent": (_listed_but_absent, ["model.layers.0.extra", "lacks tensor"]),
    "truncated shard": (_truncated_shard, ["model-00001-of-00003.safetensors", "truncated"]),
    "flipped byte": (_flipped_byte, ["model-00002-of-00003.safetensors", "stored checksum"]),
}


@pytest.mark.parametrize("case", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_sharded_checkpoint_is_refused_with_one_line(case, bad):
    damage, needles = DAMAGE[case]
    damage(bad)
    with pytest.raises(RVQError) as info:
        rvqllm.load(bad)
    assert_one_line(info.value, *needles)


def test_read_shard_refuses_damage_with_one_line(llama, tmp_path):
    src = llama[0] / shard_name(0, 3)
    path = tmp_path / src.name
    data = bytearray(src.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(RVQError) as info:
        read_shard(path)
    assert_one_line(info.value, str(path), "stored checksum")
    write_safetensors(path, {"x": torch.zeros(2)}, {TENSOR_SUMS_KEY: json.dumps({"x": tensor_digest(torch.zeros(2))})})
    with pytest.raises(RVQError) as info:
        read_shard(path)
    assert_one_line(info.value, str(path), "rvq_specs")
    with pytest.raises(RVQError) as info:
        read_shard(tmp_path / "nope.safetensors")
    assert_one_line(info.value, "is missing")


# ------------------------------------------------------------------------------------------ block by block
def block_shards(model, folder: Path, dtype=None) -> Path:
    """What a quantization run leaves: each block's shard, written as the block finished, beside its other files."""
    folder.mkdir(parents=True)
    specs = quantization_config(model)["layers"]
    for i in range(2):
        under = f"model.layers.{i}."
        write_shard(folder / shard_name(i, 3), block_tensors(model, i, dtype),
                    {k: s for k, s in specs.items() if k.startswith(under)})
    (folder / "run.json").write_text("{}")
    (folder / "progress.json").write_text('{"blocks_done": 2}')
    (folder / "in-0001").mkdir()
    (folder / "in-0001" / "00000.safetensors").write_bytes(b"activations")
    return folder


def publish_args(model, dtype=None) -> dict:
    return {"model_config": model.config.to_dict(), "qcfg": quantization_config(model),
            "rest": rest_tensors(model, dtype), "dtype": dtype, "generation_config": model.generation_config}


@pytest.mark.parametrize("how", ["parts", "model"])
def test_publish_assembles_the_same_checkpoint_as_save(llama, tmp_path, how):
    folder, model, want = llama
    run = block_shards(model, tmp_path / "out.partial")
    out = publish(run, tmp_path / "out", **(publish_args(model) if how == "parts" else {"model": model}))
    assert digest(out) == digest(folder)  # the run's extra files stayed out; same bytes as save()
    assert torch.equal(logits(rvqllm.load(out)), want)
    assert (run / "run.json").exists() and (run / "in-0001").is_dir()  # the run folder is the caller's


def test_block_tensors_needs_only_its_block_loaded():
    model = quantized(tiny_llama)
    want = block_tensors(model, 0, None)
    model.model.layers[1].to("meta")
    model.model.embed_tokens.to("meta")
    got = block_tensors(model, 0, None)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    with pytest.raises(RVQError, match="meta device"):
        block_tensors(model, 1, None)


def test_publish_refuses_a_missing_block_shard(llama, tmp_path):
    _, model, _ = llama
    run = block_shards(model, tmp_path / "run")
    (run / shard_name(1, 3)).unlink()
    with pytest.raises(RVQError) as info:
        publish(run, tmp_path / "out", **publish_args(model))
    assert_one_line(info.value, "model-00002-of-00003.safetensors", "block 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["file", "foreign folder", "no overwrite"])
def test_publish_refuses_what_is_not_a_checkpoint(llama, tmp_path, kind):
    _, model, _ = llama
    run = block_shards(model, tmp_path / "run")
    before = digest(run)
    target = tmp_path / "precious"
    if kind == "file":
        target.write_text("my thesis")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("my thesis")
    with pytest.raises(RVQError) as info:
        publish(run, target, **publish_args(model), overwrite=kind != "no overwrite")
    assert_one_line(info.value, str(target))
    assert (target.read_text() if kind == "file" else (target / "notes.txt").read_text()) == "my thesis"
    assert digest(run) == before


def test_publish_refuses_an_output_inside_the_run_folder(llama, tmp_path):
    _, model, _ = llama
    run = block_shards(model, tmp_path / "run")
    with pytest.raises(RVQError, match="overlap"):
        publish(run, run / "out", **publish_args(model))


def _refuse_validation(monkeypatch):
    import rvqllm.validate as validate

    def refuse(folder, *a, **k):
        raise RVQError(f"{folder}: simulated validation failure")

    monkeypatch.setattr(validate, "validate_checkpoint", refuse)


def _full_disk_at_the_swap(monkeypatch):
    def full(tmp, out):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

    monkeypatch.setattr(checkpoint, "_swap_into_place", full)


def _no_hard_links(monkeypatch):
    def no_link(src, dst, *a, **k):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(src))

    monkeypatch.setattr(os, "link", no_link)


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "moves"])
@pytest.mark.parametrize("failure", ["validation", "full disk"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_publish_leaves_the_shards_resumable(llama, tmp_path, monkeypatch, links, failure, existing):
    folder, model, want = llama
    run = block_shards(model, tmp_path / "out.partial")
    before = digest(run)
    out = tmp_path / "out"
    if existing:
        shutil.copytree(folder, out)
        old = digest(out)
    if not links:
        _no_hard_links(monkeypatch)
    with monkeypatch.context() as m:
        (_refuse_validation if failure == "validation" else _full_disk_at_the_swap)(m)
        with pytest.raises(RVQError) as info:
            publish(run, out, **publish_args(model), overwrite=existing)
    assert_one_line(info.value, *(["simulated"] if failure == "validation" else
                                  ["disk is full", "unchanged" if existing else "nothing was written"]))
    assert digest(run) == before  # every shard back where it was
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.partial", *(["out"] if existing else [])])
    if existing:
        assert digest(out) == old
    # ... and the run can publish once the problem is gone
    publish(run, out, **publish_args(model), overwrite=existing)
    assert torch.equal(logits(rvqllm.load(out)), want)
    assert digest(out) == digest(folder)


@pytest.mark.parametrize("parent", ["read-only", "a file"])
def test_publish_where_the_output_parent_is_unusable(llama, tmp_path, parent):
    if parent == "read-only" and os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    _, model, _ = llama
    run = block_shards(model, tmp_path / "run")
    before = digest(run)
    where = tmp_path / "p"
    if parent == "a file":
        where.write_text("x")
    else:
        where.mkdir()
        where.chmod(0o555)
    try:
        with pytest.raises(RVQError) as info:
            publish(run, where / "out", **publish_args(model))
    finally:
        if where.is_dir():
            where.chmod(0o755)
    assert_one_line(info.value, "could not save", "nothing was written")
    assert digest(run) == before
    assert (where.read_text() == "x") if parent == "a file" else list(where.iterdir()) == []


def test_a_model_without_blocks_is_one_shard(tmp_path, monkeypatch):
    model = quantized(tiny_llama)
    want = logits(model)

    def no_blocks(m):
        raise RVQError("no blocks")

    monkeypatch.setattr(checkpoint, "_blocks", no_blocks)
    folder = rvqllm.save(model, tmp_path / "one")
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    assert set(_weight_map(folder)["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    monkeypatch.undo()
    assert torch.equal(logits(rvqllm.load(folder)), want)


def test_write_index_refuses_overlapping_shards(llama, tmp_path):
    folder = Path(shutil.copytree(llama[0], tmp_path / "c"))
    tensors, specs = read_shard(folder / shard_name(0, 3))
    last, _ = read_shard(folder / shard_name(2, 3))
    write_shard(folder / shard_name(2, 3), {**last, **dict(list(tensors.items())[:1])}, {})
    with pytest.raises(RVQError, match="is in both"):
        write_index(folder, json.loads((folder / "config.json").read_text()))
