"""Drawing the images of a training sample grid (the grid itself: periodic.write_sample_grid)."""
from __future__ import annotations

import torch

from ..dist import output
from ..data import build_eval_stream
from ..diffusion import build_diffusion
from ..models import build_model
from ..superres import downsample


@torch.no_grad()
def sample_images(job, state: dict[str, torch.Tensor], device: torch.device, count: int,
                  respacing: str, seed: int,
                  model_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """count images [N, 3, H, W] in [-1, 1] from `state` with DDIM/DDPM at `respacing`;
    `model_kwargs` (a super-resolution grid's low_res and y) replaces the default labels."""
    model = build_model(job.model).to(device)
    model.load_state_dict(state, strict=True)
    model.eval()
    diffusion = build_diffusion(job.diffusion.with_respacing(respacing))
    torch.manual_seed(seed)  # DDPM steps draw from the global RNG (as the reference)
    generator = torch.Generator(device).manual_seed(seed)
    size = job.model.image_size
    noise = torch.randn((count, 3, size, size), generator=generator, device=device)  # [N, 3, H, W]
    if model_kwargs is None:
        model_kwargs = {}
    if job.model.class_cond and "y" not in model_kwargs:
        model_kwargs["y"] = torch.arange(count, device=device) % job.model.num_classes
    loop = diffusion.ddim_sample_loop if respacing.startswith("ddim") else diffusion.p_sample_loop
    return loop(model, noise.shape, noise=noise, clip_denoised=True, model_kwargs=model_kwargs,
                device=device)


def super_res_inputs(job, count: int, device: torch.device
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The first `count` held-out images (training images when no eval_shards) with their
    model_kwargs: low_res (area-downsampled) and y. Read by the calling rank alone."""
    data = job.data
    if data.eval_shards is None:
        data = data.model_copy(update={"eval_shards": data.shards})
    stream = build_eval_stream(data, image_size=job.model.image_size,
                               class_cond=job.model.class_cond, batch_size=count, rank=0,
                               world_size=1, num_samples=count,
                               num_classes=job.model.num_classes)
    xs, ys = [], []
    for x, cond, mask in stream.padded():    # once per grid: host-side masking is fine
        xs.append(x[mask])
        if "y" in cond:
            ys.append(cond["y"][mask])
    x = torch.cat(xs)[:count].to(device)                                   # [n, 3, H, W]
    if not len(x):
        raise RuntimeError("no readable image for the super-resolution sample grid")
    model_kwargs = {"low_res": downsample(x, job.model.small_size)}        # [n, 3, s, s]
    if ys:
        model_kwargs["y"] = torch.cat(ys)[:count].to(device)
    output.log0("sample_grid_inputs", images=len(x), held_out=job.data.eval_shards is not None)
    return x, model_kwargs
