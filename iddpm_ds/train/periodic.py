"""Work done every few steps during training: EMA sample grids and held-out bits/dim.

Both take the pieces they need (spec, EMA, master weights, metrics writer), never the
Trainer, and leave the training RNG streams where they were.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..dist import env, group, output
from ..data import build_eval_stream
from ..diffusion import build_diffusion
from ..bpd import evaluate_bpd, preserved_rng
from ..images import make_grid, save_png, to_uint8
from ..models import build_model
from ..spec.job import JobSpec
from .ema import EMA
from .master import MasterWeights
from .metrics import MetricsWriter
from .sample_grid import sample_images, super_res_inputs


def write_sample_grid(job: JobSpec, ema: EMA, rate: float, step: int, run_dir: Path,
                      writer: MetricsWriter, device: torch.device) -> None:
    """Assemble the EMA weights (collective), sample on rank 0, write PNG + TensorBoard."""
    state = ema.full_state_dict(rate)
    if env.is_main():
        # preserved_rng: drawing the grid (and the SR inputs' loader) must not shift rank
        # 0's training noise stream
        with preserved_rng(device):
            grid = _grid(job, state, device)
        path = run_dir / "samples" / f"ema_{rate}_{step:06d}.png"
        save_png(grid, path, scale=2)
        writer.image(f"samples/ema_{rate}", grid, step)
        output.log0("sample_grid", step=step, path=str(path))
    group.wait_for_main("drawing the sample grid")


def _grid(job: JobSpec, state: dict[str, torch.Tensor], device: torch.device) -> Any:
    """uint8 [H', W', 3]. Base model: class-conditional grids get one column per class
    (labels cycle 0..K-1). Super-resolution: rows of low_res inputs (nearest-upsampled),
    each followed by the row of samples drawn from them."""
    count = job.train.sample_count
    if job.model.small_size is None:
        samples = sample_images(job, state, device, count, job.train.sample_respacing,
                                seed=job.train.seed)
        columns = min(job.model.num_classes, 10) if job.model.class_cond else None
        return make_grid(to_uint8(samples), nrow=columns)
    _, model_kwargs = super_res_inputs(job, count, device)
    samples = sample_images(job, state, device, len(model_kwargs["low_res"]),
                            job.train.sample_respacing, seed=job.train.seed,
                            model_kwargs=model_kwargs)                       # [n, 3, H, W]
    inputs = F.interpolate(model_kwargs["low_res"], size=samples.shape[2:], mode="nearest")
    columns = min(len(samples), 8)
    rows = [t for start in range(0, len(samples), columns)
            for t in (inputs[start:start + columns], samples[start:start + columns])]
    return make_grid(to_uint8(torch.cat(rows)), nrow=columns)


def evaluate_during_training(job: JobSpec, ema: EMA, master: MasterWeights, step: int,
                             writer: MetricsWriter, device: torch.device, micro: int) -> None:
    """Bits/dim on the first train.eval_samples held-out images (split over ranks, `micro`
    per batch), at train.eval_respacing, for the EMA at the first rate ("eval_bpd", the
    weights one samples with) and for the live weights ("eval_bpd_model", which track the
    current step; the EMA lags early in training). Both see the same images and the same
    x_t noise, so their difference is the weights'. Writes one metrics record (all ranks
    call it); training RNG streams do not move."""
    start = time.perf_counter()
    diffusion = build_diffusion(job.diffusion.with_respacing(job.train.eval_respacing))
    with preserved_rng(device):  # model init and loader start-up draw from the RNGs
        stream = build_eval_stream(
            job.data, image_size=job.model.image_size, class_cond=job.model.class_cond,
            batch_size=micro, rank=env.rank(), world_size=env.world_size(),
            num_samples=job.train.eval_samples, num_classes=job.model.num_classes)
        batches = list(stream.padded())  # a small subset: read once, used for both weight sets
        model = build_model(job.model).to(device).eval()
    results: dict[str, dict[str, Any]] = {}
    weights = (("ema", lambda: ema.full_state_dict(ema.rates[0])), ("model", master.full_state_dict))
    for name, full_state in weights:
        model.load_state_dict(full_state(), strict=True)                     # collective
        results[name] = evaluate_bpd(model, diffusion, batches, device=device,
                                     seed=job.train.seed,
                                     low_res_size=job.model.small_size)        # collective
    del model
    ema_res, raw = results["ema"], results["model"]
    seconds = round(time.perf_counter() - start, 3)
    output.log0("eval", step=step, bpd=round(ema_res["bpd"], 4), bpd_model=round(raw["bpd"], 4),
                samples=ema_res["num_samples"], respacing=job.train.eval_respacing, seconds=seconds)
    writer.write(step, {
        "eval_bpd": ema_res["bpd"], "eval_prior_bpd": ema_res["prior_bpd"],
        "eval_vb_bpd": ema_res["vb_bpd"], "eval_mse": ema_res["mse"],
        "eval_xstart_mse": ema_res["xstart_mse"],
        "eval_bpd_model": raw["bpd"], "eval_mse_model": raw["mse"],
        "eval_samples": ema_res["num_samples"], "eval_ema_rate": job.train.ema_rate[0],
        "eval_respacing": job.train.eval_respacing,
        # what the figure is, for the console line: a bound over this many steps, loose
        # with fixed variances (the demo's 50-step fixed-variance bound is ~16 bits/dim)
        "eval_steps": diffusion.num_timesteps,
        "eval_variances": "learned" if job.model.learn_sigma else "fixed",
        "eval_seconds": seconds})
