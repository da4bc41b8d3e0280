"""The DeepSpeed engine for a job: model, AdamW, lr schedule, ZeRO and precision."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import build_locks, placement
from ..dist import env
from ..models import build_model, set_kernels
from ..placement import PlacementError
from ..spec.job import JobSpec, TrainSpec
from .ds_config import BatchSizes, render_ds_config, resolve_batch

# dtype the model's input is cast to; bf16-mixed keeps fp32 weights and autocasts inside
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32,
                 "fp16": torch.float16}


def lr_factor(train: TrainSpec) -> Callable[[int], float]:
    """lr multiplier at optimizer step k: optional linear warm-up, then the reference's
    linear anneal lr * (1 - k / lr_anneal_steps)."""
    warmup, anneal = train.warmup_steps, train.lr_anneal_steps

    def factor(k: int) -> float:
        value = min(1.0, (k + 1) / warmup) if warmup else 1.0
        if anneal:
            value *= max(0.0, 1.0 - k / anneal)
        return value

    return factor


@dataclass
class EngineBundle:
    engine: Any                 # deepspeed.DeepSpeedEngine
    sizes: BatchSizes
    ds_config: dict[str, Any]
    dtype: torch.dtype


def build_engine(job: JobSpec) -> EngineBundle:
    """Same initial weights on every rank (seeded), wrapped by DeepSpeed with AdamW and the
    lr schedule; DeepSpeed owns masters, loss scaling, accumulation and clipping."""
    import deepspeed

    build_locks.prepare_deepspeed()
    check_accelerator(deepspeed.get_accelerator().device_name(), placement.device())
    world = env.world_size()
    ds_config = render_ds_config(job, world, placement.has_gpu(), placement.fp16_capable())
    torch.manual_seed(job.train.seed)
    model = build_model(job.model)
    set_kernels(model, attention=job.train.attention_kernel, channels_last=job.train.channels_last)
    factor = lr_factor(job.train)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    if job.train.compile:  # compiles engine.module in place: state-dict keys stay the same
        engine.compile()
    return EngineBundle(engine=engine, sizes=resolve_batch(job.train, world),
                        ds_config=ds_config, dtype=COMPUTE_DTYPE[job.precision])


def check_accelerator(accelerator: str, device: torch.device) -> None:
    """DeepSpeed puts the model on its accelerator's device, the trainer puts each batch on
    placement.device(): they must be of one kind, or the first step mixes devices. They part when
    DS_ACCELERATOR=cpu (tests/conftest.py sets it) meets a visible GPU, or DS_ACCELERATOR=cuda
    a rank without one."""
    if accelerator != device.type:
        raise PlacementError(
            f"DeepSpeed's accelerator is {accelerator} (DS_ACCELERATOR) but this rank's device is "
            f"{device}: set DS_ACCELERATOR={device.type} or unset it, or for a CPU run hide the GPUs "
            "(CUDA_VISIBLE_DEVICES=)")


class EngineModel:
    """The model as the diffusion calls it: float32 in, float32 out, so every loss term is
    computed in fp32 (as the reference's fp16 path does). The UNet casts its input to the
    torso's dtype itself and computes its output head in fp32 (Float32Region), so the
    output is not rounded to 16 bit on the way out."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        return self.engine(x.float(), timesteps, **model_kwargs).float()  # [N, C', H, W]


def grad_norm(engine: Any) -> torch.Tensor | float | None:
    """Global gradient norm of the last step, as DeepSpeed computed it; None where the
    plain fp32 ZeRO-0 path computes none (the trainer then measures it before step())."""
    return engine.get_global_grad_norm()
