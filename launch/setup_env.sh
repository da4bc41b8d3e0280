#!/usr/bin/env bash
# Create/refresh the project's virtual environment in .venv (idempotent, CPU torch).
# The pinned CPU wheel matters: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
if ! python -c "import iddpm_ds, deepspeed, webdataset, sklearn, pytest, xdist" 2>/dev/null; then
  pip install -q -e '.[dev,demo]'
fi
python -c "import torch, deepspeed; print(f'env ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')" 2>/dev/null | tail -1
