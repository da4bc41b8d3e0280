"""Building blocks of the IDDPM UNet: float32 GroupNorm, zero-initialised layers, the
sinusoidal timestep embedding and the reference's multi-head QKV attention layout."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

GROUPS = 32  # the reference normalises every activation with 32 groups


class Float32Region:
    """A layer that computes in float32 whatever its weights' dtype: the reference's fp32
    regions. Its fp16 training converts only the torso's convolutions, so the timestep
    MLP, the embedding projections, GroupNorm and the output head compute in fp32. Under
    precision fp16/bf16 DeepSpeed stores every weight in 16 bit; these layers upcast their
    (16-bit-rounded) weights and input for the call, and their gradients flow back to the
    16-bit copies. Autocast (bf16-mixed) is off inside. `fp32_regions` is a class switch
    for measurements only (the whole-cast numerics in docs/benchmarks.md)."""

    fp32_regions = True

    def _region_args(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """(input, weight, bias) in float32; with the switch off, in the weight's dtype."""
        dtype = torch.float32 if Float32Region.fp32_regions else self.weight.dtype
        return [t.to(dtype) if t is not None else None for t in tensors]


class GroupNorm32(Float32Region, nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input's dtype (reference).

    The affine parameters are upcast too, so this stays float32 inside even when
    DeepSpeed has cast the whole module (norm parameters included) to bf16/fp16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, weight, bias = self._region_args(x, self.weight, self.bias)
        out = F.group_norm(h, self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


class Linear32(Float32Region, nn.Linear):
    """nn.Linear in a float32 region: float32 out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with float32_region(x.device):
            return F.linear(*self._region_args(x, self.weight, self.bias))


class _Conv32(Float32Region):
    """Conv in a float32 region (the output head): float32 out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with float32_region(x.device):
            return self._conv_forward(*self._region_args(x, self.weight, self.bias))


class Conv1d32(_Conv32, nn.Conv1d):
    pass


class Conv2d32(_Conv32, nn.Conv2d):
    pass


class Conv3d32(_Conv32, nn.Conv3d):
    pass


def normalization(channels: int) -> GroupNorm32:
    """The reference's normalisation layer: GroupNorm32 with 32 groups."""
    if channels % GROUPS:
        raise ValueError(f"GroupNorm with {GROUPS} groups needs a channel count divisible "
                         f"by {GROUPS}, got {channels}")
    return GroupNorm32(GROUPS, channels)


def conv_nd(dims: int, *args: Any, float32: bool = False, **kwargs: Any) -> nn.Module:
    """A 1-, 2- or 3-D convolution (`float32`: in a float32 region, see Float32Region)."""
    convs = ({1: Conv1d32, 2: Conv2d32, 3: Conv3d32} if float32
             else {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d})
    if dims not in convs:
        raise ValueError(f"unsupported dims: {dims} (1, 2 or 3)")
    return convs[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-, 2- or 3-D average pooling."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"unsupported dims: {dims} (1, 2 or 3)")
    return pools[dims](*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    """A linear layer in a float32 region: the UNet's linear layers are the timestep MLP and
    the embedding projections, all fp32 in the reference (Float32Region)."""
    return Linear32(*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter: residual branches and the output start as the identity/zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] (float32) of (possibly fractional) timesteps [N].

    Frequencies exp(-ln(max_period) * i / half) for i < half = dim // 2; the embedding
    is concat[cos(t * freqs), sin(t * freqs)], zero-padded by one column for odd dim.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [N, 2 * half]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # [N, dim]
    return emb


def float32_region(device: torch.device) -> ContextManager[Any]:
    """Autocast off, so the block computes in float32 under precision bf16-mixed: the
    reference's mixed precision keeps the timestep MLP, the embedding projections and the
    output layer in fp32 and casts only the torso's convolutions (and attention)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


ATTENTION_KERNELS = ("sdpa", "math")


def qkv_attention(qkv: torch.Tensor, num_heads: int, kernel: str = "sdpa") -> torch.Tensor:
    """Multi-head self-attention over the reference's qkv layout.

    qkv: [B, heads * 3 * ch, L]. The reference reshapes it to [B * heads, 3 * ch, L] and
    splits each head's block into q, k, v (ch channels each), i.e. channel
    head * 3 * ch + j * ch + c is component j (q, k, v) of channel c of that head.
    Returns softmax(q^T k / sqrt(ch)) applied to v, as [B, heads * ch, L] (head-major).
    kernel "sdpa": scaled_dot_product_attention (flash / memory-efficient kernels where
    the device has them; their softmax accumulates in float32 as the reference's does);
    "math": the reference's formula written out (q and k each scaled by ch^-1/4, softmax
    in float32).
    """
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    qkv = qkv.transpose(1, 2)  # [B, L, heads * 3 * ch]
    if kernel == "sdpa":  # fused kernels need stride 1 on ch; the math path's matmuls don't
        qkv = qkv.contiguous()
    # [B, L, heads, 3, ch] -> [3, B, heads, L, ch]: token-major
    qkv = qkv.reshape(batch, length, num_heads, 3, ch).permute(3, 0, 2, 1, 4)
    q, k, v = qkv.unbind(0)  # each [B, heads, L, ch]
    if kernel == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, ch]
    elif kernel == "math":
        scale = ch ** -0.25
        weight = (q * scale) @ (k * scale).transpose(-1, -2)  # [B, heads, L, L]
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = weight @ v  # [B, heads, L, ch]
    else:
        raise ValueError(f"unknown attention kernel {kernel!r}; one of {ATTENTION_KERNELS}")
    return out.permute(0, 1, 3, 2).reshape(batch, num_heads * ch, length)  # [B, heads*ch, L]


def checkpoint(fn: Callable[..., torch.Tensor], *args: torch.Tensor, enabled: bool) -> torch.Tensor:
    """fn(*args), recomputed in backward instead of storing activations when enabled.

    Non-reentrant torch.utils.checkpoint: works with parameters that need grad and
    inputs that don't, and restores the RNG state so dropout masks are reproduced.
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
