#!/usr/bin/env bash
# The GPU check in one command: installs the carried wheels, then `python -m bench.gpu_check`
# runs the tests marked `gpu` (tests/test_gpu_check.py: fp16 loss scaling with a forced
# overflow, bf16, ZeRO-2/3 on one GPU, NCCL, img/s + MFU + peak memory of the paper's
# ImageNet-64 job at the largest batch that fits; the sampler's no-host-sync test) and prints
# one Markdown table. At most 8 minutes on one H100 or H200 (each row has a time budget; a
# row over it is killed and fails, the others run).
#
#   bash bench/gpu_check.sh                 # on a GPU machine whose python3 has CUDA torch
#   bash bench/gpu_check.sh --dry-run       # the same rows on CPU at tiny sizes (CI runs this)
#   bash bench/gpu_check.sh --install-only  # install the carried wheels, then stop
#
# A GPU machine without network needs nothing but python3 with torch, and .whl/ from here:
#   bash bench/build_wheels.sh              # on a machine with network (pins: bench/gpu_wheels.txt)
# then copy the repository with .whl/. The project's dependencies (pyproject.toml, less torch)
# and the test runner (pytest, pytest-timeout) that the machine lacks, or has at a version
# the project cannot use, are installed from .whl/ alone (pip --no-index); what it has and
# can use stays as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

dependencies() {  # pyproject.toml's [project] dependencies, torch left out (the machine's own), + pytest
    "$PY" - <<'EOF'
import re
try:
    import tomllib
    requirements = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
except ImportError:  # Python 3.10: the list's own lines
    block = re.search(r"^dependencies = \[(.*?)^\]", open("pyproject.toml").read(), re.S | re.M)
    requirements = re.findall(r'"([^"]+)"', block.group(1))
for requirement in requirements:
    if re.split(r"[<>=!~ ;\[]", requirement)[0].lower() != "torch":
        print(requirement)
print("pytest\npytest-timeout")  # the check is a pytest run (-m gpu)
EOF
}

install_wheels() {
    local needed
    needed=$(dependencies)
    if [ ! -d .whl ]; then
        # shellcheck disable=SC2086  # one requirement per word
        if "$PY" - $needed <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
try:
    sys.exit(0 if all(Requirement(r).specifier.contains(version(Requirement(r).name), prereleases=True)
                      for r in sys.argv[1:]) else 1)
except (PackageNotFoundError, ImportError):
    sys.exit(1)
EOF
        then return 0; fi
        echo "error: this python3 lacks the project's dependencies and there is no .whl/: run" \
             "'bash bench/build_wheels.sh' on a machine with network and copy .whl/ here" >&2
        exit 2
    fi
    # only .whl/: no index, and no pip configuration of this machine's adding other sources
    # shellcheck disable=SC2086
    if ! env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
        "$PY" -m pip install -q --no-index --find-links .whl --disable-pip-version-check $needed >&2; then
        local here built
        here=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
        built=$(cd .whl && ls -- pydantic_core-* 2>/dev/null | sed -E 's/.*-cp3([0-9]+)-.*/3.\1/' | tr '\n' ' ')
        if ls .whl/pydantic_core-*-cp"$here"-* >/dev/null 2>&1; then
            echo "error: installing from .whl/ failed (above): pin what is missing in" \
                 "bench/gpu_wheels.txt and rerun bash bench/build_wheels.sh" >&2
        else
            echo "error: installing from .whl/ failed (above): its wheels are for CPython $built," \
                 "this is $("$PY" -V 2>&1); rebuild with WHEEL_PYTHONS=<version> bash bench/build_wheels.sh" >&2
        fi
        exit 2
    fi
}

install_wheels
if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_check "$@"
