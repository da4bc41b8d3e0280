"""iddpm_ds: improved-diffusion (IDDPM) as a DeepSpeed training service.

Public API::

    from iddpm_ds import ModelSpec, DiffusionSpec, build_model, build_diffusion
    model = build_model(ModelSpec(image_size=32, num_channels=64, learn_sigma=True))
    diffusion = build_diffusion(DiffusionSpec(learn_sigma=True, noise_schedule="cosine"))

Setting `ModelSpec.small_size` builds the super-resolution UNet (image_size is then the
large side); `specs_from_flags` translates a reference flag dict.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .spec import DiffusionSpec, ModelSpec, specs_from_flags

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .diffusion.respace import SpacedDiffusion

__all__ = ["ModelSpec", "DiffusionSpec", "specs_from_flags", "build_model", "build_diffusion"]
__version__ = "0.1.0"


def build_model(spec: ModelSpec) -> "torch.nn.Module":
    """The UNetModel (or SuperResModel when spec.small_size is set) for this spec."""
    from .models import build_model as _build

    return _build(spec)


def build_diffusion(spec: DiffusionSpec) -> "SpacedDiffusion":
    """The (always respaced) Gaussian diffusion for this spec, as the reference builds it."""
    from .diffusion import build_diffusion as _build

    return _build(spec)


