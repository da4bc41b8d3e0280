"""No silent hangs, with real processes: a stopped rank, a missing rank, rank 0's long solo
work, DeepSpeed's own process groups, and a stale JIT build lock left by a kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from mp_utils import free_port
from test_preemption import _finish, _logged_step, _ranks, _wait_for, start  # noqa: F401 (fixture)
from train_utils import ROOT, TRAIN, tiny_job, train_cmd

from iddpm_ds.dist.failures import COLLECTIVE_FAILED_EXIT  # 4: distinct from divergence (3)


def _error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_stopped_rank_ends_the_job_with_one_line(tmp_path, digits_shards, start):
    """SIGSTOP one rank mid-training: the other exits within the timeout with one line, not
    after torch's 30 minutes (which the hang guard of _finish would hit first)."""
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 100_000, "train.log_interval": 2,
                                               "distributed": {"collective_timeout_s": 15}})
    proc = start(job)
    _wait_for(lambda: _logged_step(tmp_path / "run") >= 4, timeout=240)
    ranks = _wait_for(lambda: _ranks(proc), timeout=10)
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGSTOP)
    code, out = _finish(proc, timeout=300)
    assert code == COLLECTIVE_FAILED_EXIT, out[-4000:]
    errors = _error_lines(out)
    assert len(errors) == 1, out[-4000:]
    assert errors[0].startswith("error: rank 0: ")
    assert "distributed.collective_timeout_s=15 s" in errors[0]
    assert "Traceback" not in out


@pytest.mark.slow
def test_rank_that_never_starts_ends_the_rendezvous_with_one_line(tmp_path, digits_shards):
    """Rank 1 of 2 never starts: rank 0's start-up wait is bounded by the same timeout."""
    job = tiny_job(tmp_path, digits_shards, **{"distributed": {"collective_timeout_s": 10}})
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(TRAIN), "--job", str(job)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == COLLECTIVE_FAILED_EXIT, proc.stderr[-4000:]
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "rank 0: " in errors[0], proc.stderr[-4000:]
    assert "collective_timeout_s=10" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------- in-process checks, 2 ranks
def _spawned(rank: int, world_size: int, port: int, fn, args: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                      TORCH_EXTENSIONS_DIR=str(Path(out) / "extensions"))  # not the shared cache
    result = fn(rank, *args)
    Path(out, f"rank{rank}.txt").write_text(repr(result))


def _run_two(fn, *args) -> list[object]:
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_spawned, args=(2, free_port(), fn, args, out), nprocs=2, join=True,
                           start_method="spawn")
        return [eval(Path(out, f"rank{r}.txt").read_text()) for r in range(2)]


def _group_timeouts(rank: int, job_path: str) -> list[float]:
    import torch
    from torch.distributed import distributed_c10d

    from iddpm_ds.dist import group
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.engine import build_engine
    from iddpm_ds.train.preempt import PreemptionWatch

    job = load_job(job_path)
    group.init(job.distributed)
    build_engine(job)                      # DeepSpeed makes its own groups here
    watch = PreemptionWatch(1)
    groups = list(distributed_c10d._world.pg_map)
    seconds = [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups]
    watch.restore()
    group.shutdown()
    return seconds


@pytest.mark.slow
def test_every_process_group_carries_the_job_timeouts(tmp_path, digits_shards):
    """The world group, DeepSpeed's groups (made without a timeout: torch's default 30 min
    unless group.init bounds it) and the long-wait group all carry the job's values."""
    job = tiny_job(tmp_path, digits_shards, **{"distributed": {"collective_timeout_s": 77,
                                                               "long_wait_timeout_s": 999}})
    for seconds in _run_two(_group_timeouts, str(job)):
        assert len(seconds) >= 3, seconds            # world, long-wait, DeepSpeed's clone
        assert sorted(set(seconds)) == [77.0, 999.0], seconds
        assert seconds.count(999.0) == 1


def _rank0_works(rank: int, work_s: float, collective_s: int, long_s: int) -> str:
    from iddpm_ds.dist import failures, group
    from iddpm_ds.spec.distributed import DistributedSpec

    group.init(DistributedSpec(collective_timeout_s=collective_s, long_wait_timeout_s=long_s))
    if rank == 0:
        time.sleep(work_s)  # rank 0's solo work (a conversion, an export, a grid)
    try:
        group.wait_for_main("the test's work")
        outcome = "ok"
    except failures.CollectiveFailure as err:
        outcome = str(err)
    if outcome == "ok":
        group.shutdown()
    return outcome


@pytest.mark.slow
def test_long_solo_work_on_rank0_is_not_a_collective_timeout():
    """Rank 0 works 3x the collective timeout: the others wait (long_wait_timeout_s)."""
    assert _run_two(_rank0_works, 6.0, 2, 120) == ["ok", "ok"]


@pytest.mark.slow
def test_long_solo_work_past_its_own_bound_ends_with_the_field_name():
    outcomes = _run_two(_rank0_works, 5.0, 60, 2)  # rank 0 works 2.5x the 2 s bound
    assert outcomes[0] == "ok" or "long_wait_timeout_s" in outcomes[0]
    assert outcomes[1].startswith("rank 1: waiting for rank 0 to finish the test's work failed: "
                                  "timed out"), outcomes[1]
    assert "raise distributed.long_wait_timeout_s (now 2)" in outcomes[1]


