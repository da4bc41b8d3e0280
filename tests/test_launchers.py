"""launch/train.py under each launcher of the README's "Running on a cluster" section.

The deepspeed launcher with a hostfile (one host: a local launch, no ssh/pdsh, given
--no_ssh_check and --master_addr), torchrun, and the environment plain `srun` gives each
task (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST/SLURM_JOB_ID, no RANK),
set by hand for two processes so that iddpm_ds/dist/env.py's mapping is proven without Slurm.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mp_utils import free_port
from train_utils import ROOT, TRAIN, events, metrics, run_train, tiny_job

pytestmark = pytest.mark.slow

STEPS = 3
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def job_for(tmp_path: Path, shards: Path) -> Path:
    return tiny_job(tmp_path, shards, **{"train.max_steps": STEPS, "train.log_interval": 1})


def clean_env() -> dict[str, str]:
    """The test process's environment without any launcher's or Slurm's rank variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}


def check_trained(proc: subprocess.CompletedProcess, run_dir: Path, world_size: int) -> None:
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    start = events(proc, "train_start")
    assert [s["world_size"] for s in start] == [world_size]
    assert start[0]["global_batch"] == 8 * world_size  # batch_size is per rank in tiny_job
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:07d}"


@pytest.mark.parametrize("select, world_size", [((), 2), (("--include", "localhost:1"), 1)],
                         ids=["all-slots", "include"])
def test_deepspeed_hostfile(tmp_path, digits_shards, select, world_size):
    job = job_for(tmp_path, digits_shards)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "--hostfile", str(hostfile), *select, "--no_ssh_check", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(TRAIN), "--job", str(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=ROOT)
    check_trained(proc, tmp_path / "run", world_size)


def test_torchrun(tmp_path, digits_shards):
    job = job_for(tmp_path, digits_shards)
    proc = run_train(2, job, launcher="torchrun", timeout=300, check=False)
    check_trained(proc, tmp_path / "run", 2)


def slurm_job_id_for_free_port() -> tuple[int, int]:
    """dist/env.py picks MASTER_PORT = 20000 + SLURM_JOB_ID % 20000: choose an id whose port is free."""
    for port in range(20000 + os.getpid() % 19000, 40000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port - 20000 + 1_000_000, port  # a large id, as on a real cluster
    raise RuntimeError("no free port in 20000-39999")


def test_srun_style_environment_without_rank(tmp_path, digits_shards):
    job = job_for(tmp_path, digits_shards)
    job_id, _port = slurm_job_id_for_free_port()
    procs, logs = [], []
    for rank in range(2):
        env = {**clean_env(), "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(job_id)}
        log = open(tmp_path / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(TRAIN), "--job", str(job)], env=env, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    proc = subprocess.CompletedProcess([], max(codes, key=abs), outputs[0], outputs[1])
    check_trained(proc, tmp_path / "run", 2)
    saved = tmp_path / "run" / "checkpoints" / f"step{STEPS:07d}"
    assert sorted(p.name for p in saved.glob("rank*.pt")) == ["rank00000.pt", "rank00001.pt"]


def test_first_slurm_host_without_scontrol():
    from iddpm_ds.dist.env import first_host

    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("node1,node2") == "node1"
    assert first_host("rack[2-3]-n,x") == "rack2-n"
