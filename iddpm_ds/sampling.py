"""Sampling from a trained model: load weights, sample across ranks, write the reference npz.

Public API::

    from iddpm_ds.sampling import (load_from_run, load_from_file, respaced, SampleOptions,
                                   sample, write_samples)
    loaded = load_from_run("runs/demo", weights="ema", ema_rate=0.9999, device=dist.device())
    diffusion = respaced(loaded.diffusion_spec, "ddim50")
    result = sample(loaded.model, diffusion, loaded.model_spec,
                    SampleOptions(num_samples=64, use_ddim=True, seed=0), dist.device())
    if dist.is_main():
        write_samples(result.images, result.labels, Path("out"))

Determinism: image i of a run with seed s takes its class label, its x_T and every step's
noise from generators seeded by (s, i) alone. Batch b (images b*B .. b*B+B-1) runs on rank
b % world_size, and rank 0 reassembles the batches in index order, so the same seed gives
the same images (bit for bit, with the same batch size and device type) on any number of
ranks. Labels and x_T come from CPU generators, so they are also the same on CPU and GPU.
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

from . import dist
from .diffusion import SpacedDiffusion, build_diffusion
from .images import make_grid, save_png, to_uint8
from .models import build_model
from .spec.diffusion import DiffusionSpec
from .spec.model import ModelSpec
from .train import checkpoint as ckpt


class SamplingError(ValueError):
    """Bad input for sampling or evaluation; the message says what is wrong and what exists."""


# ----------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its weights, and the specs it was built from."""

    model: torch.nn.Module
    model_spec: ModelSpec
    diffusion_spec: DiffusionSpec
    source: Path
    """The weights file."""
    weights: str
    """"model" or "ema_<rate>" (from the reference's file names), else "file"."""
    step: Optional[int] = None
    """Training step of the checkpoint (None for a file outside a run dir)."""


