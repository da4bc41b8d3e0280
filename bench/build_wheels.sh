#!/usr/bin/env bash
# Builds .whl/ (gitignored): every wheel bench/gpu_check.sh installs on a GPU machine that has
# python3 with CUDA torch and no network. Run it here (PyPI reachable), then carry .whl/.
#
#   bash bench/build_wheels.sh                       # this Python's version and 3.12
#   WHEEL_PYTHONS="3.12 3.13" bash bench/build_wheels.sh
#
# The pins are bench/gpu_wheels.txt. Binary wheels are fetched for each Python version in
# WHEEL_PYTHONS (default: this interpreter's, which tests/test_wheels.py installs, and 3.12,
# the lent H100/H200 machines' python3). deepspeed is a source release only: it is built
# here into a pure-Python wheel (no ops prebuilt; DeepSpeed JIT-builds an op when one is
# used, and picks its accelerator at run time). That build imports torch, so PYTHON must be
# an interpreter with torch (default: python3, e.g. the activated project venv).
# Files already in .whl/ are kept; a wheel of a version not pinned is removed, so that
# .whl/ holds one version of each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIST=bench/gpu_wheels.txt
OUT=.whl
HERE=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYTHONS=${WHEEL_PYTHONS:-$(printf '%s\n' "$HERE" 3.12 | sort -u | tr '\n' ' ')}
# glibc 2.17 .. 2.35: this machine and CI (Debian 12, 2.36), the GPU machines (Ubuntu, 2.39)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64
           manylinux_2_35_x86_64)
PIN() { grep -v '^\s*#' "$LIST" | sed 's/\s*#.*//; /^\s*$/d'; }
mkdir -p "$OUT"
began=$SECONDS

deepspeed=$(PIN | grep '^deepspeed==')
if ! ls "$OUT"/deepspeed-"${deepspeed#*==}"-*.whl >/dev/null 2>&1; then
    echo "[build_wheels] building $deepspeed (a source release) into a pure-Python wheel" >&2
    # no build isolation: its setup.py imports torch, which an isolated build would download
    env -u DS_ACCELERATOR DS_BUILD_OPS=0 "$PY" -m pip wheel -qq --no-deps --no-build-isolation \
        --disable-pip-version-check -w "$OUT" "$deepspeed" >&2
fi
platform_args=()
for platform in "${PLATFORMS[@]}"; do platform_args+=(--platform "$platform"); done
for version in $PYTHONS; do
    echo "[build_wheels] wheels for CPython $version" >&2
    PIN | grep -v '^deepspeed==' | "$PY" -m pip download -qq --no-deps --only-binary=:all: \
        --disable-pip-version-check --implementation cp --python-version "$version" \
        "${platform_args[@]}" -d "$OUT" -r /dev/stdin >&2
done

# one version of each: drop wheels whose name==version is not pinned (an older list's)
"$PY" - "$LIST" "$OUT" <<'EOF'
import re, sys
from pathlib import Path

norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
pins = set()
for line in Path(sys.argv[1]).read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        pins.add((norm(name), version))
present = set()
for wheel in sorted(Path(sys.argv[2]).glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if (norm(name), version) in pins:
        present.add((norm(name), version))
    else:
        print(f"[build_wheels] removing {wheel.name}: not pinned in {sys.argv[1]}", file=sys.stderr)
        wheel.unlink()
missing = sorted(f"{name}=={version}" for name, version in pins - present)
if missing:
    sys.exit(f"error: no wheel in {sys.argv[2]}/ for {', '.join(missing)}")
EOF
echo "[build_wheels] $OUT/: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1)," \
     "for CPython $(echo $PYTHONS), in $((SECONDS - began)) s" >&2
