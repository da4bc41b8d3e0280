"""Distributed facts: rank, world size, local rank, device, and rank-0 output.

This is the only module of the package that reads the environment. It understands the
variables set by the deepspeed launcher and torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and, when those are absent, derives them from Slurm's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID), so that
plain `srun python launch/train.py` works without a wrapper.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch
import torch.distributed as torch_dist

from .spec.distributed import DistributedSpec

# the job's collective timeout, kept for groups made after init (they default to torch's 30 min)
_timeout = datetime.timedelta(seconds=DistributedSpec().collective_timeout_s)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def map_slurm_env() -> bool:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM_* if missing.

    DeepSpeed asserts LOCAL_RANK is set and otherwise tries MPI discovery, so all five
    are mapped together (measured: mapping fewer fails). Returns True when it mapped.
    """
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return False
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host()
    if "MASTER_PORT" not in os.environ:
        job_id = _env_int("SLURM_JOB_ID", 0)
        os.environ["MASTER_PORT"] = str(20000 + job_id % 20000)
    return True


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return first_host(nodelist)


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list without scontrol: "gpu[07-09,12],cpu1" -> "gpu07"."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    ranges, tail = rest.split("]", 1)
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + tail.split(",")[0]


def launched_distributed() -> bool:
    """True when a launcher (deepspeed, torchrun, srun) started this process."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def init(spec: DistributedSpec = DistributedSpec()) -> None:
    """Initialise torch.distributed (through DeepSpeed) once; single process works too.

    A lone process gets a one-rank gloo/nccl group on a free local port, so the rest of
    the code never branches on "distributed or not". Every collective (and the start-up
    rendezvous) waits at most `spec.collective_timeout_s` for the other ranks.
    """
    global _timeout
    if torch_dist.is_available() and torch_dist.is_initialized():
        return
    _timeout = datetime.timedelta(seconds=spec.collective_timeout_s)
    map_slurm_env()
    if not launched_distributed():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed  # imported late: it is slow and prints accelerator banners

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=_timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


def collective_timeout() -> datetime.timedelta:
    """The job's collective timeout; pass it to every process group made after init."""
    return _timeout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else _env_int("RANK", 0)


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", _env_int("SLURM_LOCALID", 0))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def has_gpu() -> bool:
    return torch.cuda.is_available()


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def shutdown() -> None:
    """Barrier then destroy the group: without it ~1 run in 10 aborts at exit (gloo)."""
    if is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only; the single gate for rank-dependent console output."""
    if is_main():
        print(*args, **kwargs, flush=True)


def log0(event: str, **fields: Any) -> None:
    """One structured (JSON) log line on rank 0: {"event": ..., "time": ..., **fields}."""
    if is_main():
        log(event, **fields)


def log(event: str, **fields: Any) -> None:
    """One structured log line from this rank (use for per-rank warnings/errors)."""
    record = {"event": event, "time": round(time.time(), 3), "rank": rank(), **fields}
    print(json.dumps(record, default=str), file=sys.stderr, flush=True)


def slurm_facts() -> dict[str, str]:
    """Slurm job facts worth logging and using for requeue decisions."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
    return {k: os.environ[k] for k in keys if k in os.environ}
