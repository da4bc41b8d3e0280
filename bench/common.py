"""Shared pieces of the benchmarks (docs/benchmarks.md): the CLI, torchrun workers,
alternating paired timing and the Markdown tables they print."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

ROOT = Path(__file__).resolve().parents[1]


def cli(doc: str, threads: int | None = os.cpu_count() or 1) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring as help, --threads (unless None), and the hidden
    --worker JSON (the parent's settings) that run_workers passes to its processes."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads,
                            help="CPU threads shared by the ranks")
    parser.add_argument("--worker", type=lambda s: argparse.Namespace(**json.loads(s)),
                        help=argparse.SUPPRESS)
    return parser


def run_workers(module: str, world: int, settings: dict, threads: int, what: str) -> dict:
    """`python -m module --worker JSON(settings)` (module: a name and its arguments) as `world`
    torchrun processes sharing `threads` CPU threads, from the checkout's root; returns what
    rank 0 passed to result()."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), "-m", *module.split(), "--worker", json.dumps(settings, default=str)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // world))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{what} at world size {world} failed ({proc.returncode}):\n"
                     f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def result(payload: dict) -> None:
    """What a worker hands back to run_workers: rank 0's (the other ranks print nothing)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(payload), flush=True)


def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def per_step(step: Callable[[], float | None], n: int, device: torch.device | None = None,
             warmup: int = 0, barrier: Callable[[], None] = lambda: None) -> float:
    """Seconds per call of step() over n calls after `warmup` untimed ones (the device synced
    at both ends only), less the seconds each call returns as slept; the slowest rank's."""
    for _ in range(warmup):
        step()
    barrier()
    sync(device)
    start, slept = time.perf_counter(), 0.0
    for _ in range(n):
        slept += step() or 0.0
    sync(device)
    elapsed = torch.tensor([time.perf_counter() - start - slept], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    return float(elapsed) / n


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


def table(header: str, rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table as docs/*.md show it. header: "a | b: | c", a name ending in ":"
    right-aligned; rows: cells, formatted by the caller."""
    names = [h.strip() for h in header.split("|")]
    lines = ["| " + " | ".join(n.rstrip(":") for n in names) + " |",
             "|" + "".join("---:|" if n.endswith(":") else "---|" for n in names)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])