# ------------------------------------------------------------- stale JIT build lock
def _build_op(builder: str, extensions: Path) -> subprocess.Popen:
    code = ("from deepspeed.accelerator import get_accelerator; "
            f"get_accelerator().create_op_builder({builder!r}).load()")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the builder and its compilers
    except ProcessLookupError:
        pass
    proc.wait()


def _killed_build(builder: str, op: str, extensions: Path) -> Path:
    """kill -9 DeepSpeed's JIT build of an op (in a private extensions folder): the lock
    stays, and a later plain builder waits for it forever (the hang being guarded against)."""
    lock = extensions / op / "lock"
    first = _build_op(builder, extensions)
    try:
        _wait_for(lock.exists, timeout=120, poll=0.05)
    finally:
        _kill(first)
    assert lock.exists()
    second = _build_op(builder, extensions)
    try:
        with pytest.raises(subprocess.TimeoutExpired):  # 10 s: 3x its imports; a real build takes minutes
            second.wait(timeout=10)
    finally:
        _kill(second)
    return lock


def _train_with(extensions: Path, job: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "OMP_NUM_THREADS": "1"}
    return subprocess.run(train_cmd(1, "--job", str(job), launcher="python"), capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_build_killed_mid_way_stops_a_job_that_loads_the_op_with_one_line(tmp_path, digits_shards):
    """optimizer offload loads cpu_adam: a stale lock on it exits 2 naming the file and the fix."""
    extensions = tmp_path / "torch_extensions"
    lock = _killed_build("CPUAdamBuilder", "cpu_adam", extensions)
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 1, "deepspeed.zero_stage": 1,
                                               "deepspeed.offload_optimizer": True})
    proc = _train_with(extensions, job)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and f"stale build lock {lock}" in errors[0], proc.stderr[-4000:]
    assert f"rm {lock}" in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_stale_lock_of_an_op_the_job_never_loads_is_a_warning(tmp_path, digits_shards):
    """The CPU shm op is not built by training: its stale lock must not stop a job (a CI
    machine whose cache held one failed every training test), only be named for removal."""
    extensions = tmp_path / "torch_extensions"
    lock = _killed_build("ShareMemCommBuilder", "deepspeed_shm_comm", extensions)
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 1})
    proc = _train_with(extensions, job)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"warning: stale build lock {lock}" in proc.stderr and f"rm {lock}" in proc.stderr
    assert lock.exists()  # not ours to remove: another process's build may own the folder


@pytest.mark.slow
def test_engine_in_a_group_made_elsewhere_never_waits_on_the_shm_lock(tmp_path, digits_shards):
    """A process group made outside group.init (a notebook, a test harness) and a stale
    deepspeed_shm_comm lock: DeepSpeed's own comm init would build that op and wait on the
    lock forever (it hung the last CI run 600 s per test); build_engine skips the op."""
    extensions = tmp_path / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()  # what a builder killed mid-build leaves: nobody holds it
    job = tiny_job(tmp_path, digits_shards)
    code = ("import torch.distributed as td; "
            "td.init_process_group('gloo', rank=0, world_size=1); "
            "from iddpm_ds.spec.job import load_job; from iddpm_ds.train.engine import build_engine; "
            "build_engine(load_job(%r)); td.destroy_process_group(); print('engine built')"
            % str(job))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "engine built" in proc.stdout, proc.stderr[-3000:]
    assert lock.exists()


def test_lock_held_open_is_live_and_an_orphan_is_stale(tmp_path):
    from iddpm_ds.build_locks import StaleBuildLock, is_stale, stale_locks, wait_for_lock

    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # what torch's FileBaton does while building
    try:
        assert not is_stale(lock, recheck_s=0.1)
        with pytest.raises(StaleBuildLock, match="still running after 1 s"):
            wait_for_lock(lock, timeout_s=1, poll_s=0.2)
        assert stale_locks(tmp_path) == []
    finally:
        os.close(fd)  # the builder died: nobody holds it now
    assert is_stale(lock, recheck_s=0.1)
    assert stale_locks(tmp_path) == [lock]
    with pytest.raises(StaleBuildLock, match=f"stale build lock {lock}.*rm {lock}"):
        wait_for_lock(lock, timeout_s=60)
    lock.unlink()
    wait_for_lock(lock, timeout_s=1)  # nothing left to wait for


_WRITER = """
import sys
from iddpm_ds.dist import output
tag, n = sys.argv[1], int(sys.argv[2])
message = f"rank {tag}: all_reduce at x.py:1 (f) lost its connection to another rank " + "x" * 300
for _ in range(n):
    {call}
"""


@pytest.mark.parametrize("call", ["output.error_line(message)",
                                  "output.log('collective_failed', detail=message)"])
def test_ranks_sharing_the_launchers_pipe_never_fuse_their_lines(call):
    """Ranks of a node write to one pipe (the launcher's, then pdsh's per line). print() writes
    the text and its newline in two calls, so two ranks' errors once fused into one line
    under a multi-host failure; every line must arrive whole."""
    code = _WRITER.replace("{call}", call)
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-u", "-c", code, str(tag), "6000"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=write) for tag in (0, 1)]
    os.close(write)
    with os.fdopen(read, "r") as pipe:
        lines = pipe.read().splitlines()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert len(lines) == 12000
    tail = "x" * 300 + ('"}' if "log" in call else "")
    fused = [line for line in lines if line.count("lost its") != 1 or not line.endswith(tail)]
    assert not fused, fused[0]
