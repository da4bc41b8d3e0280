"""The IDDPM UNet (Nichol & Dhariwal 2021) and its super-resolution variant.

Module tree, parameter names and shapes follow improved-diffusion's UNetModel exactly,
so checkpoints move between the two with strict=True (see
/work/shared/reference/unet_state_dict_keys.txt).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .nn import (
    ATTENTION_KERNELS, GROUPS, Float32Region, avg_pool_nd, checkpoint, conv_nd, float32_region, linear,
    normalization, qkv_attention, timestep_embedding, zero_module,
)


class TimestepBlock(nn.Module):
    """A block whose forward also takes the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling (inner two dims for 3-D), then a 3x3 conv if use_conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels, self.use_conv, self.dims = channels, use_conv, dims
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            size = (x.shape[2], x.shape[3] * 2, x.shape[4] * 2)
            x = F.interpolate(x, size, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling (inner two dims for 3-D): strided 3x3 conv, or average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels, self.use_conv, self.dims = channels, use_conv, dims
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    h = out_layers(in_layers(x) + emb)  or, with use_scale_shift_norm,
    h = out_rest(norm(in_layers(x)) * (1 + scale) + shift); returns skip(x) + h.
    The last conv is zero-initialised, so a fresh block is skip(x).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float,
                 out_channels: Optional[int] = None, use_conv: bool = False,
                 use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.channels, self.out_channels = channels, out_channels
        self.use_scale_shift_norm, self.use_checkpoint = use_scale_shift_norm, use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(),
            conv_nd(dims, channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_channels, out_channels, 3, padding=1)))
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # [N, C_out, *spatial]
        with float32_region(emb.device):  # the SiLU too: the reference's fp32 emb_layers
            emb_out = self.emb_layers(emb).to(h.dtype)  # [N, C_out or 2 * C_out]
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2)))  # [N, C', 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, residual, zero-initialised projection."""

    def __init__(self, channels: int, num_heads: int = 1, use_checkpoint: bool = False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention over {channels} channels cannot be split into "
                             f"{num_heads} heads (channels must be divisible by num_heads)")
        self.channels, self.num_heads, self.use_checkpoint = channels, num_heads, use_checkpoint
        self.kernel = "sdpa"  # set_kernels(); not a weight, not in the state dict
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # [B, C, L]; reshape, not view: x may be channels_last
        qkv = self.qkv(self.norm(x))  # [B, 3C, L]
        h = self.proj_out(qkv_attention(qkv, self.num_heads, self.kernel))  # [B, C, L]
        return (x + h).reshape(b, c, *spatial)


def _check_channels(model_channels: int, channel_mult: Sequence[int],
                    attention_resolutions: Sequence[int], num_heads: int,
                    num_heads_upsample: int) -> None:
    """Fail at construction, naming the level, instead of deep inside a layer."""
    for level, mult in enumerate(channel_mult):
        ch = model_channels * mult
        if ch % GROUPS:
            raise ValueError(
                f"level {level} has model_channels * channel_mult[{level}] = "
                f"{model_channels} * {mult} = {ch} channels; GroupNorm uses {GROUPS} groups, "
                f"so every level's channel count must be divisible by {GROUPS}")
        attends = 2 ** level in attention_resolutions
        heads = ({num_heads, num_heads_upsample} if attends else set())
        if level == len(channel_mult) - 1:
            heads.add(num_heads)  # the middle block always attends
        for h in sorted(heads):
            if ch % h:
                raise ValueError(
                    f"level {level} attends over {ch} channels, which {h} heads do not "
                    f"divide; choose num_heads / num_heads_upsample dividing {ch}")


