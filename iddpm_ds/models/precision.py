"""Inference precision: the model as the diffusion's loops call it, in fp32, bf16 or
bf16-mixed, with the output always float32 so every diffusion formula (posterior,
bits/dim, clipping) stays in fp32 as the reference computes it."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "bf16-mixed")


class AtPrecision(nn.Module):
    """fp32: the model as is. bf16: weights cast to bf16 (in place), inputs cast, output
    back to fp32. bf16-mixed: fp32 weights, the forward under torch.autocast(bf16); the
    UNet keeps its fp32 regions (timestep MLP, embedding projections, output layer), as
    training with precision bf16-mixed does."""

    def __init__(self, model: nn.Module, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
        self.precision = precision
        self.model = model.to(torch.bfloat16) if precision == "bf16" else model
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        if "low_res" in model_kwargs:
            model_kwargs = {**model_kwargs, "low_res": model_kwargs["low_res"].to(self.dtype)}
        x = x.to(self.dtype)                                                  # [N, C, H, W]
        if self.precision == "bf16-mixed":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.model(x, timesteps, **model_kwargs).float()
        return self.model(x, timesteps, **model_kwargs).float()             # [N, C', H, W]


def at_precision(model: nn.Module, precision: str) -> nn.Module:
    """`model` for sampling / evaluation at `precision` (fp32 returns it unchanged)."""
    return model if precision == "fp32" else AtPrecision(model, precision).eval()
