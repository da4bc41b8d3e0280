"""Drawing the images of a training sample grid (the grid itself: periodic.write_sample_grid)."""
from __future__ import annotations

import torch

from ..diffusion import build_diffusion
from ..models import build_model


@torch.no_grad()
def sample_images(job, state: dict[str, torch.Tensor], device: torch.device, count: int,
                  respacing: str, seed: int) -> torch.Tensor:
    """count images [N, 3, H, W] in [-1, 1] from `state` with DDIM/DDPM at `respacing`."""
    model = build_model(job.model).to(device)
    model.load_state_dict(state, strict=True)
    model.eval()
    diffusion = build_diffusion(job.diffusion.with_respacing(respacing))
    torch.manual_seed(seed)  # DDPM steps draw from the global RNG (as the reference)
    generator = torch.Generator(device).manual_seed(seed)
    size = job.model.image_size
    noise = torch.randn((count, 3, size, size), generator=generator, device=device)  # [N, 3, H, W]
    model_kwargs = {}
    if job.model.class_cond:
        model_kwargs["y"] = torch.arange(count, device=device) % job.model.num_classes
    loop = diffusion.ddim_sample_loop if respacing.startswith("ddim") else diffusion.p_sample_loop
    return loop(model, noise.shape, noise=noise, clip_denoised=True, model_kwargs=model_kwargs,
                device=device)
