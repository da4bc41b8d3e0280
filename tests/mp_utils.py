"""Run a function in N real processes joined by a gloo process group.

Real processes, real collectives: multi-rank behaviour is tested, never mocked.
`fn(rank, world_size, *args)` runs in each process; its return value is pickled back
through a temp file so tests can compare what every rank saw.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
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

    fn must be a module-level function (it is pickled into spawned processes).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args),
                           nprocs=world_size, join=True, start_method="spawn")
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as fh:
                results.append(pickle.load(fh))
        return results
