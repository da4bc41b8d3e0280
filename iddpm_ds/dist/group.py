"""The process group: made once (init), ended once (shutdown), every wait on it bounded.

No silent hangs: every process group waits at most `distributed.collective_timeout_s`,
waits on rank 0's long work at most `distributed.long_wait_timeout_s`, and `session()`
turns a failed or timed-out collective into one error line and COLLECTIVE_FAILED_EXIT
(see dist.failures).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
from typing import Any, Iterator, NoReturn

import torch
import torch.distributed as torch_dist

from ..build_locks import StaleBuildLock, prepare_deepspeed, warn_stale_locks
from ..placement import PlacementError, place_on_device
from ..spec.distributed import DistributedSpec
from . import env, state
from .failures import (COLLECTIVE_FAILED_EXIT, EXIT_BAD_SETUP, CollectiveFailure, describe_failure,
                       is_group_failure, reason, stale_lock_cause)
from .output import error_line


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def init(spec: DistributedSpec = DistributedSpec()) -> None:
    """Initialise torch.distributed (through DeepSpeed) once; single process works too.

    A lone process gets a one-rank gloo/nccl group on a free local port, so the rest of
    the code never branches on "distributed or not". Every collective (and the start-up
    rendezvous) waits at most `spec.collective_timeout_s` for the other ranks. Raises
    PlacementError (no GPU for this rank) before any rank waits on it; from here on, a JIT
    build of a DeepSpeed op that meets a stale lock raises StaleBuildLock (guard_builds).
    The state is published before the rendezvous, so that a failure in it is described
    with the job's timeouts, and completed with the long-wait group once that exists.
    """
    if is_initialized():  # a second init, or a group made elsewhere: leave it as it is
        return
    env.map_slurm_env()
    if not env.launched_distributed():
        env.launch_alone()
    launcher_local_rank = env.local_rank()
    device = place_on_device(launcher_local_rank)
    state.SLOT.state = state.DistState(spec, launcher_local_rank, device)
    warn_stale_locks()  # reads the launcher's local rank from the state just made
    prepare_deepspeed()
    import deepspeed  # imported late: it is slow and prints accelerator banners

    _bound_later_groups(collective_timeout())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=collective_timeout())
    if env.world_size() > 1:  # collective: every rank makes it
        group = torch_dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=spec.long_wait_timeout_s))
        state.SLOT.state = dataclasses.replace(state.SLOT.state, long_wait_group=group)


def _bound_later_groups(timeout: datetime.timedelta) -> None:
    """Groups made without a timeout (DeepSpeed's data-parallel clone of the world group,
    for one) get torch's module default, 30 min for gloo (measured), not the job's."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if getattr(distributed_c10d, "default_pg_nccl_timeout", None) is not None:
        distributed_c10d.default_pg_nccl_timeout = timeout


def collective_timeout() -> datetime.timedelta:
    """The job's collective timeout; pass it to every process group made after init."""
    return datetime.timedelta(seconds=state.job_spec().collective_timeout_s)


def shutdown() -> None:
    """Barrier then destroy the group: without it ~1 run in 10 aborts at exit (gloo). Then
    forget the state and give LOCAL_RANK back its launcher value, so a later init starts
    from the launcher's facts again."""
    if is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    current = state.current()
    if current is not None:
        env.set_local_rank(current.launcher_local_rank)
        state.SLOT.state = None


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
        stale = stale_lock_cause(err)  # DeepSpeed re-raises a failed op load as its own error
        if stale is not None:
            _bad_setup(stale)
        if not isinstance(err, CollectiveFailure) and not is_group_failure(err):
            raise
        error_line(str(err) if isinstance(err, CollectiveFailure) else describe_failure(err))
        _exit_now(COLLECTIVE_FAILED_EXIT)


def _exit_now(status: int) -> NoReturn:
    """Exit without Python's finalization. A broken gloo group's threads abort the process
    from their destructors ("terminate called without an active exception": status -6,
    not 4; measured on one of two survivors of a host death), and an elastic agent or a
    script reads the status."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _bad_setup(err: BaseException) -> NoReturn:
    if env.local_rank() == 0:  # every rank of the node sees the same problem
        error_line(str(err))
    raise SystemExit(EXIT_BAD_SETUP) from None


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def wait_for_main(what: str) -> None:
    """A barrier at which the others wait for rank 0's long solo work (`what`: checkpoint
    exports, a sample grid, a checkpoint conversion): bounded by long_wait_timeout_s, not
    by the collective timeout, which such work may legitimately exceed."""
    group = _long_wait_group()
    if group is None:  # one rank, or a group made outside init()
        barrier()
        return
    with _long_wait(what):
        torch_dist.barrier(group=group)


def gather_after_long_work(obj: Any, what: str) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank: wait_for_main that also
    carries each rank's outcome of `what` (e.g. its failed checkpoint write), same bound."""
    if not is_initialized() or env.world_size() == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size()
    with _long_wait(what):
        torch_dist.all_gather_object(out, obj, group=_long_wait_group())
    return out


def _long_wait_group() -> Any:
    current = state.current()
    return current.long_wait_group if current is not None else None


@contextlib.contextmanager
def _long_wait(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:
        if not is_group_failure(err):
            raise
        raise CollectiveFailure(
            f"rank {env.rank()}: waiting for rank 0 to finish {what} failed: {reason(err)}; "
            f"if rank 0 is still working, raise distributed.long_wait_timeout_s "
            f"(now {state.job_spec().long_wait_timeout_s})") from err
