"""Distributed facts: rank, world size, local rank, device, and rank-0 output.

This is the only module of the package that reads the environment. It understands the
variables set by the deepspeed launcher and torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and, when those are absent, derives them from Slurm's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID), so that
plain `srun python launch/train.py` works without a wrapper.

No silent hangs: every process group waits at most `distributed.collective_timeout_s`,
waits on rank 0's long work at most `distributed.long_wait_timeout_s`, and `session()`
turns a failed or timed-out collective into one error line and COLLECTIVE_FAILED_EXIT.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional, TextIO

import torch
import torch.distributed as torch_dist

from .build_locks import StaleBuildLock, guard_builds, stale_locks
from .placement import Layout, PlacementError, gpu_index, plan_layout, tasks_on_node
from .spec.distributed import DistributedSpec

EXIT_BAD_SETUP = 2         # this machine's set-up (stale build lock, too few GPUs): one line
COLLECTIVE_FAILED_EXIT = 4  # a collective timed out or lost a rank: one line per rank left

_spec = DistributedSpec()
_long_wait_group: Any = None   # gloo group with the long timeout, for waits on rank 0's work
_launcher_local_rank: Optional[int] = None  # LOCAL_RANK before init points it at the device
_device: Optional[torch.device] = None


class CollectiveFailure(RuntimeError):
    """A collective timed out or lost a peer; the message is the one line to print."""


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
    rendezvous) waits at most `spec.collective_timeout_s` for the other ranks. Raises
    PlacementError (no GPU for this rank) before any rank waits on it; from here on, a JIT
    build of a DeepSpeed op that meets a stale lock raises StaleBuildLock (guard_builds).
    """
    global _spec, _long_wait_group
    if torch_dist.is_available() and torch_dist.is_initialized():
        return
    _spec = spec
    map_slurm_env()
    if not launched_distributed():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    _place_on_device()
    _warn_stale_locks()
    prepare_deepspeed()
    import deepspeed  # imported late: it is slow and prints accelerator banners

    _bound_later_groups(collective_timeout())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=collective_timeout())
    if world_size() > 1:  # collective: every rank makes it
        _long_wait_group = torch_dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=spec.long_wait_timeout_s))


def _place_on_device() -> None:
    """Pick this rank's GPU once (PlacementError if it has none) and make DeepSpeed use it:
    DeepSpeed takes LOCAL_RANK as the device index (engine, ZeRO-3 init, NCCL device_id),
    which a per-task GPU binding (each task sees one device, index 0) contradicts."""
    global _launcher_local_rank
    _launcher_local_rank = local_rank()
    index = device().index
    if index is not None:
        torch.cuda.set_device(index)
        os.environ["LOCAL_RANK"] = str(index)


def _bound_later_groups(timeout: datetime.timedelta) -> None:
    """Groups made without a timeout (DeepSpeed's data-parallel clone of the world group,
    for one) get torch's module default, 30 min for gloo (measured), not the job's."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if getattr(distributed_c10d, "default_pg_nccl_timeout", None) is not None:
        distributed_c10d.default_pg_nccl_timeout = timeout


def prepare_deepspeed() -> None:
    """Before DeepSpeed starts its comm backend or builds an op (idempotent): every JIT-build
    wait bounded and stale-aware, and the shm op never built. init() calls it; so does the
    engine builder, for a process group that someone else made (a notebook, the tests),
    where DeepSpeed's own init would otherwise build the shm op and wait on its lock forever."""
    guard_builds(_spec.long_wait_timeout_s)  # a live build is solo work too
    _skip_shm_op()
    if cpu_fp16_seam() and not has_gpu():
        _allow_cpu_fp16()


def _allow_cpu_fp16() -> None:
    """The test seam's one change to DeepSpeed: its CPU accelerator answers that fp16 is
    supported, so the engine's sanity check passes and the real fp16 engine is built."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        accelerator.is_fp16_supported = lambda: True


def _skip_shm_op() -> None:
    """DeepSpeed JIT-builds its CPU shared-memory op at init (~1 min the first time, and a
    stale lock if killed meanwhile), for tensor-parallel inference only: training and
    sampling here never call it. DeepSpeed keeps one compatibility dict for edits."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":  # the only accelerator that builds it
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _warn_stale_locks() -> None:
    """A stale lock stops only a run that loads its op (guard_builds); say so for the others,
    once per node, so that the lock is removed before a job that needs the op meets it."""
    if local_rank() != 0:
        return
    for lock in stale_locks(extensions_dir()):
        write_line(f"warning: stale build lock {lock} (DeepSpeed's {lock.parent.name} op; this job "
                   f"does not load it): a job that loads it would stop; remove it (rm {lock})")


