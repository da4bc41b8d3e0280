#!/usr/bin/env python
"""Throughput of the full training-service step against a bare torch loop, same run.

Both train the reference's bench config (32 px, 64 channels, 2 res blocks, attention at
16 and 8, learn_sigma, cosine, T=1000, dropout 0.1, batch 16, fp32 by default) in one
process:
  bare     model + GaussianDiffusion.training_losses + torch AdamW, batch already in memory,
           uniform t; nothing else.
  service  iddpm_ds's Trainer.train_step: streamed WebDataset batch, schedule sampler (+its
           collective), DeepSpeed engine (ZeRO stage as given) backward/step, EMA update,
           on-device metric accumulation.
Timed blocks alternate between the two so machine noise hits both alike. Prints img/s,
the ratio service/bare (target >= 0.95), and an MFU estimate: FLOPs of one step counted
with torch's FlopCounterMode against this machine's fp32 (or bf16) matmul peak measured in
the same run.

    python bench/train_throughput.py [--steps 4] [--blocks 5] [--precision fp32|bf16]
                                     [--zero-stage 0] [--workers 1]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"image_size": 32, "num_channels": 64, "num_res_blocks": 2, "attention_resolutions": "16,8",
         "learn_sigma": True, "dropout": 0.1}
DIFFUSION = {"diffusion_steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}
BATCH = 16


def make_job(shards: Path, run_dir: Path, precision: str, stage: int, workers: int):
    from iddpm_ds.spec.job import JobSpec

    return JobSpec.model_validate({
        "model": MODEL, "diffusion": DIFFUSION,
        "data": {"shards": f"{shards}/index.json#train", "num_workers": workers, "shuffle_buffer": 256},
        "train": {"batch_size": BATCH, "lr": 1e-4, "log_interval": 10**9, "save_interval": 10**9,
                  "ema_rate": "0.9999"},
        "precision": precision, "deepspeed": {"zero_stage": stage},
        "output": {"run_dir": str(run_dir), "tensorboard": False}})


class Bare:
    """The baseline: what a hand-written single-GPU loop does, nothing more."""

    def __init__(self, job) -> None:
        from iddpm_ds import build_diffusion, build_model

        torch.manual_seed(0)
        self.dtype = torch.bfloat16 if job.precision == "bf16" else torch.float32
        self.model = build_model(job.model).to(self.dtype)
        self.diffusion = build_diffusion(job.diffusion)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.rand(BATCH, 3, 32, 32) * 2 - 1               # [N, C, H, W]

    def model_fn(self, x, t, **kw):
        return self.model(x.to(self.dtype), t, **kw).float()

    def step(self) -> None:
        t = torch.randint(0, self.diffusion.num_timesteps, (BATCH,))
        losses = self.diffusion.training_losses(self.model_fn, self.x, t)
        losses["loss"].mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timed(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return n * BATCH / (time.perf_counter() - start)


def matmul_peak(dtype: torch.dtype, reps: int = 10) -> float:
    """Best dense-matmul FLOP/s over a few sizes: the practical peak of this device."""
    best = 0.0
    for size in (1024, 2048, 3072):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * size**3 * reps / (time.perf_counter() - start))
    return best


def step_flops(bare: Bare) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        bare.step()
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="alternating timed blocks per loop")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3],
                        help="ZeRO stage of the service (one process: 0 is what a single GPU runs)")
    parser.add_argument("--workers", type=int, default=1,
                        help="loader worker processes of the service (they share this machine's cores)")
    args = parser.parse_args()
    from iddpm_ds import dist
    from iddpm_ds.train.trainer import Trainer

    dist.init()
    peak_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(peak_dtype)  # before and after the loops: the better of the two
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "digits"
        subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "digits", "--out", str(shards),
                        "--image-size", "32", "--quiet"], check=True)
        job = make_job(shards, Path(tmp) / "run", args.precision, args.zero_stage, args.workers)
        trainer = Trainer(job)
        trainer._batches = iter(trainer.data)
        bare = Bare(job)
        for _ in range(2):  # warm-up: allocator, loader workers, lazy kernels
            trainer.train_step()
            bare.step()
        rates = {"bare": [], "service": []}
        for _ in range(args.blocks):
            rates["bare"].append(timed(bare.step, args.steps))
            rates["service"].append(timed(trainer.train_step, args.steps))
        flops = step_flops(bare)
        trainer.data.close()
    peak = max(peak, matmul_peak(peak_dtype))
    report(rates, flops, peak, args)
    dist.shutdown()
    return 0


def report(rates: dict, flops: int, peak: float, args) -> None:
    """Medians over blocks, and the median of per-block ratios (each block pair ran back to
    back, so a burst of machine noise mostly cancels in its ratio)."""
    print(f"config: 32px 64ch 2 res blocks attn 16,8 learn_sigma cosine T=1000 dropout 0.1 batch {BATCH} "
          f"{args.precision}, service ZeRO-{args.zero_stage} with {args.workers} loader worker(s), "
          f"threads {torch.get_num_threads()}")
    for name, label in (("bare", "bare torch loop"), ("service", "iddpm_ds service")):
        value = statistics.median(rates[name])
        achieved = flops * value / BATCH
        blocks = ", ".join(f"{r:.2f}" for r in rates[name])
        print(f"{label:>18}: {value:7.2f} img/s (blocks {blocks})  {achieved / 1e9:7.1f} GFLOP/s  "
              f"MFU {achieved / peak:6.1%}")
    print(f"FLOPs per step (fwd+bwd, counted): {flops / 1e9:.2f} GFLOP; "
          f"dense matmul peak measured: {peak / 1e9:.1f} GFLOP/s")
    paired = statistics.median(s / b for s, b in zip(rates["service"], rates["bare"]))
    print(f"ratio service/bare: {paired:.3f} (median of per-block ratios; target >= 0.95)")


if __name__ == "__main__":
    sys.exit(main())
