"""Gaussian KL, the discretised-Gaussian image likelihood, and mean over non-batch dims."""
from __future__ import annotations

import math
from typing import Union

import torch

TensorOrFloat = Union[torch.Tensor, float]


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: [N, ...] -> [N]."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


def normal_kl(
    mean1: TensorOrFloat, logvar1: TensorOrFloat, mean2: TensorOrFloat, logvar2: TensorOrFloat
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Scalars are accepted for any argument (e.g. the N(0, 1) prior); at least one must be
    a tensor, which fixes the dtype and device of the others.
    """
    tensor = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    # Log-variances as tensors so torch.exp applies to scalar ones too; made directly in
    # the tensor's dtype (same float32 values as the reference, exact in float64).
    logvar1, logvar2 = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=tensor.dtype, device=tensor.device)
        for x in (logvar1, logvar2))
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast approximation of the standard normal CDF: 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-probability (nats, elementwise) of images x in [-1, 1] quantised to 256 levels.

    Each level k (x = k / 127.5 - 1) owns the bin x +- 1/255 under N(means, exp(log_scales)^2);
    the two outermost bins extend to -inf and +inf so the 256 probabilities sum to 1.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
            f"log_scales {tuple(log_scales.shape)}")
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