def extensions_dir() -> Path:
    """Where torch builds this environment's JIT extensions (one folder per op)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accelerator = "cu" + torch.version.cuda.replace(".", "")
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def collective_timeout() -> datetime.timedelta:
    """The job's collective timeout; pass it to every process group made after init."""
    return datetime.timedelta(seconds=_spec.collective_timeout_s)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else _env_int("RANK", _env_int("SLURM_PROCID", 0))


def world_size() -> int:
    if is_initialized():
        return torch_dist.get_world_size()
    return _env_int("WORLD_SIZE", _env_int("SLURM_NTASKS", 1))


def local_rank() -> int:
    """This rank's index on its node, as the launcher set it."""
    if _launcher_local_rank is not None:
        return _launcher_local_rank
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


def _visible_gpus() -> tuple[Optional[str], int]:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return os.environ.get("CUDA_VISIBLE_DEVICES"), count


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's device (see iddpm_ds.placement); PlacementError if it has no GPU of its own."""
    global _device
    if _device is None:
        visible, count = _visible_gpus()
        index = gpu_index(local_rank(), local_world_size(), visible, count)
        _device = torch.device("cpu") if index is None else torch.device("cuda", index)
    return _device


def layout(world: Optional[int] = None) -> Layout:
    """Nodes, ranks per node and each local rank's device, for --check (PlacementError too)."""
    world = world or world_size()
    per_node = local_world_size() if launched_distributed() else None
    nodes = num_nodes() if launched_distributed() else None
    visible, count = _visible_gpus()
    return plan_layout(world, nodes, per_node, visible, count)


def has_gpu() -> bool:
    return torch.cuda.is_available()


# The CPU fp16 test seam. DeepSpeed's CPU accelerator refuses fp16 (is_fp16_supported() is
# False without AVX-512-FP16), yet its fp16 engine, optimizers and loss scaler run on CPU
# (torch has CPU half kernels). With this variable set to 1 a process without a GPU builds
# that real engine, so tests and the GPU check's dry run exercise the fp16 path on CPU.
# Never for production: CPU half is slow and only some of its kernels are exact.
CPU_FP16_SEAM = "IDDPM_CPU_FP16"


def cpu_fp16_seam() -> bool:
    """True when the CPU fp16 test seam is on (see CPU_FP16_SEAM)."""
    return os.environ.get(CPU_FP16_SEAM) == "1"


def fp16_capable() -> bool:
    """Whether this process may train in fp16: a GPU, or the CPU test seam."""
    return has_gpu() or cpu_fp16_seam()


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def wait_for_main(what: str) -> None:
    """A barrier at which the others wait for rank 0's long solo work (`what`: checkpoint
    exports, a sample grid, a checkpoint conversion): bounded by long_wait_timeout_s, not
    by the collective timeout, which such work may legitimately exceed."""
    if _long_wait_group is None:  # one rank, or a group made outside init()
        barrier()
        return
    with _long_wait(what):
        torch_dist.barrier(group=_long_wait_group)


def gather_after_long_work(obj: Any, what: str) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank: wait_for_main that also
    carries each rank's outcome of `what` (e.g. its failed checkpoint write), same bound."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    with _long_wait(what):
        torch_dist.all_gather_object(out, obj, group=_long_wait_group)
    return out


