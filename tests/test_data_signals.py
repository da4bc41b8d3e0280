"""Loader workers under Slurm's SIGTERM.

`scancel JOBID` and a node drain send SIGTERM to every process of the step, the loader
workers included. torch's own worker handler dies on any SIGTERM its rank did not send,
and the rank's SIGCHLD handler then raises "DataLoader worker ... killed by signal" in the
middle of the step, so the rank crashed before it could reach the agreed stop and save.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from iddpm_ds.data import build_train_stream
from iddpm_ds.spec.data import DataSpec
from test_data_helpers import id_shards

pytestmark = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="no sigwaitinfo")


def _workers(before: set[int]) -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if p.pid not in before]


def _stream(tmp_path: Path):
    spec = DataSpec(shards=id_shards(tmp_path, [13, 9, 20]), num_workers=2, shuffle_buffer=8)
    return build_train_stream(spec, image_size=8, class_cond=True, batch_size=3, rank=0,
                              world_size=1, seed=0)


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> float:
    start = time.monotonic()
    while not all(_gone(p) for p in procs):
        assert time.monotonic() - start < timeout, [p.pid for p in procs if not _gone(p)]
        time.sleep(0.05)
    return time.monotonic() - start


def test_workers_outlive_a_sigterm_from_outside_and_stop_when_the_loader_does(tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children()}
    stream = _stream(tmp_path)
    batches = iter(stream)
    labels = [int(v) for _, (_, c) in zip(range(2), batches) for v in c["y"]]
    workers = _workers(before)
    assert len(workers) == 2
    # from another process, as slurmstepd sends it (torch's handler only spares its parent)
    subprocess.run(["kill", "-TERM", *(str(p.pid) for p in workers)], check=True)
    time.sleep(0.5)  # a worker that dies of it has died by now
    assert not any(_gone(p) for p in workers)
    # two more epochs of 42 samples: every sample still comes, each once per epoch
    labels += [int(v) for _, (_, c) in zip(range(26), batches) for v in c["y"]]
    assert sorted(labels[:42]) == list(range(42)) and sorted(labels[42:84]) == list(range(42))
    stream.close()
    assert _wait_gone(workers, timeout=10) < 10


def test_a_sigterm_from_the_rank_still_ends_a_worker_at_once(tmp_path: Path) -> None:
    """torch's shutdown of a stuck worker (`terminate()`) comes from the rank itself."""
    before = {p.pid for p in psutil.Process().children()}
    stream = _stream(tmp_path)
    next(iter(stream))
    worker = _workers(before)[0]
    os.kill(worker.pid, signal.SIGTERM)
    took = _wait_gone([worker], timeout=5)
    assert worker.wait(timeout=1) == 0, "exit 0, as torch's handler: the rank must not take it for a crash"
    stream.close()
    assert took < 5


def test_a_pipe_command_outlives_a_sigterm_from_outside(tmp_path: Path) -> None:
    """`pipe:` (and s3://, which runs `aws s3 cp`) shards: Slurm's SIGTERM reaches the shard
    command too. Killed, its shard read as damaged and its samples were replaced and lost to
    the epoch; it now ends when its reader closes the pipe, like the workers."""
    shard = id_shards(tmp_path, [12])[0]
    entry = {"url": f"pipe:sleep 3; cat {shard}", "samples": 12}
    index = {"format": "iddpm_ds-shards-v1", "splits": {"train": {"samples": 12, "shards": [entry]}}}
    (tmp_path / "remote.json").write_text(json.dumps(index))
    spec = DataSpec(shards=str(tmp_path / "remote.json"), allow_pipe=True, num_workers=1, shuffle_buffer=0)
    stream = build_train_stream(spec, image_size=8, class_cond=True, batch_size=3, rank=0,
                                world_size=1, seed=0)
    batches = iter(stream)
    before = time.monotonic()
    signalled: list[int] = []

    def sigterm_the_step() -> None:  # every process below this one ("the rank"), as Slurm does
        while not any(p.name() == "sleep" for p in psutil.Process().children(recursive=True)):
            assert time.monotonic() - before < 60
            time.sleep(0.02)
        signalled.extend(p.pid for p in psutil.Process().children(recursive=True))
        subprocess.run(["kill", "-TERM", *map(str, signalled)], check=False)

    killer = threading.Thread(target=sigterm_the_step)
    killer.start()
    labels = [int(v) for _, (_, c) in zip(range(4), batches) for v in c["y"]]
    killer.join()
    assert len(signalled) >= 3  # the worker, the shell, sleep
    assert time.monotonic() - before >= 3  # the batches came after the signal
    assert sorted(labels) == list(range(12)) and stream.stats()["corrupt_samples"] == 0
    stream.close()
