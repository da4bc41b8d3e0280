#!/usr/bin/env bash
# The GPU check in one command: fp16 loss scaling with a forced overflow, bf16, ZeRO-2/3 on
# one GPU, NCCL, img/s + MFU of the paper's ImageNet-64 job at the largest batch that fits,
# and the sampler's no-host-sync test; one table. About 3-5 minutes on one H200.
#
#   bash bench/gpu_check.sh            # on a GPU machine with torch installed
#   bash bench/gpu_check.sh --dry-run  # the same rows on CPU at tiny sizes (CI runs this)
#
# Machines without network: carry the wheels in .whl/ (gitignored), made with
#   pip wheel --no-deps deepspeed==0.19.8 webdataset hjson braceexpand -w .whl/
# (add wheels of anything else the machine lacks: every .whl there is installed, --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NEEDED="deepspeed webdataset pydantic yaml PIL numpy tqdm"

missing() {
    "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

if [ -n "$(missing deepspeed webdataset)" ]; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: deepspeed/webdataset are not installed and .whl/ holds no wheels; run:" \
             "pip wheel --no-deps deepspeed==0.19.8 webdataset hjson braceexpand -w .whl/" >&2
        exit 2
    fi
    echo "[gpu_check] installing the carried wheels: $(cd .whl && ls -- *.whl | tr '\n' ' ')" >&2
    "$PY" -m pip install -q --no-deps --no-index --disable-pip-version-check .whl/*.whl >&2
fi
absent=$(missing $NEEDED)
if [ -n "$absent" ]; then
    echo "error: python modules missing: $absent (add their wheels to .whl/)" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
