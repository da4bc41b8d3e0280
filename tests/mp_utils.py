"""Run a function in N real processes joined by a gloo process group.

Real processes, real collectives: multi-rank behaviour is tested, never mocked.
`fn(rank, world_size, *args)` runs in each process; its return value is pickled back
through a temp file so tests can compare what every rank saw.

The ranks are forked by a fork server that imported torch, DeepSpeed and the trainer once
per pytest worker: a freshly spawned rank spends about 6 CPU-seconds on those imports
before its first line, which over the suite's multi-rank tests is minutes of CI's two
cores. The server is a single-threaded process of its own (never a fork of the pytest
worker and its threads); each rank takes the caller's environment of the moment (the
server's own is from its start), before anything reads it.
"""
from __future__ import annotations

import itertools
import os
import pickle
import random
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


# ports per pytest-xdist worker, from 10000 up; three blocks end below 20000, where the
# MASTER_PORT that dist derives from a Slurm job id (20000 + id % 20000) begins
PORT_BLOCK, PORT_BLOCKS = 3000, 3
_ports = random.Random()  # its own state: a test that seeds `random` must not fix the ports


def free_port() -> int:
    """A TCP port free now, from this pytest-xdist worker's own block of ports.

    CI runs the suite on several workers: with the kernel's ephemeral ports (bind to 0), two
    workers could pick the same port before either launcher binds it, or an outgoing
    connection could take it meanwhile. Each worker's block lies below the ephemeral range
    (32768 and up) and apart from the others' (CI runs at most PORT_BLOCKS workers).
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # inherited by the tests' processes
    index = int(worker[2:]) % PORT_BLOCKS if worker[2:].isdigit() else 0
    low = 10000 + PORT_BLOCK * index
    for port in _ports.sample(range(low, low + PORT_BLOCK), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + PORT_BLOCK - 1}")


# what a rank imports before its first step: DeepSpeed's engine init alone pulls in
# torch._dynamo (torch's optimizers) and inductor (DeepSpeed's Muon check), ~3 CPU-s
PRELOAD = ["torch", "torch.distributed", "deepspeed", "iddpm_ds.train.trainer", "mp_utils",
           "torch._dynamo", "torch._inductor.compile_fx", "deepspeed.runtime.zero.muon.muon_optimizer"]
mp.set_forkserver_preload(PRELOAD)


def _entry(rank: int, world_size: int, port: int, out_dir: str, env: dict[str, str], fn: Callable,
           args: tuple) -> None:
    os.environ.clear()
    os.environ.update(env)
    for fd, name in ((1, "out"), (2, "err")):  # the server's fds are not the caller's
        os.dup2(os.open(Path(out_dir) / f"rank{rank}.{name}", os.O_WRONLY | os.O_CREAT), fd)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from iddpm_ds.build_locks import prepare_deepspeed

    prepare_deepspeed()  # as launch/ does: DeepSpeed's init must not build the shm op
    result = fn(rank, world_size, *args)  # an exception ends this rank: spawn reports it
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as fh:
        pickle.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run fn(rank, world_size, *args) on world_size processes; return results by rank.

    fn must be a module-level function (it is pickled into the forked processes). What
    the ranks print reaches this process's stdout and stderr when they have ended.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_entry, args=(world_size, free_port(), out_dir, dict(os.environ), fn, args),
                               nprocs=world_size, join=True, start_method="forkserver")
        finally:  # what the ranks printed, on this process's own fds (pytest's capfd reads them)
            for rank, (fd, name) in itertools.product(range(world_size), ((1, "out"), (2, "err"))):
                if (printed := Path(out_dir) / f"rank{rank}.{name}").exists():
                    os.write(fd, printed.read_bytes())
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as fh:
                results.append(pickle.load(fh))
        return results
