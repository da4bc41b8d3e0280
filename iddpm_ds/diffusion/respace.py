"""Timestep respacing: run a T-step process with a subset of its steps.

`space_timesteps` is pure Python (DiffusionSpec calls it in a validator); `SpacedDiffusion`
rebuilds the betas so that the kept steps have the original process's alphas_cumprod,
and feeds the model the original step index.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion

SectionCounts = Union[str, int, Sequence[int]]


def space_timesteps(num_timesteps: int, section_counts: SectionCounts) -> set[int]:
    """Indices of the original T steps to keep.

    section_counts: "ddimN" (the smallest integer stride s with len(range(0, T, s)) == N),
    or per-section counts as "10,15,20" / [10, 15, 20] / 25. The T steps are split into
    len(sections) nearly equal parts, earlier parts taking the remainder; in a part of S
    steps, N steps are picked with float stride (S - 1) / (N - 1), accumulated and rounded
    with Python's round() (ties to even), as the reference does.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        return _ddim_timesteps(num_timesteps, section_counts)
    counts = _parse_counts(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"cannot take {section_count} steps from section {i} of {size} steps "
                f"(T={num_timesteps} split into {len(counts)} sections)")
        frac_stride = 1.0 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    if not all_steps:
        raise ValueError(f"timestep respacing {section_counts!r} keeps no step")
    return set(all_steps)


def _ddim_timesteps(num_timesteps: int, spec: str) -> set[int]:
    try:
        desired_count = int(spec[len("ddim"):])
    except ValueError:
        raise ValueError(f"bad DDIM respacing {spec!r}: expected 'ddimN', e.g. 'ddim50'") from None
    # Strides up to T inclusive: stride T keeps only step 0 (ddim1).
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == desired_count:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f"cannot create exactly {desired_count} steps with an integer stride "
        f"from {num_timesteps} diffusion steps")


def _parse_counts(section_counts: SectionCounts) -> list[int]:
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        try:
            counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"bad timestep respacing {section_counts!r}: expected 'N', 'N1,N2,...' "
                "or 'ddimN'") from None
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"bad timestep respacing {section_counts!r}: counts must be >= 0")
    return counts


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps `use_timesteps` of a base process.

    The new betas are 1 - alphas_cumprod[i] / alphas_cumprod[previous kept i], so the
    kept steps have exactly the base process's marginals q(x_t | x_0). Models passed to
    p_mean_variance / training_losses (and so to every sampler and calc_bpd_loop) are
    wrapped to receive the original index timestep_map[t] as float (times
    1000 / original_num_steps with rescale_timesteps).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base_diffusion = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        self.timestep_map: list[int] = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        if len(self.timestep_map) != len(self.use_timesteps):
            bad = sorted(self.use_timesteps - set(self.timestep_map))
            raise ValueError(f"timesteps {bad} are outside 0..{self.original_num_steps - 1}")
        kwargs["betas"] = np.array(new_betas, dtype=np.float64)
        super().__init__(**kwargs)
        self._timestep_map_np = np.array(self.timestep_map, dtype=np.int64)

    def timestep_map_on(self, device: torch.device) -> torch.Tensor:
        """timestep_map as an int64 tensor on `device`, copied there once and cached."""
        return self._table("_timestep_map_np", device, dtype=torch.int64)

    def p_mean_variance(self, model: Callable, *args: Any, **kwargs: Any) -> dict:
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model: Callable, *args: Any, **kwargs: Any) -> dict:
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _wrap_model(self, model: Callable) -> "_WrappedModel":
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(
            model, self.timestep_map_on, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # The wrapped model maps and scales; the base class must leave t alone.
        return t


class _WrappedModel:
    """Calls model(x, timestep_map[ts] as float (rescaled), **kwargs); ts stays on its device."""

    def __init__(
        self,
        model: Callable,
        timestep_map_on: Callable[[torch.device], torch.Tensor],
        rescale_timesteps: bool,
        original_num_steps: int,
    ):
        self.model = model
        self.timestep_map_on = timestep_map_on
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        new_ts = self.timestep_map_on(ts.device)[ts].float()  # [N]
        if self.rescale_timesteps:
            new_ts = new_ts * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
