#!/usr/bin/env bash
# The test command (README): set up the venv if needed, say what this machine cannot run
# (and why), then run the whole suite, multi-process, Slurm and multi-host tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu

# What will skip here, said before the run (pytest -ra repeats each skip with its reason).
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
echo "[test.sh] machine check (a missing item below means those tests skip, never silently):"
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "[test.sh]   GPU: present; the GPU-only tests run"
else
    echo "[test.sh]   GPU: none; the GPU-only tests skip (CUDA streams, NCCL; fp16 runs on CPU through the IDDPM_CPU_FP16 test seam; run bench/gpu_check.sh on a GPU machine)"
fi
if have slurmctld && have slurmd && have sbatch && have munged; then
    echo "[test.sh]   Slurm: installed; the Slurm tests start a private cluster and run"
else
    echo "[test.sh]   Slurm: not installed; the Slurm tests skip (bash .ci/run installs slurmctld slurmd slurm-client munge)"
fi
if [ "$(id -u)" -eq 0 ] && have ip && have sshd && have pdsh; then
    echo "[test.sh]   multi-host: root, ip, sshd and pdsh present; network-namespace hosts run"
else
    echo "[test.sh]   multi-host: needs root, iproute2, openssh-server and pdsh; the multi-host tests skip (bash .ci/run installs them)"
fi
exec python -m pytest -q -n 3 --dist loadgroup --durations=30 "$@"
