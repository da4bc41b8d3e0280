"""Render the one DeepSpeed config of a job: engine templates + the spec's own knobs."""
from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..spec.job import SPEC_OWNED, DeepSpeedSpec, JobSpec, TrainSpec, deep_merge, owned_keys_in

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
# the DeepSpeed version whose ZeRO-0 fp16 backward was measured (loss_scale.py scales the
# loss where it does not); fp16 + ZeRO-0 on another version is refused, not guessed
ZERO0_FP16_VERIFIED = "0.19.8"

class ConfigError(ValueError):
    """A job whose engine configuration cannot work; the message names the field."""


@dataclass(frozen=True)
class BatchSizes:
    """The batch triangle: global = micro x accumulation x world."""

    world_size: int
    per_rank: int
    micro: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world_size


def resolve_batch(train: TrainSpec, world_size: int) -> BatchSizes:
    """Apply the job's batch policy at this world size and check the triangle."""
    if train.global_batch_size is not None:
        if train.global_batch_size % world_size:
            raise ConfigError(
                f"train.global_batch_size={train.global_batch_size} is not divisible by the "
                f"world size {world_size}; choose a multiple of {world_size} or set train.batch_size")
        per_rank = train.global_batch_size // world_size
    else:
        per_rank = train.batch_size
    micro = train.microbatch if train.microbatch > 0 else per_rank
    if per_rank % micro:
        raise ConfigError(f"per-rank batch {per_rank} (world size {world_size}) is not a multiple "
                          f"of train.microbatch={micro}")
    sizes = BatchSizes(world_size=world_size, per_rank=per_rank, micro=micro,
                     accumulation=per_rank // micro)
    assert sizes.global_batch == sizes.micro * sizes.accumulation * world_size
    return sizes


def _template(name: str) -> dict[str, Any]:
    path = Path(name)
    if not path.is_file():
        path = DS_CONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"deepspeed.template {name!r} not found (looked in {DS_CONFIG_DIR})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"deepspeed.template {name!r}: {path} is not readable JSON "
                          f"({' '.join(str(err).split())})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"deepspeed.template {name!r}: {path} must hold a JSON object")
    return config


def _engine_settings(ds: DeepSpeedSpec, precision: str, has_gpu: bool) -> dict[str, Any]:
    names = ["base.json", f"zero{ds.zero_stage}.json"]
    names += [f"{precision}.json"] if precision != "fp32" else []
    names += ["offload_optimizer.json"] if ds.offload_optimizer else []
    names += ["offload_param.json"] if ds.offload_param else []
    config: dict[str, Any] = {}
    for name in names:
        config = deep_merge(config, _template(name))
    user = [(_template(ds.template), f"deepspeed.template {ds.template}")] if ds.template else []
    user.append((ds.overrides, "deepspeed.overrides"))
    for extra, where in user:
        owned = owned_keys_in(extra)
        if owned:
            raise ConfigError(f"{where} sets {owned[0]}, which the job spec owns: set "
                              f"{SPEC_OWNED[owned[0]]} instead")
        config = deep_merge(config, extra)
    if not has_gpu:  # pinned host memory needs a GPU driver
        for key in ("offload_optimizer", "offload_param"):
            if key in config.get("zero_optimization", {}):
                config["zero_optimization"][key]["pin_memory"] = False
    return config


def render_ds_config(job: JobSpec, world_size: int, has_gpu: bool,
                     fp16_ok: bool | None = None) -> dict[str, Any]:
    """The final DeepSpeed config for this job at this world size. `fp16_ok` (default:
    `has_gpu`) is whether fp16 may run here: a GPU, or the CPU test seam (placement.fp16_capable)."""
    if job.precision == "fp16" and not (has_gpu if fp16_ok is None else fp16_ok):
        raise ConfigError("precision: fp16 needs a GPU (DeepSpeed's CPU accelerator refuses fp16); "
                          "use precision: bf16 or fp32 on this machine")
    _check_fp16_stage(job)
    sizes = resolve_batch(job.train, world_size)
    config = _engine_settings(job.deepspeed, job.precision, has_gpu)
    train = job.train
    offload = job.deepspeed.offload_optimizer
    torch_adam = {"torch_adam": False} if offload else {"torch_adam": True, "fused": True}
    config = deep_merge(config, {
        "train_batch_size": sizes.global_batch,
        "train_micro_batch_size_per_gpu": sizes.micro,
        "gradient_accumulation_steps": sizes.accumulation,
        # torch_adam: the reference's torch AdamW update; the CPU-offload path swaps in
        # DeepSpeedCPUAdam, which implements the same update. fused: torch's fused kernel,
        # the one that takes a device-side skip flag (found_inf), which the divergence
        # guard (guard.py) sets without a host sync.
        "optimizer": {"type": "AdamW", "params": {
            "lr": train.lr, "weight_decay": train.weight_decay, "betas": [0.9, 0.999],
            "eps": 1e-8, **torch_adam}},
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": job.precision == "bf16"},
        "fp16": {"enabled": job.precision == "fp16"},
        "zero_optimization": {"stage": job.deepspeed.zero_stage},
    })
    return deep_merge(config, _speed_settings(job))


def installed_deepspeed() -> str:
    """DeepSpeed's installed version, without importing it (--check stays fast)."""
    return importlib.metadata.version("deepspeed")


def _check_fp16_stage(job: JobSpec) -> None:
    if job.precision != "fp16" or job.deepspeed.zero_stage != 0:
        return
    installed = installed_deepspeed()
    if installed != ZERO0_FP16_VERIFIED:
        raise ConfigError(
            f"precision: fp16 with deepspeed.zero_stage: 0 is verified on DeepSpeed "
            f"{ZERO0_FP16_VERIFIED} only (installed: {installed}, whose ZeRO-0 loss scaling may "
            "differ); use deepspeed.zero_stage: 1")


# torch.optim.AdamW keyword arguments per train.adamw_kernel (DeepSpeed passes them on)
ADAMW_KERNEL = {"fused": {"fused": True, "foreach": None}, "foreach": {"fused": False, "foreach": True},
                "loop": {"fused": False, "foreach": False}}


def _speed_settings(job: JobSpec) -> dict[str, Any]:
    """Precision autocast and optimizer kernel: the spec's speed levers that live in the
    DeepSpeed config (compile, channels_last and attention act on the model, engine.py)."""
    out: dict[str, Any] = {}
    if job.precision == "bf16-mixed":
        # fp32 weights and gradients; DeepSpeed wraps forward in torch.autocast(bf16). The
        # UNet keeps its fp32 regions itself (unet.py); bf16-mixed.json names the modules
        # whose gradients may be communicated in bf16 (the convolutions, as the reference)
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if not job.deepspeed.offload_optimizer:
        out["optimizer"] = {"params": ADAMW_KERNEL[job.train.adamw_kernel]}
    return out
