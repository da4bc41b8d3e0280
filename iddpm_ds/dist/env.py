"""The launcher's facts: rank, world size, place on the node, and Slurm's equivalents.

The only module of iddpm_ds that reads (or writes) the environment. It understands the
variables set by the deepspeed launcher and torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and, when those are absent, derives them from Slurm's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID), so that
plain `srun python launch/train.py` works without a wrapper. It also reads the variables
that steer the rest of the package: CUDA_VISIBLE_DEVICES (placement), TORCH_EXTENSIONS_DIR
(build locks) and the CPU fp16 test seam.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from typing import Optional

import torch.distributed as torch_dist

from . import state

# The CPU fp16 test seam. DeepSpeed's CPU accelerator refuses fp16 (is_fp16_supported() is
# False without AVX-512-FP16), yet its fp16 engine, optimizers and loss scaler run on CPU
# (torch has CPU half kernels). With this variable set to 1 a process without a GPU builds
# that real engine, so tests and the GPU check's dry run exercise the fp16 path on CPU.
# Never for production: CPU half is slow and only some of its kernels are exact.
CPU_FP16_SEAM = "IDDPM_CPU_FP16"


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


def tasks_on_node(tasks_per_node: str, node_id: int) -> Optional[int]:
    """Slurm's compressed per-node task counts ("4(x2),3") -> the count on node `node_id`."""
    node = 0
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", tasks_per_node):
        node += int(repeat or 1)
        if node_id < node:
            return int(count)
    return None


def launched_distributed() -> bool:
    """True when a launcher (deepspeed, torchrun, srun) started this process."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def launch_alone() -> None:
    """A process no launcher started: the variables of a one-rank job on a free local port,
    so that the rest of the code never branches on "distributed or not"."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_local_rank(value: int) -> None:
    """Point LOCAL_RANK at `value`: DeepSpeed takes LOCAL_RANK as the device index (engine,
    ZeRO-3 init, NCCL device_id), so init sets it to the device's and shutdown restores it."""
    os.environ["LOCAL_RANK"] = str(value)


def _group_up() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    """This process's rank: the group's once there is one, else the launcher's."""
    return torch_dist.get_rank() if _group_up() else _env_int("RANK", _env_int("SLURM_PROCID", 0))


def world_size() -> int:
    """Ranks in the job: the group's once there is one, else the launcher's."""
    if _group_up():
        return torch_dist.get_world_size()
    return _env_int("WORLD_SIZE", _env_int("SLURM_NTASKS", 1))


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    """This rank's index on its node, as the launcher set it (also after init re-pointed
    LOCAL_RANK at the device index: the state remembers the launcher's value)."""
    current = state.current()
    if current is not None:
        return current.launcher_local_rank
    return _env_int("LOCAL_RANK", _env_int("SLURM_LOCALID", 0))


def local_world_size() -> Optional[int]:
    """Ranks on this node, where the launcher says (torchrun, deepspeed, srun)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun, deepspeed launcher
        if os.environ.get(name):
            return int(os.environ[name])
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if "SLURM_PROCID" in os.environ and per_node:
        return tasks_on_node(per_node, _env_int("SLURM_NODEID", 0))
    return None


def num_nodes() -> Optional[int]:
    """Nodes of the job, where the launcher says."""
    for name in ("CROSS_SIZE", "GROUP_WORLD_SIZE"):  # deepspeed launcher, torchrun
        if os.environ.get(name):
            return int(os.environ[name])
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return max(1, world_size() // int(os.environ["LOCAL_WORLD_SIZE"]))
    if "SLURM_PROCID" in os.environ:
        for name in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
            if os.environ.get(name):
                return int(os.environ[name])
    return None


def slurm_facts() -> dict[str, str]:
    """Slurm job facts worth logging and using for requeue decisions."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
    return {k: os.environ[k] for k in keys if k in os.environ}


def visible_devices() -> Optional[str]:
    """CUDA_VISIBLE_DEVICES as set (None when unset): tells a per-task GPU binding apart."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def extensions_dir_override() -> Optional[str]:
    """TORCH_EXTENSIONS_DIR when set: where torch builds JIT extensions instead of its default."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or None


def cpu_fp16_seam() -> bool:
    """True when the CPU fp16 test seam is on (see CPU_FP16_SEAM)."""
    return os.environ.get(CPU_FP16_SEAM) == "1"
