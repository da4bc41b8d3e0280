"""Gaussian diffusion of improved-diffusion: schedules, losses, the process and respacing.

`build_diffusion(spec)` builds the (always respaced) process exactly as the reference's
create_gaussian_diffusion does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import SpacedDiffusion, space_timesteps
from .schedules import UnknownScheduleError, betas_for_alpha_bar, get_named_beta_schedule

if TYPE_CHECKING:  # pragma: no cover
    from ..spec.diffusion import DiffusionSpec

__all__ = [
    "build_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "space_timesteps",
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
    "UnknownScheduleError",
    "mean_flat",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
]


def build_diffusion(spec: "DiffusionSpec") -> SpacedDiffusion:
    """The SpacedDiffusion for `spec` ("" respacing keeps all diffusion_steps steps)."""
    betas = get_named_beta_schedule(spec.noise_schedule, spec.diffusion_steps)
    if spec.use_kl:
        loss_type = LossType.RESCALED_KL
    elif spec.rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if spec.learn_sigma:
        model_var_type = ModelVarType.LEARNED_RANGE
    else:
        model_var_type = ModelVarType.FIXED_SMALL if spec.sigma_small else ModelVarType.FIXED_LARGE
    respacing = spec.timestep_respacing or [spec.diffusion_steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(spec.diffusion_steps, respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if spec.predict_xstart else ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=spec.rescale_timesteps,
    )
