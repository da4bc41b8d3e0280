"""Tiny jobs and shards for the tests and the benchmarks: one factory, a few overrides; and
the reference's preprocessing and timestep sampler that both check and time ours against.

It lives in the package (as torch.testing and numpy.testing do) because the tests, the
benchmarks (python -m bench.x, their torchrun workers) and a GPU machine that only
installed the carried wheels all import iddpm_ds already; a module elsewhere would need
a path edit or a second installed package on each of them.

    job = tiny_job(run_dir, shards, **{"precision": "bf16", "train.max_steps": 5})
    job = tiny_job(run_dir, shards, model=BENCH_MODEL)   # a whole section replaced

An override "section.field" sets one field; an override without a dot replaces that
top-level entry (a field such as precision, or a whole section).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .spec.job import JobSpec

# 16 px, ~0.3M parameters, class-conditional (the digits shards carry labels)
TINY_MODEL: dict[str, Any] = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1,
                              "channel_mult": [1, 2], "attention_resolutions": "8",
                              "learn_sigma": True, "class_cond": True, "num_classes": 10}
# the reference's bench config: 32 px, 64 channels, 2 res blocks, attention at 16 and 8
BENCH_MODEL: dict[str, Any] = {"image_size": 32, "num_channels": 64, "num_res_blocks": 2,
                               "attention_resolutions": "16,8", "learn_sigma": True, "dropout": 0.1}
BENCH_DIFFUSION: dict[str, Any] = {"diffusion_steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}

_BASE: dict[str, Any] = {
    "model": TINY_MODEL,
    "diffusion": {"diffusion_steps": 100, "noise_schedule": "cosine"},
    "data": {"num_workers": 1, "shuffle_buffer": 64},
    "train": {"batch_size": 8, "lr": 2e-3, "warmup_steps": 3, "ema_rate": "0.9,0.5",
              "log_interval": 5, "save_interval": 1000, "max_steps": 20,
              "schedule_sampler": "loss-second-moment"},
    "precision": "fp32",
    "deepspeed": {"zero_stage": 1},
    "output": {"tensorboard": False},
}


def tiny_job_dict(run_dir: Path, shards: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """The tiny job as a plain dict (what a job YAML holds). `shards`: a folder with
    index.json (train and eval splits); None: a shard pattern that does not exist, for
    tests that only validate the spec."""
    job = copy.deepcopy(_BASE)
    job["output"]["run_dir"] = str(run_dir)
    if shards is None:
        job["data"]["shards"] = f"{run_dir}-missing-{{000000..000001}}.tar"
    else:
        job["data"].update(shards=f"{shards}/index.json#train", eval_shards=f"{shards}/index.json#eval")
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if key:
            job.setdefault(section, {})[key] = value  # e.g. distributed.*, absent by default
        else:
            job[section] = value
    return job


def tiny_job(run_dir: Path, shards: Path | None = None, **overrides: Any) -> JobSpec:
    """tiny_job_dict, validated."""
    return JobSpec.model_validate(tiny_job_dict(run_dir, shards, **overrides))


def bench_job(run_dir: Path, shards: Path, **overrides: Any) -> JobSpec:
    """The benchmarks' job: the bench config, batch 16, nothing logged or saved between
    steps (a bench times the step, and reads the run's metrics where it logs)."""
    return tiny_job(run_dir, shards, **{
        "model": BENCH_MODEL, "diffusion": BENCH_DIFFUSION, "data.eval_shards": None,
        "data.shuffle_buffer": 256, "train.batch_size": 16, "train.lr": 1e-4,
        "train.warmup_steps": 0, "train.ema_rate": "0.9999", "train.max_steps": None,
        "train.log_interval": 10**9, "train.save_interval": 10**9,
        "train.schedule_sampler": "uniform", "deepspeed.zero_stage": 0, **overrides})


def digits_shards(folder: Path, image_size: int = 32) -> Path:
    """The bundled digits as `iddpm-shards digits` writes them (train + 200 eval), once."""
    from .data.shards import WriteOptions, digits_items, write_items

    if not (folder / "index.json").is_file():
        write_items(digits_items(), folder, WriteOptions(shard_size=200, eval_count=200,
                                                         image_size=image_size, progress=False),
                    "iddpm_ds.testing")
    return folder


def random_shards(folder: Path, image_size: int, count: int) -> Path:
    """Random images as pre-sized raw shards (no decode cost, no scikit-learn), labels
    0..9, an eighth held out as the eval split; written once."""
    from .data.shards import WriteOptions, array_items, write_items

    if not (folder / "index.json").is_file():
        images = np.random.default_rng(0).integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)
        write_items(array_items(images, np.arange(count) % 10), folder,
                    WriteOptions(image_size=image_size, raw=True, eval_count=count // 8,
                                 progress=False), "iddpm_ds.testing")
    return folder


