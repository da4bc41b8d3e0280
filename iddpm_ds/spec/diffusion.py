"""DiffusionSpec: the Gaussian diffusion's flags, named and defaulted as the reference's."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Spec
from .errors import FieldError

LINEAR_MIN_STEPS = 20
"""Fewest steps of the 1000/T-scaled linear schedule whose betas stay <= 1."""


def check_respacing(diffusion_steps: int, respacing: str) -> None:
    """Raise ValueError (one line) unless `respacing` selects steps of a T=diffusion_steps process."""
    from ..diffusion.respace import space_timesteps

    space_timesteps(diffusion_steps, respacing)


class DiffusionSpec(Spec):
    """The Gaussian diffusion process, its parameterisation and its loss."""

    diffusion_steps: int = Field(1000, ge=1)
    """Number of diffusion steps T of the original (un-respaced) process."""
    noise_schedule: Literal["linear", "cosine"] = "linear"
    """Beta schedule: "linear" (DDPM, scaled by 1000/T) or "cosine" (IDDPM)."""
    timestep_respacing: str = ""
    """Keep only some timesteps: "" (all), "250", "10,15,20" (per section) or "ddim50"."""
    learn_sigma: bool = False
    """The model outputs the variance too (learned-range variance); must agree with model.learn_sigma."""
    sigma_small: bool = False
    """With fixed variance, use the posterior variance (small) instead of beta_t (large)."""
    use_kl: bool = False
    """Train on the variational bound alone (rescaled KL) instead of the hybrid loss."""
    predict_xstart: bool = False
    """The model predicts x_start instead of the noise eps."""
    rescale_timesteps: bool = True
    """Feed the model t scaled to the range [0, 1000) whatever T is."""
    rescale_learned_sigmas: bool = True
    """With learn_sigma, use the hybrid loss (MSE + vb scaled by T/1000) rather than plain MSE."""

    @field_validator("timestep_respacing", mode="before")
    @classmethod
    def _respacing_str(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return value

    @model_validator(mode="after")
    def _check_process(self) -> "DiffusionSpec":
        if self.noise_schedule == "linear" and self.diffusion_steps < LINEAR_MIN_STEPS:
            # the linear schedule is scaled by 1000/T, so beta_T = 20/T exceeds 1 below T=20
            raise FieldError("diffusion_steps", (
                f"{self.diffusion_steps} steps with noise_schedule: linear give beta_T="
                f"{20 / self.diffusion_steps:g} > 1; use at least {LINEAR_MIN_STEPS} steps or "
                "noise_schedule: cosine"))
        if self.timestep_respacing:
            try:
                check_respacing(self.diffusion_steps, self.timestep_respacing)
            except ValueError as err:
                raise FieldError("timestep_respacing", str(err)) from None
        return self

    def with_respacing(self, timestep_respacing: str) -> "DiffusionSpec":
        """Same process, other respacing (sampling with fewer steps than training)."""
        return DiffusionSpec.model_validate(
            {**self.model_dump(), "timestep_respacing": timestep_respacing})
