#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit, integration and e2e (the real reference model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
