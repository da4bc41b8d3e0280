#!/usr/bin/env bash
# Fresh machine -> a trained demo model: set up .venv, write the bundled digits shards,
# train launch/jobs/digits.yaml (class-conditional 32 px IDDPM,
# about 7 minutes on 2 CPU cores at ~100 img/s). Every stage is announced before it starts, with what it
# costs, so no stretch of the run is silent without an explanation.
# Re-running resumes from runs/digits (delete it to start over). Extra args go to
# launch/train.py, e.g. `bash launch/demo.sh --set train.lr_anneal_steps=1000`.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
stage() { printf '\n[demo %s | %ds] %s\n' "$1" "$((SECONDS - T0))" "$2"; }

if [ -x .venv/bin/python ]; then
  stage 1/3 "checking the Python environment in .venv (a few seconds)"
else
  stage 1/3 "creating .venv and installing CPU torch, DeepSpeed and this package with pip \
(first run only: 2-4 min, pip prints nothing meanwhile)"
fi
bash launch/setup_env.sh
. .venv/bin/activate

if [ -f data/digits/index.json ]; then
  stage 2/3 "data: data/digits already written (delete it to rewrite)"
else
  stage 2/3 "data: writing data/digits shards from scikit-learn's 8x8 digits, upscaled to 32 px (~10 s)"
  python launch/make_shards.py digits --out data/digits
fi

NPROC=${NPROC:-1}
stage 3/3 "training launch/jobs/digits.yaml on $NPROC process(es): start-up ~10 s, then one \
progress line every 25 steps (loss, img/s, eta); pauses ~25 s for each of the 2 sample grids (DDPM, 100 steps) and \
~50 s for the held-out bits/dim at the end"
if [ "$NPROC" -gt 1 ]; then
  deepspeed --num_gpus "$NPROC" --no_local_rank launch/train.py --job launch/jobs/digits.yaml "$@"
else
  python launch/train.py --job launch/jobs/digits.yaml "$@"
fi
stage done "checkpoints in runs/digits/checkpoints, metrics in runs/digits/metrics.jsonl,"
echo "sample grids in runs/digits/samples/ (tensorboard --logdir runs/digits/tb)"
