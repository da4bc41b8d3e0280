"""Work done every few steps during training: EMA sample grids and held-out bits/dim.

Both take the pieces they need (spec, EMA, master weights, metrics writer), never the
Trainer, and leave the training RNG streams where they were.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..data import build_eval_stream
from ..diffusion import build_diffusion
from ..bpd import evaluate_bpd, preserved_rng
from ..images import make_grid, save_png, to_uint8
from ..models import build_model
from ..spec.job import JobSpec
from .ema import EMA
from .master import MasterWeights
from .metrics import MetricsWriter
from .sample_grid import sample_images


def write_sample_grid(job: JobSpec, ema: EMA, rate: float, step: int, run_dir: Path,
                      writer: MetricsWriter, device: torch.device) -> None:
    """Assemble the EMA weights (collective), sample on rank 0, write PNG + TensorBoard."""
    state = ema.full_state_dict(rate)
    if dist.is_main() and job.model.small_size is None:
        # fork_rng: drawing the grid must not shift rank 0's training noise stream
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            samples = sample_images(job, state, device, job.train.sample_count,
                                    job.train.sample_respacing, seed=job.train.seed)
        # class-conditional: one column per class (labels cycle 0..K-1)
        columns = min(job.model.num_classes, 10) if job.model.class_cond else None
        grid = make_grid(to_uint8(samples), nrow=columns)
        path = run_dir / "samples" / f"ema_{rate}_{step:06d}.png"
        save_png(grid, path, scale=2)
        writer.image(f"samples/ema_{rate}", grid, step)
        dist.log0("sample_grid", step=step, path=str(path))
    dist.barrier()


def evaluate_during_training(job: JobSpec, ema: EMA, master: MasterWeights, step: int,
                             writer: MetricsWriter, device: torch.device, micro: int) -> None:
    """Bits/dim on the first train.eval_samples held-out images (split over ranks, `micro`
    per batch), at train.eval_respacing, for the EMA at the first rate ("eval_bpd", the
    weights one samples with) and for the live weights ("eval_bpd_model", which track the
    current step; the EMA lags early in training). Both see the same images and the same
    x_t noise, so their difference is the weights'. Writes one metrics record (all ranks
    call it); training RNG streams do not move."""
    start = time.perf_counter()
    if job.model.small_size is not None:  # held-out shards carry no low-resolution inputs
        dist.log0("eval_skipped", step=step, reason="super-resolution model")
        return
    diffusion = build_diffusion(job.diffusion.with_respacing(job.train.eval_respacing))
    with preserved_rng(device):  # model init and loader start-up draw from the RNGs
        stream = build_eval_stream(
            job.data, image_size=job.model.image_size, class_cond=job.model.class_cond,
            batch_size=micro, rank=dist.rank(), world_size=dist.world_size(),
            num_samples=job.train.eval_samples, num_classes=job.model.num_classes)
        batches = list(stream.padded())  # a small subset: read once, used for both weight sets
        model = build_model(job.model).to(device).eval()
    results: dict[str, dict[str, Any]] = {}
    weights = (("ema", lambda: ema.full_state_dict(ema.rates[0])), ("model", master.full_state_dict))
    for name, full_state in weights:
        model.load_state_dict(full_state(), strict=True)                     # collective
        results[name] = evaluate_bpd(model, diffusion, batches, device=device,
                                     seed=job.train.seed)                      # collective
    del model
    ema_res, raw = results["ema"], results["model"]
    seconds = round(time.perf_counter() - start, 3)
    dist.log0("eval", step=step, bpd=round(ema_res["bpd"], 4), bpd_model=round(raw["bpd"], 4),
              samples=ema_res["num_samples"], respacing=job.train.eval_respacing, seconds=seconds)
    writer.write(step, {
        "eval_bpd": ema_res["bpd"], "eval_prior_bpd": ema_res["prior_bpd"],
        "eval_vb_bpd": ema_res["vb_bpd"], "eval_mse": ema_res["mse"],
        "eval_xstart_mse": ema_res["xstart_mse"],
        "eval_bpd_model": raw["bpd"], "eval_mse_model": raw["mse"],
        "eval_samples": ema_res["num_samples"], "eval_ema_rate": job.train.ema_rate[0],
        "eval_respacing": job.train.eval_respacing,
        "eval_seconds": seconds})
