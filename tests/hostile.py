"""Hostile configs with valid checksums: the bounded-work property, run in a resource-limited process.

``python -m tests.hostile --examples N --seed S --json OUT`` builds three small valid inputs (a tied Llama
checkpoint, a GPT-2 checkpoint with Conv1D layers, a Mixtral checkpoint with split experts) and one plain
Hugging Face model folder to quantize, then draws ``N`` cases with hypothesis: 1-3 integers of
``config.json`` (existing ones, nested ones such as quantized layer specs, or added size keys such as
``num_experts`` or ``layer_types``) set to values from 0 to 2**62, re-signed like a stranger would
(every checksum recomputed, so only the size and structure checks stand in the way), and opened by one
of ``rvqllm.load``, ``AutoModelForCausalLM.from_pretrained`` (after ``import rvqllm``) or, for the model
folder, the streaming quantizer's reader (:class:`rvqllm.source.ShardSource`).

Property, per case: the input loads, or it is refused with a one-line :class:`RVQError` (from
``from_pretrained``, transformers' own config errors count as refusals too), in at most ``--limit-s``
seconds (default ``LIMIT_S``), with the process's peak resident memory growing by at most twice the
files' size (weights and config.json) plus ``SLACK_MIB`` (interpreter and allocator noise; the largest
growth seen is reported). On the ``from_pretrained`` path transformers parses config.json before rvqllm
is asked, which costs a few times that file's size: 4 x its size is allowed there on top. The process runs
under ``RLIMIT_AS`` (its address space after warm-up plus 1 GiB), so a runaway allocation fails the case
instead of the machine. The summary (cases by outcome, slowest case, largest memory growth) is written
as JSON; any violation exits non-zero with the failing case.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import rvqllm
from rvqllm.checkpoint import write_index
from rvqllm.errors import RVQError
from tests.conftest import tiny_gpt2, tiny_llama
from tests.test_reliability import CALIB, make_model_folder, read_tensors, write_as_stranger

LIMIT_S = 5.0
SLACK_MIB = 8
#: size keys a config may add (each read by some architecture's constructor)
ADDED = ["num_hidden_layers", "num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
         "head_dim", "sliding_window", "max_window_layers", "intermediate_size", "moe_intermediate_size",
         "num_key_value_heads", "n_inner", "n_positions", "max_position_embeddings", "vocab_size", "hidden_size",
         "layer_types", "rope_scaling", "first_k_dense_replace", "decoder_sparse_step"]
VALUES = st.one_of(st.integers(-2, 16), st.integers(17, 4096), st.integers(4097, 2**24),
                   st.integers(25, 62).map(lambda k: 2**k), st.integers(2**24, 2**40))


def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _int_paths(obj, path=()) -> list[tuple]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if type(v) is int:
                out.append((*path, k))
            elif isinstance(v, dict):
                out += _int_paths(v, (*path, k))
    return out


def _set(config: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        config = config[k]
    config[path[-1]] = value


def build_inputs(base: Path) -> list[dict]:
    """The valid inputs every case starts from: ``{kind, files: {name: bytes}, size}``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    def tiny_mixtral():
        torch.manual_seed(0)
        return MixtralForCausalLM(MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                                max_position_embeddings=64, num_local_experts=4,
                                                num_experts_per_tok=2)).eval()

    cfg = rvqllm.RVQConfig(vector_dim=8, stages=2, bits=4, kmeans_iters=2, calib_batch_size=4, error_feedback=False)
    out = []
    for build in (tiny_llama, tiny_gpt2, tiny_mixtral):
        model = build()
        rvqllm.quantize(model, cfg, CALIB)
        out.append({"kind": "checkpoint", "name": build.__name__, "folder": rvqllm.save(model, base / build.__name__)})
    out.append({"kind": "model", "name": "hf-llama", "folder": make_model_folder(base / "hf-llama")})
    for item in out:
        item["files"] = {p.name: p.read_bytes() for p in sorted(item["folder"].iterdir()) if p.is_file()}
        item["size"] = sum(len(b) for n, b in item["files"].items() if n.endswith(".safetensors"))
    return out


def open_input(kind: str, how: str, folder: Path):
    if how == "load":
        return rvqllm.load(folder)
    if how == "from_pretrained":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    from rvqllm.source import ShardSource

    return ShardSource(folder)


class Violation(AssertionError):
    pass