@contextlib.contextmanager
def _long_wait(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:
        if not is_group_failure(err):
            raise
        raise CollectiveFailure(
            f"rank {rank()}: waiting for rank 0 to finish {what} failed: {_reason(err)}; "
            f"if rank 0 is still working, raise distributed.long_wait_timeout_s "
            f"(now {_spec.long_wait_timeout_s})") from err


def shutdown() -> None:
    """Barrier then destroy the group: without it ~1 run in 10 aborts at exit (gloo)."""
    if is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


@contextlib.contextmanager
def session(spec: DistributedSpec) -> Iterator[None]:
    """init(spec) ... shutdown() around a program, with its distributed failures as one line:
    a rank without a GPU or a stale build lock exits EXIT_BAD_SETUP; a collective that times
    out or loses a rank exits COLLECTIVE_FAILED_EXIT at once (no shutdown barrier: the group
    is broken, and waiting on it would hang again)."""
    try:
        init(spec)
        yield
        shutdown()
    except (PlacementError, StaleBuildLock) as err:
        _bad_setup(err)
    except RuntimeError as err:
        stale = _stale_lock_cause(err)  # DeepSpeed re-raises a failed op load as its own error
        if stale is not None:
            _bad_setup(stale)
        if not isinstance(err, CollectiveFailure) and not is_group_failure(err):
            raise
        error_line(str(err) if isinstance(err, CollectiveFailure) else describe_failure(err))
        raise SystemExit(COLLECTIVE_FAILED_EXIT) from None


def _bad_setup(err: BaseException) -> NoReturn:
    if local_rank() == 0:  # every rank of the node sees the same problem
        error_line(str(err))
    raise SystemExit(EXIT_BAD_SETUP) from None


def _stale_lock_cause(err: BaseException) -> Optional[StaleBuildLock]:
    seen: Optional[BaseException] = err
    while seen is not None:
        if isinstance(seen, StaleBuildLock):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def write_line(text: str, stream: Optional[TextIO] = None) -> None:
    """One line in one write call. Ranks of a node share the launcher's pipe, and print()
    writes the text and its newline separately, so two ranks' lines could fuse into one;
    a single write of under PIPE_BUF bytes reaches the pipe whole."""
    stream = sys.stderr if stream is None else stream
    stream.write(text + "\n")
    stream.flush()


def error_line(message: str) -> None:
    """The one-line `error: ...` a user reads (this rank's; callers gate by rank)."""
    write_line(f"error: {message}")


def error0(message: str) -> None:
    """error_line on rank 0 only: for errors every rank meets alike (a bad input or job)."""
    if is_main():
        error_line(message)


def is_group_failure(err: BaseException) -> bool:
    """True for a collective that timed out or lost a peer: torch's DistError family, and
    the plain RuntimeError that gloo raises (its message names its gloo source file)."""
    return isinstance(err, torch_dist.DistError) or (
        isinstance(err, RuntimeError) and "gloo/" in str(err))


def _reason(err: BaseException) -> str:
    text = str(err)
    if re.search(r"timed? ?out", text, re.IGNORECASE):
        return "timed out"
    lines = [line for line in text.splitlines() if line.strip()] or [type(err).__name__]
    return "lost its connection to another rank (" + re.sub(r"^\[[^\]]*\] ", "", lines[0])[:160] + ")"


def describe_failure(err: BaseException) -> str:
    """One line for a failed collective: this rank, the operation and where it was called
    (when the traceback shows them), what happened, and the field that bounds the wait."""
    op, where = _failed_call(err)
    call = (op or "a collective") + (f" at {where}" if where else "")
    if _reason(err) == "timed out":
        return (f"rank {rank()}: {call} waited longer than distributed.collective_timeout_s="
                f"{_spec.collective_timeout_s} s for the other ranks: another rank stopped or died "
                f"(see its log); raise distributed.collective_timeout_s if such a wait is expected")
    return f"rank {rank()}: {call} {_reason(err)}: that rank died or was killed (see its log)"


def _failed_call(err: BaseException) -> tuple[Optional[str], Optional[str]]:
    """The torch.distributed function that failed and the innermost call site in this repo."""
    op = where = None
    repo = Path(__file__).resolve().parents[1]
    for frame, lineno in traceback.walk_tb(err.__traceback__):
        path = frame.f_code.co_filename
        if op is None and path.endswith("distributed_c10d.py"):
            op = frame.f_code.co_name
        if path.startswith(str(repo)) and "site-packages" not in path and path != __file__:
            where = f"{os.path.relpath(path, repo)}:{lineno} ({frame.f_code.co_name})"
    return op, where


def print0(text: str) -> None:
    """One console line on rank 0 only; the single gate for rank-dependent console output."""
    if is_main():
        write_line(text, sys.stdout)


def log0(event: str, **fields: Any) -> None:
    """One structured (JSON) log line on rank 0: {"event": ..., "time": ..., **fields}."""
    if is_main():
        log(event, **fields)


def log(event: str, **fields: Any) -> None:
    """One structured log line from this rank (use for per-rank warnings/errors)."""
    record = {"event": event, "time": round(time.time(), 3), "rank": rank(), **fields}
    write_line(json.dumps(record, default=str))


def slurm_facts() -> dict[str, str]:
    """Slurm job facts worth logging and using for requeue decisions."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
    return {k: os.environ[k] for k in keys if k in os.environ}
