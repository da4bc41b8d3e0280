"""JobSpec: one validated YAML file describes a whole training job.

Sections: model, diffusion (reference flags), data, train, precision, deepspeed (engine
settings only), output. Batch sizes, lr and precision live here and nowhere else; the
DeepSpeed config is rendered from this spec by `iddpm_ds.train.ds_config`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, field_validator, model_validator

from .base import Spec
from .data import DataSpec
from .diffusion import DiffusionSpec
from .model import ModelSpec
from .sampler import SamplerSpec


class TrainSpec(Spec):
    """Optimisation, batch sizes and intervals."""

    batch_size: Optional[int] = Field(None, ge=1)
    """Per-rank batch (the reference's meaning). Set this OR global_batch_size: whichever is set
    stays fixed when the number of GPUs changes."""
    global_batch_size: Optional[int] = Field(None, ge=1)
    """Batch over all ranks per optimizer step; per-rank batch = global / world size (must divide)."""
    microbatch: int = -1
    """Per-rank micro-batch for gradient accumulation; -1 disables accumulation (reference)."""
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    lr_anneal_steps: int = Field(0, ge=0)
    """Anneal the lr linearly to 0 at this step (0: constant lr) and stop there, as the reference."""
    warmup_steps: int = Field(0, ge=0)
    """Linear lr warm-up over this many optimizer steps (0: none, as the reference)."""
    ema_rate: tuple[float, ...] = (0.9999,)
    """EMA decay rates, "0.9999,0.999" or a list; one EMA copy of the fp32 weights per rate."""
    grad_clip: float = Field(0.0, ge=0)
    """Clip the global gradient norm to this value (0: no clipping, as the reference)."""
    max_steps: Optional[int] = Field(None, ge=1)
    """Stop after this many optimizer steps (default: lr_anneal_steps, else run until stopped)."""
    seed: int = 0
    """Seed for model init (same on all ranks) and, offset by rank, for noise, t and data order."""
    compile: bool = False
    """torch.compile the model through DeepSpeed's engine (`engine.compile()`, inductor
    backend): forward and backward run as generated fused kernels. The first steps are slow
    while it compiles (minutes for large models); weights, checkpoints and numerics
    (up to kernel rounding) are unchanged."""
    channels_last: bool = False
    """Feed the model channels_last (NHWC) activations and keep conv weights that way: the
    layout GPU tensor cores and CPU oneDNN convolutions run fastest on. Same results."""
    adamw_kernel: Literal["fused", "foreach", "loop"] = "fused"
    """torch AdamW implementation: "fused" (one kernel for all tensors), "foreach" (batched
    ops) or "loop" (one tensor at a time). Same update; speed only. Not with
    deepspeed.offload_optimizer, which runs DeepSpeed's CPU Adam."""
    attention_kernel: Literal["sdpa", "math"] = "sdpa"
    """Self-attention kernel: "sdpa" (torch's scaled_dot_product_attention, flash /
    memory-efficient kernels where the device has them) or "math" (the reference's explicit
    q k^T, float32 softmax, times v). Same result up to rounding."""
    schedule_sampler: SamplerSpec = SamplerSpec()
    """Timestep sampler: "uniform" or "loss-second-moment" (or a mapping with its options)."""
    log_interval: int = Field(10, ge=1)
    """Optimizer steps between metric logs (the only time metrics are read from the device)."""
    save_interval: int = Field(10000, ge=1)
    """Optimizer steps between checkpoints (one is also written at the end)."""
    sample_interval: int = Field(0, ge=0)
    """Optimizer steps between EMA sample grids (0: only at evaluations, see eval_interval)."""
    sample_count: int = Field(16, ge=1)
    """Images in each sample grid."""
    sample_respacing: str = "ddim25"
    """Respacing for sample grids (DDIM when it starts with "ddim")."""
    eval_interval: int = Field(0, ge=0)
    """Optimizer steps between held-out bits/dim evaluations, each with a sample grid
    (0: never; needs data.eval_shards)."""
    eval_samples: int = Field(64, ge=1)
    """Held-out images per evaluation (over all ranks)."""
    eval_respacing: str = "50"
    """Respacing used for the bits/dim estimate during training (full T is slow)."""
    preempt_check_interval: int = Field(1, ge=1)
    """Optimizer steps between the cross-rank check for a preemption signal (one tiny collective)."""

    @field_validator("ema_rate", mode="before")
    @classmethod
    def _rates(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(v) for v in value.split(",") if v.strip())
        if isinstance(value, (int, float)):
            return (float(value),)
        return value

    @field_validator("schedule_sampler", mode="before")
    @classmethod
    def _sampler_shorthand(cls, value: object) -> object:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        if (self.batch_size is None) == (self.global_batch_size is None):
            raise ValueError("set exactly one of train.batch_size (per rank, fixed when the GPU "
                             "count changes) or train.global_batch_size (fixed over all ranks)")
        if self.microbatch == 0 or self.microbatch < -1:
            raise ValueError("train.microbatch must be -1 (off) or a positive per-rank size")
        if self.batch_size is not None and self.microbatch > 0 and self.batch_size % self.microbatch:
            raise ValueError(f"train.batch_size={self.batch_size} is not a multiple of "
                             f"train.microbatch={self.microbatch}")
        if any(not 0.0 < r < 1.0 for r in self.ema_rate) or not self.ema_rate:
            raise ValueError(f"train.ema_rate values must lie in (0, 1), got {list(self.ema_rate)}")
        if len(set(self.ema_rate)) != len(self.ema_rate):
            raise ValueError(f"train.ema_rate has duplicates: {list(self.ema_rate)}")
        return self

    @property
    def total_steps(self) -> Optional[int]:
        return self.max_steps or (self.lr_anneal_steps or None)


