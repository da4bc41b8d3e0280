"""Beta schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t).

Both return float64 numpy arrays: every coefficient derived from them stays float64 and
is only cast to float32 after it is gathered at t (reference numerics).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np


class UnknownScheduleError(NotImplementedError, ValueError):
    """An unknown schedule name; catchable as NotImplementedError (reference) or ValueError."""


SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas [T] (float64) of the named schedule, "linear" (DDPM) or "cosine" (IDDPM)."""
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        return linear_beta_schedule(num_diffusion_timesteps)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, cosine_alpha_bar)
    raise UnknownScheduleError(
        f"unknown beta schedule: {schedule_name!r} (known: {', '.join(SCHEDULES)})")


def linear_beta_schedule(num_diffusion_timesteps: int) -> np.ndarray:
    """DDPM's 1e-4..0.02 over 1000 steps, scaled by 1000/T so any T spans the same total noise."""
    scale = 1000 / num_diffusion_timesteps
    beta_start = scale * 0.0001
    beta_end = scale * 0.02
    if beta_end > 1.0:
        # The reference only fails later, in an assertion on the betas.
        raise ValueError(
            f"linear schedule with {num_diffusion_timesteps} steps gives beta_T={beta_end:g} > 1; "
            "use at least 20 diffusion steps or the cosine schedule")
    return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)


def cosine_alpha_bar(t: float) -> float:
    """IDDPM's alpha_bar(t) for t in [0, 1]: cos(((t + s) / (1 + s)) * pi / 2)^2, s = 0.008."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(
    num_diffusion_timesteps: int,
    alpha_bar: Callable[[float], float],
    max_beta: float = 0.999,
) -> np.ndarray:
    """Betas with prod(1 - beta) following alpha_bar(t / T): beta_i = 1 - abar((i+1)/T) / abar(i/T),
    clipped at max_beta (the cosine abar reaches 0 at t = 1, which would make beta_T = 1)."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)