class UNetModel(nn.Module):
    """The IDDPM UNet with attention and timestep embedding.

    :param in_channels: channels of the input x.
    :param model_channels: base channel count.
    :param out_channels: channels of the output (6 = eps and variance with learn_sigma).
    :param num_res_blocks: residual blocks per level.
    :param attention_resolutions: downsample rates (1, 2, 4, ...) that get attention;
        e.g. attention at 16 px in a 32 px model is rate 2.
    :param dropout: dropout probability in the residual blocks.
    :param channel_mult: channel multiplier per level.
    :param conv_resample: learned 3x3 convs in up/downsampling (else nearest/avg-pool).
    :param dims: 1, 2 or 3 spatial dims.
    :param num_classes: class-conditional with this many classes (needs `y` in forward).
    :param use_checkpoint: gradient checkpointing in residual and attention blocks.
    :param num_heads: attention heads in the down path and middle block.
    :param num_heads_upsample: heads in the up path; -1 means num_heads.
    :param use_scale_shift_norm: FiLM-like conditioning on the timestep embedding.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int],
                 dropout: float = 0.0, channel_mult: Sequence[int] = (1, 2, 4, 8),
                 conv_resample: bool = True, dims: int = 2, num_classes: Optional[int] = None,
                 use_checkpoint: bool = False, num_heads: int = 1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        _check_channels(model_channels, channel_mult, attention_resolutions, num_heads,
                        num_heads_upsample)
        self.in_channels, self.model_channels = in_channels, model_channels
        self.out_channels, self.num_res_blocks = out_channels, num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout, self.channel_mult = dropout, tuple(channel_mult)
        self.conv_resample, self.dims, self.num_classes = conv_resample, dims, num_classes
        self.use_checkpoint, self.num_heads = use_checkpoint, num_heads
        self.num_heads_upsample = num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.channels_last = False  # set_kernels(); activations' memory format only

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(),
            linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        skip_chans = self._build_input_blocks(time_embed_dim)
        ch = skip_chans[-1]
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, time_embed_dim, ch),
            AttentionBlock(ch, num_heads=num_heads, use_checkpoint=use_checkpoint),
            self._res_block(ch, time_embed_dim, ch))
        ch = self._build_output_blocks(time_embed_dim, skip_chans)
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1, float32=True)))

    def _res_block(self, ch: int, emb_dim: int, out_ch: int) -> ResBlock:
        return ResBlock(ch, emb_dim, self.dropout, out_channels=out_ch, dims=self.dims,
                        use_checkpoint=self.use_checkpoint,
                        use_scale_shift_norm=self.use_scale_shift_norm)

    def _build_input_blocks(self, emb_dim: int) -> list[int]:
        """Stem conv, then per level num_res_blocks (ResBlock [+ attention]) and a
        Downsample except at the last level. Returns each block's output channels
        (what the up path concatenates, in order)."""
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(
            conv_nd(self.dims, self.in_channels, self.model_channels, 3, padding=1))])
        chans, ch, ds = [self.model_channels], self.model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [self._res_block(ch, emb_dim, mult * self.model_channels)]
                ch = mult * self.model_channels
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, self.num_heads, self.use_checkpoint))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(
                    Downsample(ch, self.conv_resample, dims=self.dims)))
                chans.append(ch)
                ds *= 2
        return chans

    def _build_output_blocks(self, emb_dim: int, skip_chans: list[int]) -> int:
        """Per level (deepest first) num_res_blocks + 1 blocks, each taking one skip;
        the last block of every level but the first upsamples. Returns final channels."""
        self.output_blocks = nn.ModuleList([])
        skip_chans = list(skip_chans)
        ch, ds = skip_chans[-1], 2 ** (len(self.channel_mult) - 1)
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                layers: list[nn.Module] = [
                    self._res_block(ch + skip_chans.pop(), emb_dim, self.model_channels * mult)]
                ch = self.model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, self.num_heads_upsample, self.use_checkpoint))
                if level and i == self.num_res_blocks:
                    layers.append(Upsample(ch, self.conv_resample, dims=self.dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        return ch

    @property
    def inner_dtype(self) -> torch.dtype:
        """dtype of the UNet body (bf16/fp16 once DeepSpeed has cast the module)."""
        return self.input_blocks[0][0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, C_in, *spatial], timesteps [N] (float ok), y [N] labels if class-conditional
        -> [N, C_out, *spatial] in x's dtype."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y (class labels) if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes}, y given: {y is not None})")
        t_emb = timestep_embedding(timesteps, self.model_channels)  # [N, mc], float32
        with float32_region(x.device):  # Linear32: float32 whatever the weights' dtype
            emb = self.time_embed(t_emb)  # [N, 4 mc]
        if y is not None:
            emb = emb + self.label_emb(y).to(emb.dtype)  # a lookup: exact in fp32
        hs = []
        h = x.to(self.inner_dtype)
        if self.channels_last and h.dim() == 4:
            h = h.contiguous(memory_format=torch.channels_last)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        with float32_region(x.device):  # GroupNorm32, SiLU and Conv32: the fp32 head
            return self.out(h.float() if Float32Region.fp32_regions else h).to(x.dtype)


def set_kernels(model: nn.Module, attention: str = "sdpa", channels_last: bool = False) -> nn.Module:
    """Speed options that change no weight and no result beyond rounding: the attention
    kernel of every AttentionBlock, and channels_last activations. The weights keep their
    contiguous layout: DeepSpeed broadcasts and flattens parameters as plain byte views,
    which a channels_last weight refuses (world size > 1), and a convolution given a
    channels_last input runs channels_last anyway."""
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {attention!r}; one of {ATTENTION_KERNELS}")
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.kernel = attention
        if isinstance(module, UNetModel):
            module.channels_last = channels_last
    return model


class SuperResModel(UNetModel):
    """UNet that also sees a low-resolution image, upsampled bilinearly
    (align_corners=False) to x's size and concatenated to x on channels.

    Takes the same arguments as UNetModel; `in_channels` counts both parts (6 for RGB),
    as ModelSpec.in_channels does (the reference's SuperResModel doubles it instead).
    """

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                low_res: Optional[torch.Tensor] = None, **kwargs: torch.Tensor) -> torch.Tensor:
        if low_res is None:
            raise ValueError("SuperResModel needs low_res (the low-resolution image) "
                             "in model_kwargs")
        upsampled = F.interpolate(low_res.to(x.dtype), size=tuple(x.shape[2:]),
                                  mode="bilinear", align_corners=False)  # [N, C_lr, H, W]
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, **kwargs)
