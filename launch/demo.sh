#!/usr/bin/env bash
# Fresh machine -> a trained demo model: set up .venv, write the bundled digits shards,
# train launch/jobs/digits.yaml (class-conditional 32 px IDDPM, a few minutes on CPU).
# Re-running resumes from runs/digits (delete it to start over). Extra args go to
# launch/train.py, e.g. `bash launch/demo.sh --set train.lr_anneal_steps=1000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
if [ ! -f data/digits/index.json ]; then
  python launch/make_shards.py digits --out data/digits
fi
NPROC=${NPROC:-1}
if [ "$NPROC" -gt 1 ]; then
  deepspeed --num_gpus "$NPROC" --no_local_rank launch/train.py --job launch/jobs/digits.yaml "$@"
else
  python launch/train.py --job launch/jobs/digits.yaml "$@"
fi
echo "demo done: checkpoints in runs/digits/checkpoints, metrics in runs/digits/metrics.jsonl,"
echo "sample grids in runs/digits/samples/ (tensorboard --logdir runs/digits/tb)"
