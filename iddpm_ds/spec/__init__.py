"""Typed, strict job specification. `launch/` parses YAML/CLI into these; the package
receives them already validated."""
from .base import Spec
from .diffusion import DiffusionSpec
from .flags import specs_from_flags
from .model import ModelSpec

__all__ = ["Spec", "ModelSpec", "DiffusionSpec", "specs_from_flags"]
