"""Held-out bits/dim during training, every train.eval_interval steps (all ranks)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import dist
from ..data import build_eval_stream
from ..diffusion import build_diffusion
from ..bpd import evaluate_bpd, preserved_rng
from ..models import build_model

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer


def evaluate_during_training(trainer: "Trainer") -> None:
    """Bits/dim on the first train.eval_samples held-out images (split over ranks), at
    train.eval_respacing, for the EMA at the first rate ("eval_bpd", the weights one samples
    with) and for the live weights ("eval_bpd_model", which track the current step; the
    EMA lags early in training). Both see the same images and the same x_t noise, so their
    difference is the weights'. Writes one metrics record; training RNG streams do not move."""
    job, start = trainer.job, time.perf_counter()
    if job.model.small_size is not None:  # held-out shards carry no low-resolution inputs
        dist.log0("eval_skipped", step=trainer.step, reason="super-resolution model")
        return
    diffusion = build_diffusion(job.diffusion.with_respacing(job.train.eval_respacing))
    with preserved_rng(trainer.device):  # model init and loader start-up draw from the RNGs
        stream = build_eval_stream(
            job.data, image_size=job.model.image_size, class_cond=job.model.class_cond,
            batch_size=trainer.plan.micro, rank=dist.rank(), world_size=dist.world_size(),
            num_samples=job.train.eval_samples)
        batches = list(stream.padded())  # a small subset: read once, used for both weight sets
        model = build_model(job.model).to(trainer.device).eval()
    results: dict[str, dict[str, Any]] = {}
    for name, local in (("ema", trainer.ema.params[0]), ("model", None)):
        model.load_state_dict(trainer.master.full_state_dict(local), strict=True)  # collective
        results[name] = evaluate_bpd(model, diffusion, batches, device=trainer.device,
                                     seed=job.train.seed)                      # collective
    del model
    ema, raw = results["ema"], results["model"]
    seconds = round(time.perf_counter() - start, 3)
    dist.log0("eval", step=trainer.step, bpd=round(ema["bpd"], 4), bpd_model=round(raw["bpd"], 4),
              samples=ema["num_samples"], respacing=job.train.eval_respacing, seconds=seconds)
    trainer.writer.write(trainer.step, {
        "eval_bpd": ema["bpd"], "eval_prior_bpd": ema["prior_bpd"], "eval_vb_bpd": ema["vb_bpd"],
        "eval_mse": ema["mse"], "eval_xstart_mse": ema["xstart_mse"],
        "eval_bpd_model": raw["bpd"], "eval_mse_model": raw["mse"],
        "eval_samples": ema["num_samples"], "eval_ema_rate": job.train.ema_rate[0],
        "eval_respacing": job.train.eval_respacing,
        "eval_seconds": seconds})