def run(examples: int, seed: int | None, work: Path, limit_s: float = LIMIT_S) -> dict:
    inputs = build_inputs(work / "src")
    for item in inputs:  # warm up: every modeling module imported, every code path touched once
        for how in (("load", "from_pretrained") if item["kind"] == "checkpoint" else ("source",)):
            open_input(item["kind"], how, item["folder"])
    limit = _status("VmSize") + 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    summary = {"cases": 0, "outcomes": {}, "slowest_s": 0.0, "largest_growth_mib": 0.0,
               "rlimit_as_mib": limit >> 20}
    counter = [0]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    @hypothesis_seed(seed or 0)
    def case(data):
        item = inputs[data.draw(st.integers(0, len(inputs) - 1), label="input")]
        how = data.draw(st.sampled_from(["load", "load", "from_pretrained"])) if item["kind"] == "checkpoint" else "source"
        config = json.loads(item["files"]["config.json"])
        existing = [p for p in _int_paths(config) if p[0] not in ("quantization_config",) or "layers" in p]
        edits = []
        for _ in range(data.draw(st.integers(1, 3))):
            if data.draw(st.booleans()):
                path = data.draw(st.sampled_from(existing))
            else:
                path = (data.draw(st.sampled_from(ADDED)),)
            value = data.draw(VALUES)
            if path[-1] == "layer_types":
                value = ["full_attention"] * min(max(value, 0), 2**20)
            elif path[-1] == "rope_scaling":
                value = {"rope_type": "linear", "factor": float(max(value, 1))}
            _set(config, path, value)
            edits.append([".".join(map(str, path)), value if not isinstance(value, list) else f"list of {len(value)}"])
        counter[0] += 1
        folder = work / f"case{counter[0]}"
        folder.mkdir()
        for name, blob in item["files"].items():
            (folder / name).write_bytes(blob)
        config_text = json.dumps(config)
        (folder / "config.json").write_text(config_text)
        if item["kind"] == "checkpoint":  # re-sign: the index holds the config's checksum (and the shards' specs)
            if any(e[0].startswith("quantization_config") for e in edits):
                write_as_stranger(folder, read_tensors(folder), config)
            else:
                write_index(folder, config)
        _reset_peak()
        before = _status("VmRSS")
        start = time.perf_counter()
        old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("over 30 s")))
        signal.alarm(30)
        try:
            open_input(item["kind"], how, folder)
            outcome = "loaded"
        except RVQError as err:
            if "\n" in str(err):
                raise Violation(f"a multi-line error for {item['name']} {how} {edits}: {err}") from None
            outcome = "refused"
        except TimeoutError:
            raise Violation(f"{item['name']} {how} {edits}: still working after 30 s") from None
        except Exception as err:  # transformers' own config checks on the from_pretrained path
            if how != "from_pretrained" or isinstance(err, MemoryError):
                raise Violation(f"{item['name']} {how} {edits}: {type(err).__name__}: {err}") from err
            outcome = "refused-by-transformers"
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        seconds = time.perf_counter() - start
        growth = max(_status("VmHWM") - before, 0)
        shutil.rmtree(folder)
        key = f"{item['name']}:{how}:{outcome}"
        summary["outcomes"][key] = summary["outcomes"].get(key, 0) + 1
        summary["cases"] += 1
        summary["slowest_s"] = max(summary["slowest_s"], round(seconds, 3))
        summary["largest_growth_mib"] = max(summary["largest_growth_mib"], round(growth / 2**20, 2))
        by_path = summary.setdefault("largest_growth_mib_by_path", {})
        by_path[how] = max(by_path.get(how, 0.0), round(growth / 2**20, 2))
        slowest = summary.setdefault("slowest_s_by_path", {})
        slowest[how] = max(slowest.get(how, 0.0), round(seconds, 3))
        if seconds > limit_s:
            raise Violation(f"{item['name']} {how} {edits}: {outcome} after {seconds:.1f} s (limit {limit_s} s)")
        files = item["size"] + len(config_text)
        # from_pretrained: transformers parses config.json itself before rvqllm sees it (a few times its size)
        parse = 4 * len(config_text) if how == "from_pretrained" else 0
        if growth > 2 * files + parse + SLACK_MIB * 2**20:
            raise Violation(f"{item['name']} {how} {edits}: {outcome} with {growth / 2**20:.1f} MiB more memory "
                            f"(limit 2 x {files / 2**20:.2f} MiB{' + 4 x config.json' if parse else ''} "
                            f"+ {SLACK_MIB} MiB)")

    case()
    return summary


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--seed", type=int, help="draw fresh random cases (default: a fixed, derandomized set)")
    p.add_argument("--json", required=True)
    p.add_argument("--limit-s", type=float, default=LIMIT_S, help="seconds a case may take (default %(default)s)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as work:
        try:
            summary = run(args.examples, args.seed, Path(work), args.limit_s)
        except Violation as err:
            print(f"VIOLATION: {err}", file=sys.stderr)
            return 1
    Path(args.json).write_text(json.dumps(summary, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