def find_checkpoint(run_dir: Path, step: Optional[int] = None) -> Path:
    """The tag directory of the newest complete checkpoint of run_dir, or the one at `step`."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise SamplingError(f"run directory {run_dir} does not exist")
    tags = ckpt.complete_tags(ckpt_dir)
    if not tags:
        raise SamplingError(f"{run_dir} has no complete checkpoint (looked in {ckpt_dir})")
    if step is None:
        tag, _ = ckpt.find_resume_tag(ckpt_dir)
        return ckpt_dir / tag
    if ckpt.tag_for(step) not in tags:
        steps = [ckpt.step_of(t) for t in tags]
        raise SamplingError(f"{run_dir} has no complete checkpoint at step {step}; "
                            f"available steps: {steps}")
    return ckpt_dir / ckpt.tag_for(step)


def available_ema_rates(tag_dir: Path) -> list[str]:
    """EMA rates (as written in the file names) exported in one checkpoint directory."""
    suffix = f"_{ckpt.step_of(tag_dir.name):06d}.pt"
    names = [p.name for p in tag_dir.glob(f"ema_*{suffix}")]
    return sorted((n[len("ema_"):-len(suffix)] for n in names), key=float)


def weights_path(tag_dir: Path, weights: str = "ema", ema_rate: Optional[float] = None) -> Path:
    """The exported weights file of a checkpoint: the raw model or the EMA at `ema_rate`
    (default: the job's first rate, the one its sample grids use)."""
    step = ckpt.step_of(tag_dir.name)
    if weights == "model":
        return tag_dir / ckpt.export_name_model(step)
    if weights != "ema":
        raise SamplingError(f"weights must be 'ema' or 'model', got {weights!r}")
    rates = available_ema_rates(tag_dir)
    if not rates:
        raise SamplingError(f"{tag_dir} holds no EMA weights; use weights 'model'")
    if ema_rate is None:
        job_rates = _trainer_state(tag_dir).get("ema_rates") or []
        first = next((r for r in rates if job_rates and float(r) == float(job_rates[0])), rates[0])
        return tag_dir / f"ema_{first}_{step:06d}.pt"
    match = [r for r in rates if float(r) == float(ema_rate)]
    if not match:
        raise SamplingError(f"no EMA weights at rate {ema_rate} in {tag_dir}; available rates: "
                            f"{', '.join(rates)} (or use the raw weights: weights 'model')")
    return tag_dir / f"ema_{match[0]}_{step:06d}.pt"


def _trainer_state(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / "trainer_state.pt"
    return ckpt.load_plain(path) if path.is_file() else {}


def run_specs(run_dir: Path, tag_dir: Optional[Path] = None) -> tuple[ModelSpec, DiffusionSpec]:
    """Model and diffusion specs a run trained with: the checkpoint's resolved spec, else
    run_dir/job.yaml. Only those two sections are read, so other sections may have changed."""
    raw = _trainer_state(tag_dir).get("spec") if tag_dir is not None else None
    if raw is None:
        path = Path(run_dir) / "job.yaml"
        if not path.is_file():
            raise SamplingError(f"{run_dir} has neither a checkpoint spec nor job.yaml; "
                                "give the model spec (a job file or reference flags)")
        import yaml

        raw = yaml.safe_load(path.read_text()) or {}
    return specs_from_sections(raw, f"the spec stored in {run_dir}")


def load_from_run(run_dir: Path, *, step: Optional[int] = None, weights: str = "ema",
                  ema_rate: Optional[float] = None, model_spec: Optional[ModelSpec] = None,
                  diffusion_spec: Optional[DiffusionSpec] = None,
                  device: torch.device = torch.device("cpu")) -> LoadedModel:
    """Weights of a run dir's checkpoint (newest complete, or `step`), EMA or raw.

    The specs default to the ones the run trained with; passing others checks the weights
    against them (a mismatch is a SamplingError naming the differing keys)."""
    tag_dir = find_checkpoint(Path(run_dir), step)
    path = weights_path(tag_dir, weights, ema_rate)
    if model_spec is None or diffusion_spec is None:
        stored_model, stored_diffusion = run_specs(Path(run_dir), tag_dir)
        model_spec = model_spec or stored_model
        diffusion_spec = diffusion_spec or stored_diffusion
    model = build_checked(model_spec, _load_state(path), str(path), device)
    return LoadedModel(model, model_spec, diffusion_spec, path, _weights_label(path),
                       ckpt.step_of(tag_dir.name))


def load_from_file(path: Path, model_spec: Optional[ModelSpec] = None,
                   diffusion_spec: Optional[DiffusionSpec] = None,
                   device: torch.device = torch.device("cpu")) -> LoadedModel:
    """A plain state-dict file: the reference's model/ema .pt files or one of our exports.

    Without specs, a file inside one of our checkpoint directories takes its run's specs."""
    path = Path(path)
    if not path.is_file():
        raise SamplingError(f"weights file {path} does not exist")
    step = None
    if (path.parent / "trainer_state.pt").is_file() and ckpt.TAG_RE.match(path.parent.name):
        step = ckpt.step_of(path.parent.name)
        if model_spec is None or diffusion_spec is None:
            stored = run_specs(path.parent.parent.parent, path.parent)
            model_spec, diffusion_spec = model_spec or stored[0], diffusion_spec or stored[1]
    if model_spec is None or diffusion_spec is None:
        raise SamplingError(f"{path} is not inside a run's checkpoint: give the model spec "
                            "(a job file, or the reference flags it was trained with)")
    model = build_checked(model_spec, _load_state(path), str(path), device)
    return LoadedModel(model, model_spec, diffusion_spec, path, _weights_label(path), step)


def _weights_label(path: Path) -> str:
    """"model" / "ema_<rate>" for files named as the reference names them, else "file"."""
    import re

    match = re.match(r"^(model|ema_[0-9.eE+-]+)_?\d+\.pt$", path.name)
    return match.group(1) if match else "file"


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SamplingError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors come in many types; any means unreadable
        raise SamplingError(f"cannot read {path} as a state dict: "
                            f"{type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SamplingError(f"{path} is not a plain state dict (name -> tensor); for a DeepSpeed "
                            "checkpoint use the exported model/ema files next to it")
    return state


def build_checked(model_spec: ModelSpec, state: dict[str, torch.Tensor], source: str,
                  device: torch.device) -> torch.nn.Module:
    """The model of model_spec with `state` loaded strictly, in eval mode on `device`."""
    model = build_model(model_spec)
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """SamplingError naming missing/unexpected keys and shape mismatches, if there are any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches (file vs model)", shapes)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:5])}{more}")
    raise SamplingError(f"{source} does not match the requested model spec "
                        "(image_size, num_channels, num_res_blocks, channel_mult, "
                        "attention_resolutions, learn_sigma, class_cond ...): " + "; ".join(parts))


def parse_reference_flags(tokens: Sequence[str]) -> dict[str, Any]:
    """Reference flags as the reference's scripts take them ("--image_size 64 --learn_sigma
    True", shell-split) or as key=value pairs, to a flag dict for `specs_from_flags`.
    Values are read as YAML scalars (True/False, numbers); "" stays an empty string."""
    import shlex

    import yaml

    words = [w for token in tokens for w in shlex.split(token)]
    flags: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if "=" in word:
            key, raw = word.split("=", 1)
            i += 1
        elif word.startswith("--") and i + 1 < len(words):
            key, raw = word, words[i + 1]
            i += 2
        else:
            raise SamplingError(f"model flag {word!r} has no value: use key=value or --key value")
        key = key.lstrip("-").replace("-", "_")
        flags[key] = yaml.safe_load(raw) if raw != "" else ""
    return flags


def specs_from_reference_flags(tokens: Sequence[str]) -> tuple[ModelSpec, DiffusionSpec]:
    """(ModelSpec, DiffusionSpec) of reference flags (see parse_reference_flags)."""
    from .spec.flags import specs_from_flags

    try:
        return specs_from_flags(parse_reference_flags(tokens))
    except ValueError as err:
        raise SamplingError(f"bad model flags: {_one_line(err)}") from None


def specs_from_job_file(path: Path) -> tuple[ModelSpec, DiffusionSpec]:
    """The model and diffusion sections of a job YAML (other sections are not needed and
    not checked); learn_sigma set in either section applies to both, as in a JobSpec."""
    from .spec.errors import JobError
    from .spec.job import read_job_yaml

    try:
        raw = read_job_yaml(path)[0] or {}
    except JobError as err:  # missing file, YAML syntax (with line and column)
        raise SamplingError(str(err)) from None
    if not isinstance(raw, dict):
        raise SamplingError(f"{path}: a job file is a mapping of sections, got {type(raw).__name__}")
    return specs_from_sections(raw, str(path))


def specs_from_sections(raw: dict[str, Any], where: str) -> tuple[ModelSpec, DiffusionSpec]:
    """(ModelSpec, DiffusionSpec) of a job mapping's model and diffusion sections; learn_sigma
    set in either applies to both, as in a JobSpec. `where` names the source in errors."""
    from .spec.job import share_learn_sigma

    sections = {name: raw.get(name) or {} for name in ("model", "diffusion")}
    if not all(isinstance(v, dict) for v in sections.values()):
        raise SamplingError(f"{where}: the model and diffusion sections must be mappings")
    try:
        sections = share_learn_sigma(sections)
        specs = (ModelSpec.model_validate(sections["model"]),
                 DiffusionSpec.model_validate(sections["diffusion"]))
    except ValueError as err:
        raise SamplingError(f"{where}: invalid model/diffusion section: {_one_line(err)}") from None
    if specs[0].learn_sigma != specs[1].learn_sigma:
        raise SamplingError(f"{where}: model.learn_sigma contradicts diffusion.learn_sigma")
    return specs


def _one_line(err: ValueError) -> str:
    """A pydantic ValidationError as 'field: message; ...', any other error as its text."""
    from pydantic import ValidationError

    from .spec.errors import describe

    return describe(err) if isinstance(err, ValidationError) else str(err)


def respaced(spec: DiffusionSpec, respacing: Optional[str]) -> SpacedDiffusion:
    """The diffusion of `spec` at another respacing (None keeps the spec's own)."""
    if respacing is None:
        return build_diffusion(spec)
    try:
        return build_diffusion(spec.with_respacing(respacing))
    except ValueError as err:
        raise SamplingError(f"respacing {respacing!r} cannot be used with "
                            f"diffusion_steps={spec.diffusion_steps}: {_one_line(err)}") from None


# ---------------------------------------------------------------------------- sampling
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

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1:
            raise SamplingError("num_samples and batch_size must be positive")
        if self.seed < 0:
            raise SamplingError(f"seed must be >= 0, got {self.seed}")
        if self.eta < 0:
            raise SamplingError(f"eta must be >= 0, got {self.eta}")
        if self.eta and not self.use_ddim:
            raise SamplingError("eta applies to DDIM only; sample with DDIM or leave eta at 0")


@dataclass
class SampleResult:
    images: Optional[np.ndarray]
    """uint8 [N, H, W, 3] in image-index order (rank 0; None elsewhere)."""
    labels: Optional[np.ndarray]
    """int64 [N] for class-conditional models (rank 0; None elsewhere or unconditional)."""
    seconds: float
    img_per_s: float


def check_labels(model_spec: ModelSpec, class_labels: Optional[Sequence[int]]) -> None:
    """SamplingError for labels given to an unconditional model or outside 0..num_classes-1."""
    if model_spec.small_size is not None:
        raise SamplingError("this is a super-resolution model (model.small_size is set): it needs "
                            "low-resolution inputs; iddpm-sample samples base models only")
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


class _Coefficients:
    """The diffusion's float64 tables on one device, gathered at t then cast to float32
    (the diffusion's own precision rule), shaped [N, 1, 1, 1] to broadcast against x."""

    NAMES = ("alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
             "sqrt_recipm1_alphas_cumprod")

    def __init__(self, diffusion: SpacedDiffusion, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # no float64 on MPS
        self.tables = {n: torch.from_numpy(np.ascontiguousarray(getattr(diffusion, n)))
                       .to(device=device, dtype=dtype) for n in self.NAMES}

    def at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.tables[name][t].float().reshape(-1, *([1] * (x.dim() - 1)))


def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (t != 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # [N, 1, 1, 1]


def ddpm_step(diffusion: SpacedDiffusion, model: Any, x: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor, clip_denoised: bool, model_kwargs: dict) -> torch.Tensor:
    """x_t -> x_{t-1} ~ p(x_{t-1} | x_t) with the given noise (none added at t == 0):
    the diffusion's p_sample, with the noise passed in instead of drawn from the global RNG."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                    model_kwargs=model_kwargs)
    return out["mean"] + _nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise


def ddim_step(diffusion: SpacedDiffusion, coefs: _Coefficients, model: Any, x: torch.Tensor,
              t: torch.Tensor, noise: Optional[torch.Tensor], eta: float, clip_denoised: bool,
              model_kwargs: dict) -> torch.Tensor:
    """One DDIM step (Song et al. 2020, eq. 12), the diffusion's ddim_sample with the noise
    passed in; noise None means eta == 0 (deterministic)."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                    model_kwargs=model_kwargs)
    pred_xstart = out["pred_xstart"]                                       # [N, C, H, W]
    # eps re-derived from the (possibly clipped) x_0, so the step is consistent with it
    eps = ((coefs.at("sqrt_recip_alphas_cumprod", t, x) * x - pred_xstart)
           / coefs.at("sqrt_recipm1_alphas_cumprod", t, x))
    alpha_bar = coefs.at("alphas_cumprod", t, x)
    alpha_bar_prev = coefs.at("alphas_cumprod_prev", t, x)
    sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
             * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
    sample = (pred_xstart * torch.sqrt(alpha_bar_prev)
              + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
    if noise is not None:
        sample = sample + _nonzero_mask(t, x) * sigma * noise
    return sample


def _batch_labels(model_spec: ModelSpec, opts: SampleOptions, indices: range,
                  seeds: list[tuple[int, int, int]]) -> Optional[torch.Tensor]:
    if not model_spec.class_cond:
        return None
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
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s[1]))
                     for s in seeds]).to(device)                             # [n, 3, H, W]
    model_kwargs = {"y": labels.to(device)} if labels is not None else {}
    # One generator per image keeps its noise independent of the batch it lands in and
    # of the rank count; a handful of small randn launches per step, no host sync.
    gens = None if opts.use_ddim and opts.eta == 0 else [
        torch.Generator(device).manual_seed(s[2]) for s in seeds]
    coefs = _Coefficients(diffusion, device) if opts.use_ddim else None
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((len(indices),), i, device=device, dtype=torch.long)  # [n]
        noise = None if gens is None else torch.stack(
            [torch.randn(shape, generator=g, device=device) for g in gens])  # [n, 3, H, W]
        if opts.use_ddim:
            x = ddim_step(diffusion, coefs, model, x, t, noise, opts.eta, opts.clip_denoised,
                          model_kwargs)
        else:
            x = ddpm_step(diffusion, model, x, t, noise, opts.clip_denoised, model_kwargs)
        if bar is not None:
            bar.update(1)
    return x, labels


def sample(model: torch.nn.Module, diffusion: SpacedDiffusion, model_spec: ModelSpec,
           opts: SampleOptions, device: torch.device) -> SampleResult:
    """opts.num_samples images over all ranks (collective: call on every rank).

    Rank 0 gets every image in index order; the others get None."""
    check_labels(model_spec, opts.class_labels)
    rank, world = dist.rank(), dist.world_size()
    mine = rank_batches(opts.num_samples, opts.batch_size, rank, world)
    rounds = math.ceil(math.ceil(opts.num_samples / opts.batch_size) / world)
    bar = _progress_bar(opts.progress and dist.is_main(), rounds * diffusion.num_timesteps)
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
    if not dist.is_main():
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
    world = dist.world_size()
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
    if not dist.is_main():
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
