"""DiffusionSpec: the Gaussian diffusion's flags, named and defaulted as the reference's."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Spec


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
        if isinstance(value, int):
            return str(value)
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return value

    @model_validator(mode="after")
    def _check_respacing(self) -> "DiffusionSpec":
        if self.timestep_respacing:
            from ..diffusion.respace import space_timesteps  # pure Python, no torch work

            space_timesteps(self.diffusion_steps, self.timestep_respacing)
        return self

    def with_respacing(self, timestep_respacing: str) -> "DiffusionSpec":
        """Same process, other respacing (sampling with fewer steps than training)."""
        return DiffusionSpec.model_validate(
            {**self.model_dump(), "timestep_respacing": timestep_respacing})