class DeepSpeedSpec(Spec):
    """Engine settings: which ZeRO stage and offloads, from which template, plus raw overrides.
    Batch sizes, lr, optimizer and precision are NOT set here (they are the train/precision
    sections' knobs); overrides that try are rejected."""

    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage: 0 (data parallel), 1 (optimizer states sharded), 2 (+gradients), 3 (+parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and fp32 masters) in CPU memory (ZeRO-Offload; stage >= 1)."""
    offload_param: bool = False
    """Keep parameters in CPU memory (ZeRO-Infinity; stage 3 only)."""
    template: Optional[str] = None
    """Extra engine template: a file name in ds_configs/ or a path, merged over the built-in ones."""
    overrides: dict[str, Any] = {}
    """Raw DeepSpeed config keys merged last (engine settings only, e.g. communication tuning)."""

    @model_validator(mode="after")
    def _check(self) -> "DeepSpeedSpec":
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        return self


class OutputSpec(Spec):
    """Where the run writes, and how much it keeps."""

    run_dir: Path
    """Run directory: resolved spec, checkpoints, metrics (JSONL, TensorBoard), sample grids.
    Restarting a job with the same run_dir resumes from its latest complete checkpoint."""
    keep_checkpoints: int = Field(3, ge=1)
    """Keep this many most recent checkpoints; older ones are deleted after a save completes."""
    tensorboard: bool = True
    """Also write TensorBoard event files (metrics/ and sample grids)."""


class JobSpec(Spec):
    """A complete training job."""

    model: ModelSpec = ModelSpec()
    """The UNet (reference flags)."""
    diffusion: DiffusionSpec = DiffusionSpec()
    """The Gaussian diffusion (reference flags)."""
    data: DataSpec
    """Training (and held-out) WebDataset shards."""
    train: TrainSpec
    """Optimisation, batch sizes, intervals."""
    precision: Literal["fp32", "bf16", "bf16-mixed", "fp16"] = "fp32"
    """Training precision. bf16/fp16 cast the whole model to 16 bit and keep fp32 master
    weights (fp16 with dynamic loss scaling, GPU only). bf16-mixed is the reference's
    scheme: fp32 weights, the UNet torso's convolutions and attention autocast to bf16, the
    timestep/label embeddings, norms and output layer in fp32."""
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    """Engine settings."""
    output: OutputSpec
    """Run directory and retention."""

    @model_validator(mode="before")
    @classmethod
    def _share_learn_sigma(cls, data: Any) -> Any:
        """learn_sigma is one reference flag used by model and diffusion: setting it in either
        section sets both; contradicting values are an error."""
        if not isinstance(data, dict):
            return data
        model = dict(data.get("model") or {})
        diffusion = dict(data.get("diffusion") or {})
        if isinstance(model, dict) and isinstance(diffusion, dict):
            ms, ds = model.get("learn_sigma"), diffusion.get("learn_sigma")
            if ms is not None and ds is not None and bool(ms) != bool(ds):
                raise ValueError(f"model.learn_sigma={ms} contradicts diffusion.learn_sigma={ds}")
            value = ms if ms is not None else ds
            if value is not None:
                model["learn_sigma"] = diffusion["learn_sigma"] = value
                data = {**data, "model": model, "diffusion": diffusion}
        return data

    @model_validator(mode="after")
    def _check(self) -> "JobSpec":
        if self.train.eval_interval and not self.data.eval_shards:
            raise ValueError("train.eval_interval needs data.eval_shards")
        if self.deepspeed.offload_optimizer and "adamw_kernel" in self.train.model_fields_set:
            raise ValueError("train.adamw_kernel does not apply with deepspeed.offload_optimizer "
                             "(DeepSpeed's CPU Adam steps the optimizer); remove one of them")
        for field in ("sample_respacing", "eval_respacing"):
            value = getattr(self.train, field)
            try:
                self.diffusion.with_respacing(value)
            except ValueError as err:
                raise ValueError(f"train.{field}={value!r}: {err}") from None
        return self


def parse_overrides(sets: list[str]) -> dict[str, Any]:
    """`["train.lr=2e-4", "model.dropout=0.1"]` -> nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ValueError(f"--set has an empty key in {item!r}")
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r} conflicts with another --set")
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return tree


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_job(path: Path | str, sets: list[str] | None = None) -> JobSpec:
    """Read a job YAML, apply `--set` overrides, validate. Relative data paths stay as
    written (relative to the working directory, like every CLI path)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"job file {path} must hold a mapping of sections, got {type(raw).__name__}")
    return JobSpec.model_validate(deep_merge(raw, parse_overrides(sets or [])))


def dump_job(job: JobSpec) -> str:
    """The resolved spec as YAML (every default spelled out), as written to the run dir."""
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)
