"""Shared pieces of the training benchmarks: the bench config, its job spec, the bare loop
every ratio is taken against, interleaved timing and per-phase clocks.

The bench config is the reference's: 32 px, 64 channels, 2 res blocks, attention at 16
and 8, learn_sigma, cosine, T=1000, dropout 0.1, batch 16 per rank.
"""
from __future__ import annotations

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

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"image_size": 32, "num_channels": 64, "num_res_blocks": 2, "attention_resolutions": "16,8",
         "learn_sigma": True, "dropout": 0.1}
DIFFUSION = {"diffusion_steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}
BATCH = 16
CONFIG_LINE = ("32 px, 64 ch, 2 res blocks, attention 16,8, learn_sigma, cosine, T=1000, "
               f"dropout 0.1, batch {BATCH} per rank")


def make_shards(folder: Path) -> Path:
    """The digits demo shards at 32 px (1,797 images; tiny PNGs, cheap to decode)."""
    if not (folder / "index.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "digits", "--out",
                        str(folder), "--image-size", "32", "--quiet"], check=True)
    return folder


def make_job(shards: Path, run_dir: Path, *, precision: str = "fp32", stage: int = 0,
             workers: int = 1, sampler: str = "uniform", train: dict[str, Any] | None = None):
    """The service's job for the bench config; `train` adds lever fields (train.compile ...)."""
    from iddpm_ds.spec.job import JobSpec

    return JobSpec.model_validate({
        "model": MODEL, "diffusion": DIFFUSION,
        "data": {"shards": f"{shards}/index.json#train", "num_workers": workers, "shuffle_buffer": 256},
        "train": {"batch_size": BATCH, "lr": 1e-4, "log_interval": 10**9, "save_interval": 10**9,
                  "ema_rate": "0.9999", "schedule_sampler": sampler, **(train or {})},
        "precision": precision, "deepspeed": {"zero_stage": stage},
        "output": {"run_dir": str(run_dir), "tensorboard": False}})


class Bare:
    """The baseline: what a hand-written loop does, nothing more. fp32 model,
    GaussianDiffusion.training_losses, torch AdamW with its defaults, the batch already in
    memory, uniform t. With world size > 1 it is wrapped in torch DDP (gradient all-reduce
    overlapped with backward), the standard hand-written multi-GPU loop."""

    def __init__(self, job, device: torch.device, world_size: int = 1) -> None:
        from iddpm_ds import build_diffusion, build_model

        torch.manual_seed(0)
        self.model = build_model(job.model).to(device)
        if world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.model)
        self.diffusion = build_diffusion(job.diffusion)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.rand(BATCH, 3, 32, 32, device=device) * 2 - 1  # [N, C, H, W]
        self.device = device

    def step(self) -> None:
        t = torch.randint(0, self.diffusion.num_timesteps, (BATCH,), device=self.device)
        losses = self.diffusion.training_losses(self.model, self.x, t)
        losses["loss"].mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


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


def interleaved(steps: dict[str, Callable[[], None]], blocks: int, per_block: int,
                device: torch.device, barrier: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per step of each loop, in alternating blocks so machine noise hits all alike."""
    out: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(blocks):
        for name, step in steps.items():
            barrier()
            out[name].append(timed(step, per_block, device))
    return out


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-block speed ratios (den time / num time): a burst of noise mostly
    cancels inside its block pair."""
    return statistics.median(d / n for n, d in zip(num, den))


class PhaseClock:
    """Wall time per named phase, synchronising the device at each boundary (bench only:
    the trainer's per-step path never synchronises). Wraps callables in place."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = False

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

    def reset(self) -> None:
        self.seconds.clear()


def matmul_peak(dtype: torch.dtype, device: torch.device, reps: int = 10) -> float:
    """Best dense-matmul FLOP/s over a few sizes: the practical peak of this device."""
    best = 0.0
    sizes = (1024, 2048, 3072) if device.type == "cpu" else (4096, 8192)
    for size in sizes:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        a @ b
        seconds = timed(lambda: a @ b, reps, device)
        best = max(best, 2 * size**3 / seconds)
    return best


# dense bf16 tensor-core peaks (vendor data sheets, no sparsity), by device-name fragment;
# the first fragment found in the name wins (the PCIe and NVL H100s are slower than the SXM)
DENSE_BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H100": 989e12,
                   "A100": 312e12, "L40S": 362e12}


def device_peak(device: torch.device, reps: int = 10) -> tuple[float, str]:
    """The bf16 FLOP/s an MFU is taken against, and what it is: the data sheet's for a known
    GPU, else this device's measured matmul peak (matmul_peak)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in DENSE_BF16_PEAK.items():
            if key in name:
                return peak, f"{name} dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
    peak = matmul_peak(torch.bfloat16, device, reps)
    return peak, f"measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s"


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one training step (forward + backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def run_workers(script: str, world: int, worker_args: list[str], threads: int, what: str) -> dict:
    """`script --worker ...` as `world` torchrun processes sharing `threads` CPU threads;
    returns the dict that rank 0 printed on its `RESULT {json}` line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), script, "--worker", *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // world))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{what} at world size {world} failed ({proc.returncode}):\n"
                     f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
