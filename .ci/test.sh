#!/usr/bin/env bash
# The test command (README): set up the venv if needed, then run the whole suite,
# multi-process (slow) and Slurm tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
exec python -m pytest -q "$@"
