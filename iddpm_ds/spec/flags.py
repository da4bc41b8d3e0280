"""Translate a reference flag dict (`model_and_diffusion_defaults()` style) 1:1 into specs."""
from __future__ import annotations

from typing import Any, Mapping

from .diffusion import DiffusionSpec
from .model import ModelSpec

_MODEL_KEYS = set(ModelSpec.model_fields) - {"learn_sigma"}
_DIFFUSION_KEYS = set(DiffusionSpec.model_fields) - {"learn_sigma"}
_SR_KEYS = {"large_size", "small_size"}


def specs_from_flags(flags: Mapping[str, Any]) -> tuple[ModelSpec, DiffusionSpec]:
    """Split a reference flag dict into (ModelSpec, DiffusionSpec).

    Accepts the keys of `model_and_diffusion_defaults()` and of
    `sr_model_and_diffusion_defaults()` (large_size/small_size). `learn_sigma` goes to
    both specs, as in the reference where one flag drives model and diffusion.
    Unknown keys are an error, like any spec field.
    """
    known = _MODEL_KEYS | _DIFFUSION_KEYS | _SR_KEYS | {"learn_sigma"}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ValueError(f"unknown reference flags: {unknown}")
    model = {k: v for k, v in flags.items() if k in _MODEL_KEYS}
    diffusion = {k: v for k, v in flags.items() if k in _DIFFUSION_KEYS}
    if "large_size" in flags:
        model["image_size"] = flags["large_size"]
    if "learn_sigma" in flags:
        model["learn_sigma"] = diffusion["learn_sigma"] = flags["learn_sigma"]
    return ModelSpec.model_validate(model), DiffusionSpec.model_validate(diffusion)
