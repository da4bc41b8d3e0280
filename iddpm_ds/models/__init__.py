"""The IDDPM UNet; `build_model` turns a ModelSpec into the module the reference builds."""
from __future__ import annotations

from ..spec.model import ModelSpec
from .precision import PRECISIONS, at_precision
from .unet import SuperResModel, UNetModel, set_kernels

__all__ = ["UNetModel", "SuperResModel", "build_model", "set_kernels", "at_precision", "PRECISIONS"]


def build_model(spec: ModelSpec) -> UNetModel:
    """UNetModel, or SuperResModel when spec.small_size is set, as the reference's
    create_model / sr_create_model build it (attention at image_size // resolution)."""
    cls = SuperResModel if spec.small_size is not None else UNetModel
    return cls(
        in_channels=spec.in_channels,
        model_channels=spec.num_channels,
        out_channels=spec.out_channels,
        num_res_blocks=spec.num_res_blocks,
        attention_resolutions=spec.attention_ds,
        dropout=spec.dropout,
        channel_mult=spec.resolved_channel_mult,
        num_classes=spec.num_classes if spec.class_cond else None,
        use_checkpoint=spec.use_checkpoint,
        num_heads=spec.num_heads,
        num_heads_upsample=spec.resolved_num_heads_upsample,
        use_scale_shift_norm=spec.use_scale_shift_norm,
    )
