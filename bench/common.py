"""Shared pieces of the benchmarks: the CLI, the bare loop every training ratio is taken
against, alternating paired timing, per-phase clocks, and torchrun workers. The bench job is
iddpm_ds.testing.bench_job (the reference's 32 px, 64 ch config, batch 16 per rank)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from iddpm_ds.testing import BENCH_MODEL, bench_job, digits_shards  # noqa: F401 - re-exported

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
CONFIG_LINE = ("32 px, 64 ch, 2 res blocks, attention 16,8, learn_sigma, cosine, T=1000, "
               f"dropout 0.1, batch {BATCH} per rank")


def cli(doc: str, threads: int | None = os.cpu_count() or 1) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring as help, --threads (unless None), and the hidden
    --worker flag that run_workers passes to the processes it starts."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help="CPU threads shared by the ranks")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


class Bare:
    """The baseline: what a hand-written loop does, nothing more. fp32 model,
    GaussianDiffusion.training_losses, torch AdamW with its defaults, the batch already in
    memory, uniform t; torch DDP (all-reduce overlapped with backward) at world size > 1."""

    def __init__(self, job, device: torch.device, world_size: int = 1) -> None:
        from iddpm_ds import build_diffusion, build_model

        torch.manual_seed(0)
        self.model = build_model(job.model).to(device)  # fp32, sdpa attention: torch's defaults
        if world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.model)
        self.diffusion = build_diffusion(job.diffusion)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.rand(BATCH, 3, 32, 32, device=device) * 2 - 1  # [N, C, H, W]
        self.device = device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], n: int, device: torch.device) -> float:
    """Seconds per step over n steps (synchronised at both ends only)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - start) / n


def alternate(runs: dict[str, Callable[[], float]], blocks: int,
              barrier: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Each run's measurement (seconds) once per block, the order reversed every other
    block, so machine noise and drift hit every run alike."""
    out: dict[str, list[float]] = {name: [] for name in runs}
    for block in range(blocks):
        for name in (list(runs) if block % 2 == 0 else list(runs)[::-1]):
            barrier()
            out[name].append(runs[name]())
    return out


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-block speed ratios (den time / num time): a burst of noise mostly
    cancels inside its block pair."""
    return statistics.median(d / n for n, d in zip(num, den))


class PhaseClock:
    """Wall time per named phase, synchronising the device at each boundary (bench only:
    the trainer's per-step path never synchronises). Wraps callables in place."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.enabled = device, False
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return inner(*args, **kwargs)

        setattr(owner, attr, wrapped)


def run_workers(module: str, world: int, worker_args: list[str], threads: int, what: str) -> dict:
    """`python -m module --worker ...` as `world` torchrun processes sharing `threads` CPU
    threads, from the checkout's root; returns the dict rank 0 printed as `RESULT {json}`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), "-m", module, "--worker", *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // world))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{what} at world size {world} failed ({proc.returncode}):\n"
                     f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def result(payload: dict) -> None:
    """What a worker hands back to run_workers (rank 0 only)."""
    print("RESULT " + json.dumps(payload), flush=True)
