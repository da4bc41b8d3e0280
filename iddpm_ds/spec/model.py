"""ModelSpec: the UNet's flags, named and defaulted exactly as improved-diffusion's
`model_and_diffusion_defaults()` (plus `channel_mult`, `num_classes`, `small_size`)."""
from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator, model_validator

from .base import Spec, parse_int_list
from .errors import FieldError

# GroupNorm32: the reference normalises every activation in 32 groups (models/nn.py GROUPS).
NORM_GROUPS = 32



def _nearest_multiples(value: int) -> str:
    below = value // NORM_GROUPS * NORM_GROUPS
    return f"{below} or {below + NORM_GROUPS}" if below else str(NORM_GROUPS)


# Reference channel multipliers by image size (script_util.create_model).
DEFAULT_CHANNEL_MULT: dict[int, tuple[int, ...]] = {
    256: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


class ModelSpec(Spec):
    """The UNet (or super-resolution UNet) to build."""

    image_size: int = Field(64, gt=0)
    """Side of the square training images in pixels (the large size for super-resolution)."""
    num_channels: int = Field(128, gt=0)
    """Base channel count; level i has num_channels * channel_mult[i] channels."""
    num_res_blocks: int = Field(2, ge=1)
    """Residual blocks per resolution level."""
    num_heads: int = Field(4, ge=1)
    """Attention heads in the down path and middle block."""
    num_heads_upsample: int = -1
    """Attention heads in the up path; -1 means the same as num_heads."""
    attention_resolutions: tuple[int, ...] = (16, 8)
    """Resolutions (in pixels, not downsample rates) that get self-attention; "16,8" or [16, 8]."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability inside residual blocks."""
    learn_sigma: bool = False
    """Output 6 channels (eps and variance interpolation) instead of 3; must agree with diffusion.learn_sigma."""
    class_cond: bool = False
    """Condition on a class label `y` through a learned embedding."""
    use_checkpoint: bool = False
    """Gradient checkpointing in residual and attention blocks (torch.utils.checkpoint)."""
    use_scale_shift_norm: bool = True
    """FiLM-style conditioning: the timestep embedding scales and shifts the normalised activations."""
    channel_mult: Optional[tuple[int, ...]] = None
    """Per-level channel multipliers; None takes the reference's choice for 32, 64 or 256 px."""
    num_classes: int = Field(1000, ge=1)
    """Number of classes for class_cond (the reference fixes 1000)."""
    small_size: Optional[int] = Field(None, gt=0)
    """Set to build the super-resolution UNet: low-resolution input side in pixels (image_size is the large side)."""

    @field_validator("attention_resolutions", "channel_mult", mode="before")
    @classmethod
    def _comma_lists(cls, value: object) -> object:
        return parse_int_list(value)

    @model_validator(mode="after")
    def _check_geometry(self) -> "ModelSpec":
        """Every shape the UNet would reject at build time, named by the field to change."""
        if self.channel_mult is None and self.image_size not in DEFAULT_CHANNEL_MULT:
            raise FieldError("channel_mult", (
                f"image_size={self.image_size} has no default channel_mult (defaults exist for "
                f"{sorted(DEFAULT_CHANNEL_MULT)}); set model.channel_mult, e.g. [1, 2, 2]"))
        mult = self.resolved_channel_mult
        if not mult or any(m <= 0 for m in mult):
            raise FieldError("channel_mult", f"needs one or more positive multipliers, got {list(mult)}")
        if self.image_size % (2 ** (len(mult) - 1)):
            raise FieldError("image_size", (
                f"{self.image_size} is not divisible by 2**{len(mult) - 1}, which the "
                f"{len(mult)} levels of channel_mult={list(mult)} need"))
        levels = [self.image_size // 2 ** i for i in range(len(mult))]
        for res in self.attention_resolutions:
            if res not in levels:
                raise FieldError("attention_resolutions", (
                    f"{res} px is not a resolution the UNet reaches (image_size={self.image_size}, "
                    f"channel_mult={list(mult)}: levels {levels})"))
        if self.small_size is not None and self.small_size >= self.image_size:
            raise FieldError("small_size", f"{self.small_size} must be below image_size={self.image_size}")
        self._check_channels(mult, levels)
        return self

    def _check_channels(self, mult: tuple[int, ...], levels: list[int]) -> None:
        # The stem's output (num_channels wide) is normalised by the first ResBlock, so
        # num_channels itself must be a multiple of the groups; every level's width then is.
        if self.num_channels % NORM_GROUPS:
            raise FieldError("num_channels", (
                f"{self.num_channels} is not a multiple of {NORM_GROUPS}: GroupNorm normalises "
                f"every activation in {NORM_GROUPS} groups (try {_nearest_multiples(self.num_channels)})"))
        if self.num_heads_upsample != -1 and self.num_heads_upsample < 1:
            raise FieldError("num_heads_upsample",
                             f"must be -1 (same as num_heads) or >= 1, got {self.num_heads_upsample}")
        for level, (res, m) in enumerate(zip(levels, mult)):
            width = self.num_channels * m
            attends = res in self.attention_resolutions
            heads = {"num_heads": self.num_heads} if attends or level == len(mult) - 1 else {}
            if attends:  # the middle block (deepest level) attends with num_heads only
                heads["num_heads_upsample"] = self.resolved_num_heads_upsample
            for name, count in heads.items():
                if width % count:
                    raise FieldError(name, (
                        f"{count} heads do not divide the {width} channels of the {res} px "
                        f"level that attends (num_channels * channel_mult[{level}])"))

    @property
    def resolved_channel_mult(self) -> tuple[int, ...]:
        if self.channel_mult is not None:
            return self.channel_mult
        return DEFAULT_CHANNEL_MULT[self.image_size]

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """Downsample rates the UNet attends at: image_size // resolution (reference convention)."""
        return tuple(self.image_size // res for res in self.attention_resolutions)

    @property
    def out_channels(self) -> int:
        return 6 if self.learn_sigma else 3

    @property
    def in_channels(self) -> int:
        """3 image channels, plus 3 upsampled low-resolution channels for super-resolution."""
        return 6 if self.small_size is not None else 3

    @property
    def resolved_num_heads_upsample(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
