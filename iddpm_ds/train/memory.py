"""Per-rank memory estimate of the model states for a ZeRO stage (for `--check`)."""
from __future__ import annotations

import torch

from ..models import build_model
from ..spec.job import JobSpec
from ..spec.model import ModelSpec


def count_parameters(spec: ModelSpec) -> int:
    """The model's exact parameter count, built on the meta device: shapes only, so the
    280M-parameter paper models are counted in a fraction of a second and no memory."""
    with torch.device("meta"):
        model = build_model(spec)
    return sum(p.numel() for p in model.parameters())


def model_state_bytes(num_params: int, job: JobSpec, world_size: int) -> dict[str, float]:
    """Bytes per rank of weights, gradients, fp32 masters + Adam moments, and EMA copies.

    ZeRO paper accounting: mixed precision keeps 2-byte weights and gradients plus 12 bytes
    of fp32 master + two Adam moments; fp32 keeps 4-byte weights and gradients, 8 bytes of
    moments and no separate master. Stage 1 shards the optimizer states, 2 also the
    gradients, 3 also the weights. The EMA follows the masters' layout (sharded from 1 on).
    """
    p, n, stage = num_params, world_size, job.deepspeed.zero_stage
    mixed = job.precision in ("bf16", "fp16")  # bf16-mixed keeps fp32 weights and gradients
    weight, grad, opt = (2, 2, 12) if mixed else (4, 4, 8)
    ema = 4 * len(job.train.ema_rate)
    shard = {"weights": stage >= 3, "grads": stage >= 2, "optimizer": stage >= 1, "ema": stage >= 1}
    out = {
        "weights": weight * p / (n if shard["weights"] else 1),
        "grads": grad * p / (n if shard["grads"] else 1),
        "optimizer": opt * p / (n if shard["optimizer"] else 1),
        "ema": ema * p / (n if shard["ema"] else 1),
    }
    if job.deepspeed.offload_optimizer:
        out["optimizer_on_cpu"] = out.pop("optimizer")
        out["ema_on_cpu"] = out.pop("ema")
    if job.deepspeed.offload_param:
        out["weights_on_cpu"] = out.pop("weights")
    return out
