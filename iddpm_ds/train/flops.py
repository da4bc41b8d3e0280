"""Model FLOPs per image and the device's peak, for the MFU every training run logs.

FLOPs are torch's count (torch.utils.flop_counter) of one training step's matmuls,
convolutions and attention products, forward + backward, on the meta device: shapes only,
so even the paper models are counted in about a second and no memory. The count is the
model's work: attention through the explicit "math" kernel and no activation
checkpointing, so a fused kernel's or a checkpoint's recomputation is not counted as
useful work (the usual MFU convention). Element-wise work (GroupNorm, SiLU, the losses)
is not counted either; it is a few percent of a UNet's.
"""
from __future__ import annotations

import torch

from ..spec.job import JobSpec

# Dense tensor-core peaks in FLOP/s (vendor data sheets, no sparsity) by device-name
# fragment; the first fragment found in the name wins (H100 PCIe and NVL are slower than
# the SXM). "fp32" is the TF32 peak: cuDNN runs fp32 convolutions, a UNet's bulk, on
# TF32 tensor cores by default (torch.backends.cudnn.allow_tf32).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 418e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.7e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.7e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
}
# plain fp32 (no tensor cores), when a run turns TF32 off
PEAK_FP32_NO_TF32 = {"H100 PCIe": 51e12, "H100 NVL": 60e12, "H200": 67e12, "H100": 67e12,
                     "A100": 19.5e12, "L40S": 91.6e12}


def train_flops_per_image(job: JobSpec) -> int:
    """FLOPs of one image's forward + backward through `job`'s model and diffusion loss."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..diffusion import build_diffusion
    from ..models import build_model, set_kernels
    from ..superres import with_low_res

    spec = job.model.model_copy(update={"use_checkpoint": False})
    size = spec.image_size
    with torch.device("meta"):
        model = set_kernels(build_model(spec), attention="math")
        x_start = torch.empty(1, 3, size, size)  # [N, C, H, W]
        t = torch.zeros(1, dtype=torch.long)
        model_kwargs = {"y": torch.zeros(1, dtype=torch.long)} if spec.class_cond else {}
        model_kwargs = with_low_res(spec, x_start, model_kwargs)
    diffusion = build_diffusion(job.diffusion)
    with FlopCounterMode(display=False) as counter:
        losses = diffusion.training_losses(model, x_start, t, model_kwargs=model_kwargs)
        losses["loss"].sum().backward()
    return counter.get_total_flops()


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The data-sheet peak FLOP/s of `device` for `precision`; None off the table (CPU,
    other GPUs): a CPU has no data-sheet figure that its convolutions run against (oneDNN's
    Winograd kernels beat the direct count), so no MFU is claimed there."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = "fp32" if precision == "fp32" else ("fp16" if precision == "fp16" else "bf16")
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment in name:
            if kind == "fp32" and not torch.backends.cudnn.allow_tf32:
                return PEAK_FP32_NO_TF32[fragment]
            return peaks[kind]
    return None
