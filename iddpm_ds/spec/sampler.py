"""SamplerSpec: how training timesteps are drawn (uniform or loss-aware importance sampling)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Spec


class SamplerSpec(Spec):
    """The schedule sampler: which timesteps t a training batch sees, and their weights 1/(T p_t).

    A bare string is accepted as shorthand for the name, so a job file may say
    `schedule_sampler: loss-second-moment` instead of `schedule_sampler: {name: ...}`.
    """

    name: Literal["uniform", "loss-second-moment"] = "uniform"
    """"uniform" (every t equally likely, weights 1) or "loss-second-moment" (p_t proportional to
    sqrt(mean(loss_t^2)) over the recent history, the reference's importance sampler for L_vlb)."""
    history_per_term: int = Field(10, ge=1, le=100_000)
    """Losses remembered per timestep; sampling stays uniform until every t has this many."""
    uniform_prob: float = Field(0.001, ge=0.0, le=1.0)
    """Probability mass mixed in uniformly so that no timestep's weight 1/(T p_t) explodes."""

    @model_validator(mode="before")
    @classmethod
    def _name_shorthand(cls, value: object) -> object:
        if isinstance(value, str):
            return {"name": value}
        return value
