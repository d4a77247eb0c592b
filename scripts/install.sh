#!/usr/bin/env bash
# Creates .venv and installs lit-gcpo with its test tools (CPU torch from the pinned wheel); idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import lit_gcpo, pytest, faiss, math_verify" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch .venv/.installed
fi
