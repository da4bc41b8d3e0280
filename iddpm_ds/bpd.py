"""Negative log-likelihood in bits/dim on held-out data (the reference's image_nll.py).

Public API::

    from iddpm_ds.bpd import evaluate_bpd, evaluate_shards
    result = evaluate_shards(model, diffusion, model_spec, data_spec, batch_size=16,
                             num_samples=1000, device=placement.device())   # collective
    result["bpd"], result["prior_bpd"], result["terms"]["vb"]

Every rank evaluates its own held-out samples with `calc_bpd_loop` (no collective inside
the loop, so ranks may hold different numbers of batches); the sums are all-reduced once
at the end. The estimate is stochastic (calc_bpd_loop draws fresh x_t per step): the noise
is seeded by (seed, rank), inside a forked RNG so a caller's streams do not move.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as torch_dist

from .dist import env
from .diffusion import SpacedDiffusion
from .spec.data import DataSpec
from .spec.model import ModelSpec
from .superres import downsample
from .weights import SamplingError


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block without moving any global RNG: torch CPU (and `device`'s CUDA), Python,
    NumPy. Model init and DataLoader start-up draw from them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class _BpdSums:
    """On-device float64 sums of calc_bpd_loop's outputs over the samples seen so far."""

    def __init__(self, num_timesteps: int, device: torch.device) -> None:
        self.num_timesteps = num_timesteps
        # [3 + 3T]: count, total_bpd, prior_bpd, then vb, mse, xstart_mse per step (t = T-1 .. 0)
        self.packed = torch.zeros(3 + 3 * num_timesteps, dtype=torch.float64, device=device)

    def add(self, out: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        """weight [N]: 1 for a held-out sample, 0 for padding or a corrupt sample's stand-in."""
        w = weight.to(torch.float64)
        terms = [out[k].to(torch.float64) for k in ("vb", "mse", "xstart_mse")]   # [N, T] each
        self.packed += torch.cat([
            w.sum()[None],
            (w * out["total_bpd"].to(torch.float64)).sum()[None],
            (w * out["prior_bpd"].to(torch.float64)).sum()[None],
            *[(w[:, None] * term).sum(dim=0) for term in terms]])

    def reduce(self) -> torch.Tensor:
        """The global sums on CPU (collective)."""
        if env.world_size() > 1:
            torch_dist.all_reduce(self.packed)
        return self.packed.cpu()


def noise_seed(seed: int, rank: int) -> int:
    """Seed of the global RNG for calc_bpd_loop's noise on one rank."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


@torch.no_grad()
def evaluate_bpd(model: Any, diffusion: SpacedDiffusion, batches: Iterable[tuple], *,
                 device: torch.device, clip_denoised: bool = True, seed: int = 0,
                 progress: bool = False, total_batches: Optional[int] = None,
                 low_res_size: Optional[int] = None) -> dict[str, Any]:
    """Bits/dim of `model` on this rank's `batches`, reduced over all ranks (collective).

    batches yield (x [N, 3, H, W] in [-1, 1], cond) or (x, cond, mask [N] bool); masked-out
    samples do not count. low_res_size (a super-resolution model's small_size) conditions
    each image on itself area-downsampled (model_kwargs["low_res"]). Returns the means over samples: "bpd" (total), "prior_bpd",
    "vb_bpd" (sum of the per-step terms), "mse" (eps), "xstart_mse"; "num_samples";
    "timesteps" (original step indices, ascending) and "terms" {"vb", "mse", "xstart_mse"}
    per step in that order. Raises SamplingError when no rank saw a sample.
    """
    sums = _BpdSums(diffusion.num_timesteps, device)
    show = progress and env.is_main()
    with preserved_rng(device):
        torch.manual_seed(noise_seed(seed, env.rank()))
        for batch in _progress(batches, show, total_batches):
            x, cond, mask = batch if len(batch) == 3 else (*batch, None)
            if mask is not None and not bool(mask.any()):  # padding batch (mask lives on CPU)
                continue
            x = x.to(device, non_blocking=True)                                 # [N, 3, H, W]
            model_kwargs = {k: v.to(device, non_blocking=True) for k, v in cond.items()}
            if low_res_size is not None:
                model_kwargs["low_res"] = downsample(x, low_res_size)           # [N, 3, s, s]
            out = diffusion.calc_bpd_loop(model, x, clip_denoised=clip_denoised,
                                          model_kwargs=model_kwargs)
            weight = torch.ones(x.shape[0], device=device) if mask is None else mask.to(device)
            sums.add(out, weight)
    return _summary(sums.reduce(), diffusion)


def _progress(batches: Iterable[tuple], show: bool, total: Optional[int]) -> Iterable[tuple]:
    if not show:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc="bits/dim", unit="batch", dynamic_ncols=True)


def _summary(packed: torch.Tensor, diffusion: SpacedDiffusion) -> dict[str, Any]:
    T = diffusion.num_timesteps
    count = float(packed[0])
    if count == 0:
        raise SamplingError("no held-out sample was evaluated (empty or fully corrupt eval data)")
    per_step = packed[3:].reshape(3, T).flip(1) / count   # [3, T], columns now t = 0 .. T-1
    vb, mse, xstart_mse = (row.tolist() for row in per_step)
    return {
        "num_samples": int(count),
        "bpd": float(packed[1]) / count,
        "prior_bpd": float(packed[2]) / count,
        "vb_bpd": float(per_step[0].sum()),
        "mse": float(per_step[1].mean()),
        "xstart_mse": float(per_step[2].mean()),
        "num_timesteps": T,
        "timesteps": list(diffusion.timestep_map),
        "terms": {"vb": vb, "mse": mse, "xstart_mse": xstart_mse},
    }


def evaluate_shards(model: Any, diffusion: SpacedDiffusion, model_spec: ModelSpec,
                    data_spec: DataSpec, *, batch_size: int, device: torch.device,
                    num_samples: Optional[int] = None, clip_denoised: bool = True,
                    seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Bits/dim over data_spec.eval_shards (the first num_samples), split across ranks
    (collective). A super-resolution model is conditioned on each held-out image
    area-downsampled to small_size: the bpd of the large image given its low_res. Corrupt samples are left out of the means (num_samples says how many counted)."""
    from .data import build_eval_stream

    if data_spec.eval_shards is None:
        raise SamplingError("no held-out shards: set data.eval_shards (or give them explicitly)")
    stream = build_eval_stream(data_spec, image_size=model_spec.image_size,
                               class_cond=model_spec.class_cond, batch_size=batch_size,
                               rank=env.rank(), world_size=env.world_size(),
                               num_samples=num_samples, num_classes=model_spec.num_classes)
    result = evaluate_bpd(model, diffusion, stream.padded(), device=device,
                          clip_denoised=clip_denoised, seed=seed, progress=progress,
                          total_batches=stream.max_batches, low_res_size=model_spec.small_size)
    return {**result, "held_out_total": stream.total}