def reference_preprocess(image: Image.Image, resolution: int) -> np.ndarray:
    """The reference loader's resize written out plainly, independent of iddpm_ds.data (the
    tests check the reader against it, bench.data_throughput's per-file baseline runs it):
    BOX halvings, then BICUBIC, then a centre crop -> uint8 [H, W, 3]."""
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image.convert("RGB"))
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def reference_scale(arr: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> what the reference loader yields: float32 [C, H, W] in [-1, 1]."""
    return np.transpose(arr.astype(np.float32) / 127.5 - 1, [2, 0, 1])


class ReferenceSecondMoment:
    """The reference's loss-second-moment sampler as improved-diffusion runs it (less its
    np.int crash): a shift-buffer history fed one (t, loss) at a time, three blocking
    all_gathers and an .item() per element. Independent of the vectorised sampler that the
    tests check against it and bench.sampler_overhead times against it."""

    def __init__(self, num_timesteps: int, history_per_term: int, uniform_prob: float) -> None:
        self.history_per_term, self.uniform_prob = history_per_term, uniform_prob
        self.history = np.zeros([num_timesteps, history_per_term], dtype=np.float64)
        self.counts = np.zeros([num_timesteps], dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones([len(self.counts)], dtype=np.float64)
        weights = np.sqrt(np.mean(self.history ** 2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        weights = torch.from_numpy(1 / (len(p) * p[indices_np])).float()
        return torch.from_numpy(indices_np).long(), weights

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        import torch.distributed as dist

        batch_sizes = [torch.tensor([0], dtype=torch.int32) for _ in range(dist.get_world_size())]
        dist.all_gather(batch_sizes, torch.tensor([len(local_ts)], dtype=torch.int32))
        batch_sizes = [x.item() for x in batch_sizes]
        max_bs = max(batch_sizes)
        timestep_batches = [torch.zeros(max_bs).to(local_ts) for _ in batch_sizes]
        loss_batches = [torch.zeros(max_bs).to(local_losses) for _ in batch_sizes]
        pad = max_bs - len(local_ts)
        dist.all_gather(timestep_batches, torch.nn.functional.pad(local_ts, (0, pad)))
        dist.all_gather(loss_batches, torch.nn.functional.pad(local_losses, (0, pad)))
        self.update_from_gathered(batch_sizes, timestep_batches, loss_batches)

    def update_from_gathered(self, batch_sizes: list, timestep_batches: list, loss_batches: list) -> None:
        timesteps = [x.item() for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs]]
        losses = [x.item() for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs]]
        self.update_with_all_losses(timesteps, losses)

    def update_with_all_losses(self, ts: Any, losses: Any) -> None:
        for t, loss in zip(ts, losses):
            if self.counts[t] == self.history_per_term:
                self.history[t, :-1] = self.history[t, 1:]
                self.history[t, -1] = loss
            else:
                self.history[t, self.counts[t]] = loss
                self.counts[t] += 1
