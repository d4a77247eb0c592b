#!/usr/bin/env bash
# The main job: a real GCPO run on the embedded tiny task and policy, on the CPU, in a few minutes.
# Extra arguments go to `lit-gcpo fit` (e.g. --trainer.max_steps 50).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/lit-gcpo fit --config configs/quickstart.yaml "$@"
