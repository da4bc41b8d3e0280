#!/usr/bin/env bash
# Chain of time-limited segments: submit N copies of train.sbatch, each starting after the
# previous one ends (--dependency=afterany:PREV), all training the same job into the same
# run dir, so each segment resumes from the newest complete checkpoint.
#
#   launch/slurm/chain.sh --segments N [--after JOBID] [sbatch options ...] -- JOB.yaml [--set k=v ...]
#   e.g. launch/slurm/chain.sh --segments 4 --time=04:00:00 -N 2 --ntasks-per-node=8 --gpus-per-node=8 \
#            -- jobs/cifar.yaml --set output.run_dir=runs/cifar
#
# A segment that reaches its time limit gets SIGUSR1 120 s before it (train.sbatch's
# --signal=B:USR1@120), checkpoints and exits 75; chained segments are not requeued
# (IDDPM_REQUEUE=0) because the next segment continues the run. The run ends when the job's
# train.max_steps (or lr_anneal_steps) is reached: a segment that starts after that
# resumes, finds nothing left to train and exits at once, so over-provisioning segments
# costs seconds. `afterany` also continues after a crashed segment (from its last
# checkpoint); cancel the remaining segments with `scancel` if you do not want that.
# --after JOBID hangs the first segment on an already submitted job (extend a chain).
# Every option before -- other than --segments/--after goes to sbatch (-n is sbatch's
# --ntasks). Prints the submitted job ids, one per line.
set -euo pipefail

usage() {
    echo "usage: $0 --segments N [--after JOBID] [sbatch options ...] -- JOB.yaml [--set key=value ...]" >&2
    exit 2
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
segments=""
after=""
sbatch_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --segments) segments=${2:-}; shift 2 ;;
        --segments=*) segments=${1#*=}; shift ;;
        --after) after=${2:-}; shift 2 ;;
        --after=*) after=${1#*=}; shift ;;
        --) shift; break ;;
        *) sbatch_args+=("$1"); shift ;;
    esac
done
[ $# -ge 1 ] || usage
case $segments in ''|*[!0-9]*|0) usage ;; esac

export IDDPM_REQUEUE=0  # sbatch exports the environment: segments end, the next continues
prev=$after
for ((i = 0; i < segments; i++)); do
    dep=()
    [ -n "$prev" ] && dep=(--dependency="afterany:$prev")
    prev=$(sbatch --parsable --job-name="${IDDPM_CHAIN_NAME:-iddpm-chain}" ${dep[@]+"${dep[@]}"} \
        ${sbatch_args[@]+"${sbatch_args[@]}"} "$here/train.sbatch" "$@")
    prev=${prev%%;*}  # --parsable prints "id[;cluster]"
    echo "$prev"
    echo "[chain.sh] segment $((i + 1))/$segments: job $prev${dep[0]:+ (${dep[0]#--})}" >&2
done
