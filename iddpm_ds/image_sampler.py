"""The image sampler: draw images from a trained model across ranks, write the reference npz.

Public API::

    from iddpm_ds.image_sampler import SampleOptions, sample, write_samples
    from iddpm_ds.weights import WeightsChoice, load_weights, respaced
    loaded = load_weights(WeightsChoice(run_dir=Path("runs/demo")), device=placement.device())
    diffusion = respaced(loaded.diffusion_spec, "ddim50")
    result = sample(loaded.model, diffusion, loaded.model_spec,
                    SampleOptions(num_samples=64, use_ddim=True, seed=0), placement.device())
    if env.is_main():
        write_samples(result.images, result.labels, Path("out"))

This module does the distribution (batches over ranks, gathering, the npz); the DDPM and
DDIM steps are the diffusion's own p_sample / ddim_sample loops, given each image's noise.

Determinism: image i of a run with seed s takes its class label, its x_T and every step's
noise from generators seeded by (s, i) alone. Batch b (images b*B .. b*B+B-1) runs on rank
b % world_size, and rank 0 reassembles the batches in index order, so the same seed gives
the same images (bit for bit, with the same batch size and device type) on any number of
ranks. Labels and x_T come from CPU generators, so they are also the same on CPU and GPU.

Super-resolution (model.small_size set): `SampleOptions.base_samples` holds the low-
resolution images (the reference's super_res_sample.py --base_samples npz: arr_0 uint8
[N, h, w, 3], arr_1 labels when class-conditional; e.g. a base run's own output). Image i
is conditioned on base image i (low_res, and its label), so a cascade keeps the per-image
(seed, index) guarantee: the same seed and npz give the same images on any number of ranks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist

from .dist import env
from .diffusion import SpacedDiffusion
from .images import make_grid, save_png, to_uint8
from .spec.model import ModelSpec
from .weights import SamplingError


@dataclass(frozen=True, eq=False)
class BaseSamples:
    """Low-resolution inputs of a super-resolution model, image i for output image i."""

    images: np.ndarray
    """uint8 [N, h, w, 3]."""
    labels: Optional[np.ndarray] = None
    """int64 [N] (arr_1), or None."""

    def __len__(self) -> int:
        return len(self.images)


def load_base_samples(path: Path, model_spec: ModelSpec) -> BaseSamples:
    """A base-samples npz checked against the super-resolution model (SamplingError)."""
    if model_spec.small_size is None:
        raise SamplingError("--base-samples is for super-resolution models (model.small_size "
                            "set); this is a base model")
    try:
        with np.load(path) as data:
            images = data["arr_0"] if "arr_0" in data else None
            labels = data["arr_1"] if "arr_1" in data else None
    except (OSError, ValueError) as err:
        raise SamplingError(f"cannot read base samples {path}: {err}") from None
    s = model_spec.small_size
    if images is None or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[1:] != (s, s, 3) or not len(images):
        got = "no arr_0" if images is None else f"{images.dtype} {list(images.shape)}"
        raise SamplingError(f"base samples {path}: arr_0 must be uint8 [N, {s}, {s}, 3] "
                            f"(model.small_size={s}), got {got}")
    if model_spec.class_cond:
        if labels is None or labels.shape != (len(images),):
            raise SamplingError(f"base samples {path}: a class-conditional model needs arr_1, "
                                f"one label per image ({len(images)})")
        labels = labels.astype(np.int64)
        if labels.min() < 0 or labels.max() >= model_spec.num_classes:
            raise SamplingError(f"base samples {path}: labels outside 0..{model_spec.num_classes - 1}")
    return BaseSamples(images, labels if model_spec.class_cond else None)


@dataclass(frozen=True)
class SampleOptions:
    """What to sample and how."""

    num_samples: int
    """Images over all ranks."""
    batch_size: int = 16
    """Images per forward pass on one rank."""
    use_ddim: bool = False
    """DDIM steps (Song et al.) instead of ancestral DDPM steps."""
    eta: float = 0.0
    """DDIM noise scale: 0 is deterministic given x_T, 1 is DDPM-like."""
    clip_denoised: bool = True
    """Clip each predicted x_0 to [-1, 1] (the reference's default)."""
    seed: int = 0
    """With the image index, fixes every image's label, x_T and noise."""
    class_labels: Optional[tuple[int, ...]] = None
    """Labels of a class-conditional model, cycled over the images; None draws them at random."""
    progress: bool = True
    """tqdm bar on rank 0."""
    base_samples: Optional[BaseSamples] = None
    """A super-resolution model's low-resolution inputs (and labels); one per image."""

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1:
            raise SamplingError("num_samples and batch_size must be positive")
        if self.seed < 0:
            raise SamplingError(f"seed must be >= 0, got {self.seed}")
        if self.eta < 0:
            raise SamplingError(f"eta must be >= 0, got {self.eta}")
        if self.eta and not self.use_ddim:
            raise SamplingError("eta applies to DDIM only; sample with DDIM or leave eta at 0")
        if self.base_samples is not None and self.num_samples > len(self.base_samples):
            raise SamplingError(f"num_samples={self.num_samples} exceeds the "
                                f"{len(self.base_samples)} base samples")
        if self.base_samples is not None and self.class_labels is not None:
            raise SamplingError("class labels come from the base samples (arr_1); give no "
                                "--class-labels with --base-samples")


@dataclass
class SampleResult:
    images: Optional[np.ndarray]
    """uint8 [N, H, W, 3] in image-index order (rank 0; None elsewhere)."""
    labels: Optional[np.ndarray]
    """int64 [N] for class-conditional models (rank 0; None elsewhere or unconditional)."""
    seconds: float
    img_per_s: float


def check_labels(model_spec: ModelSpec, class_labels: Optional[Sequence[int]],
                 base_samples: Optional[BaseSamples] = None) -> None:
    """SamplingError for labels given to an unconditional model or outside 0..num_classes-1,
    and for a super-resolution model without base samples (or a base model with them)."""
    if model_spec.small_size is not None and base_samples is None:
        raise SamplingError("this is a super-resolution model (model.small_size is set): give "
                            "its low-resolution inputs with --base-samples (an npz, arr_0 uint8 "
                            f"[N, {model_spec.small_size}, {model_spec.small_size}, 3])")
    if model_spec.small_size is None and base_samples is not None:
        raise SamplingError("base samples are for super-resolution models; this is a base model")
    if class_labels is None:
        return
    if not model_spec.class_cond:
        raise SamplingError("class labels were given but the model is not class-conditional")
    bad = [y for y in class_labels if not 0 <= y < model_spec.num_classes]
    if bad or not class_labels:
        raise SamplingError(f"class label(s) {bad} out of range: the model has num_classes="
                            f"{model_spec.num_classes} (labels 0..{model_spec.num_classes - 1})")


def rank_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """Global image indices of this rank's batches: batch b goes to rank b % world_size."""
    starts = range(0, num_samples, batch_size)
    return [range(s, min(s + batch_size, num_samples))
            for b, s in enumerate(starts) if b % world_size == rank]


def image_seeds(seed: int, indices: range) -> list[tuple[int, int, int]]:
    """(label, x_T, step-noise) generator seeds of each image, from (seed, image index) only."""
    seeds = []
    for i in indices:
        words = np.random.SeedSequence([seed, i]).generate_state(3, dtype=np.uint64)
        seeds.append(tuple(int(w) for w in words))
    return seeds


class PerImageNoise:
    """A diffusion noise_fn whose row k comes from image k's own generator: an image's step
    noise then depends on its (seed, index) alone, not on its batch or rank."""

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        # a handful of small randn launches per step, no host sync
        return torch.stack([torch.randn(like.shape[1:], generator=g, device=like.device)
                            for g in self.generators])                      # [n, C, H, W]


def _batch_labels(model_spec: ModelSpec, opts: SampleOptions, indices: range,
                  seeds: list[tuple[int, int, int]]) -> Optional[torch.Tensor]:
    if not model_spec.class_cond:
        return None
    if opts.base_samples is not None:
        return torch.from_numpy(opts.base_samples.labels[indices.start:indices.stop])
    if opts.class_labels is not None:
        return torch.tensor([opts.class_labels[i % len(opts.class_labels)] for i in indices])
    return torch.cat([torch.randint(model_spec.num_classes, (1,),
                                    generator=torch.Generator().manual_seed(s[0])) for s in seeds])


@torch.no_grad()
def sample_batch(model: torch.nn.Module, diffusion: SpacedDiffusion, model_spec: ModelSpec,
                 opts: SampleOptions, indices: range, device: torch.device,
                 bar: Any = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Images [n, 3, H, W] in [-1, 1] and labels [n] (or None) of global image `indices`."""
    seeds = image_seeds(opts.seed, indices)
    shape = (3, model_spec.image_size, model_spec.image_size)
    labels = _batch_labels(model_spec, opts, indices, seeds)                 # [n] or None
    x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s[1]))
                       for s in seeds]).to(device)                           # [n, 3, H, W]
    model_kwargs = {"y": labels.to(device)} if labels is not None else {}
    if opts.base_samples is not None:
        low_res = torch.from_numpy(opts.base_samples.images[indices.start:indices.stop])
        # uint8 [n, h, w, 3] -> [-1, 1] [n, 3, h, w], as the reference's super_res_sample.py
        model_kwargs["low_res"] = (low_res.permute(0, 3, 1, 2).float() / 127.5 - 1).to(device)
    # DDIM at eta 0 scales the step noise by sigma = 0: no generator needs to draw it
    noise_fn = (torch.zeros_like if opts.use_ddim and opts.eta == 0
                else PerImageNoise([s[2] for s in seeds], device))
    loop_kwargs = dict(noise=x_T, clip_denoised=opts.clip_denoised, model_kwargs=model_kwargs,
                       device=device, noise_fn=noise_fn)
    if opts.use_ddim:
        steps = diffusion.ddim_sample_loop_progressive(model, x_T.shape, eta=opts.eta,
                                                       **loop_kwargs)
    else:
        steps = diffusion.p_sample_loop_progressive(model, x_T.shape, **loop_kwargs)
    x = x_T
    for out in steps:
        x = out["sample"]                                                    # [n, 3, H, W]
        if bar is not None:
            bar.update(1)
    return x, labels


def sample(model: torch.nn.Module, diffusion: SpacedDiffusion, model_spec: ModelSpec,
           opts: SampleOptions, device: torch.device) -> SampleResult:
    """opts.num_samples images over all ranks (collective: call on every rank).

    Rank 0 gets every image in index order; the others get None."""
    check_labels(model_spec, opts.class_labels, opts.base_samples)
    rank, world = env.rank(), env.world_size()
    mine = rank_batches(opts.num_samples, opts.batch_size, rank, world)
    rounds = math.ceil(math.ceil(opts.num_samples / opts.batch_size) / world)
    bar = _progress_bar(opts.progress and env.is_main(), rounds * diffusion.num_timesteps)
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    start = time.perf_counter()
    for r in range(rounds):
        indices = mine[r] if r < len(mine) else range(0)
        x, y = sample_batch(model, diffusion, model_spec, opts, indices, device, bar) \
            if len(indices) else (None, None)
        for x_k, y_k in _gather_round(x, y, opts.batch_size, model_spec, device):
            images.append(to_uint8(x_k))
            if y_k is not None:
                labels.append(y_k.numpy())
        if bar is not None:
            done = sum(len(a) for a in images)
            bar.set_postfix(images=done, img_per_s=f"{done / (time.perf_counter() - start):.2f}")
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if not env.is_main():
        return SampleResult(None, None, seconds, opts.num_samples / seconds)
    all_labels = np.concatenate(labels).astype(np.int64) if labels else None
    return SampleResult(np.concatenate(images), all_labels, seconds, opts.num_samples / seconds)


def _progress_bar(show: bool, total: int) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", dynamic_ncols=True)


def _gather_round(x: Optional[torch.Tensor], y: Optional[torch.Tensor], batch_size: int,
                  model_spec: ModelSpec, device: torch.device
                  ) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Every rank's batch of this round, in rank order, on rank 0 (CPU); [] elsewhere.

    Batches are padded to batch_size so one all_gather of images and one of
    (count, labels) serve every backend; runs once per batch, never per step."""
    world = env.world_size()
    if world == 1:
        return [(x.cpu(), y)] if x is not None else []
    size = model_spec.image_size
    x_pad = torch.zeros((batch_size, 3, size, size), device=device)          # [B, 3, H, W]
    meta = torch.zeros(batch_size + 1, dtype=torch.long, device=device)      # count, labels
    if x is not None:
        x_pad[: len(x)] = x
        meta[0] = len(x)
        if y is not None:
            meta[1: 1 + len(y)] = y.to(device)
    xs = [torch.empty_like(x_pad) for _ in range(world)]
    metas = [torch.empty_like(meta) for _ in range(world)]
    torch_dist.all_gather(xs, x_pad)
    torch_dist.all_gather(metas, meta)
    if not env.is_main():
        return []
    out = []
    for x_k, meta_k in zip(xs, metas):
        meta_k = meta_k.cpu()
        n = int(meta_k[0])
        if n:
            out.append((x_k[:n].cpu(), meta_k[1: 1 + n] if model_spec.class_cond else None))
    return out


def output_paths(out: Path, images_shape: Sequence[int]) -> tuple[Path, Path]:
    """(npz, png grid): `out` itself if it ends in .npz, else the reference's file name
    samples_NxHxWx3.npz inside the folder `out`."""
    out = Path(out)
    if out.suffix == ".npz":
        return out, out.with_suffix(".png")
    shape_str = "x".join(str(s) for s in images_shape)
    return out / f"samples_{shape_str}.npz", out / f"samples_{shape_str}.png"


def write_samples(images: np.ndarray, labels: Optional[np.ndarray], out: Path,
                  grid_count: int = 64, grid_scale: int = 1) -> tuple[Path, Path]:
    """The reference's npz (arr_0 uint8 [N, H, W, 3], arr_1 int64 labels when class-
    conditional) and a PNG grid of the first grid_count images; returns both paths."""
    npz_path, png_path = output_paths(out, images.shape)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        np.savez(npz_path, images, labels)
    else:
        np.savez(npz_path, images)
    save_png(make_grid(images[:grid_count]), png_path, scale=grid_scale)
    return npz_path, png_path
