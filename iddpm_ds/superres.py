"""Super-resolution inputs: the low-resolution image a SuperResModel is conditioned on.

As the reference's super_res_train.py, `low_res` is the training image area-downsampled
(F.interpolate mode="area") to model.small_size; the model upsamples it back bilinearly
and concatenates it to x_t. Training, in-training grids/eval and bits/dim all derive it
here, on the device, from the full-resolution batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec.model import ModelSpec


def downsample(images: torch.Tensor, small_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, small_size, small_size] by area averaging (any ratio)."""
    return F.interpolate(images, size=(small_size, small_size), mode="area")


def with_low_res(model_spec: ModelSpec, x_start: torch.Tensor,
                 model_kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """model_kwargs plus `low_res` from x_start for a super-resolution model; unchanged
    otherwise. Pure device ops: no host sync."""
    if model_spec.small_size is None:
        return model_kwargs
    return {**model_kwargs, "low_res": downsample(x_start, model_spec.small_size)}  # [N, C, s, s]
