"""Sample grids from the EMA weights during training."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import dist
from ..diffusion import build_diffusion
from ..images import make_grid, save_png, to_uint8
from ..models import build_model

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer


def write_sample_grid(trainer: "Trainer", rate: float) -> None:
    """Assemble the EMA weights (collective), sample on rank 0, write PNG + TensorBoard."""
    job = trainer.job
    index = trainer.ema.rates.index(rate)
    state = trainer.master.full_state_dict(trainer.ema.params[index])
    if dist.is_main() and job.model.small_size is None:
        # fork_rng: drawing the grid must not shift rank 0's training noise stream
        with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
            samples = sample_images(job, state, trainer.device, job.train.sample_count,
                                    job.train.sample_respacing, seed=job.train.seed)
        # class-conditional: one column per class (labels cycle 0..K-1)
        columns = min(job.model.num_classes, 10) if job.model.class_cond else None
        grid = make_grid(to_uint8(samples), nrow=columns)
        path = trainer.run_dir / "samples" / f"ema_{rate}_{trainer.step:06d}.png"
        save_png(grid, path, scale=2)
        trainer.writer.image(f"samples/ema_{rate}", grid, trainer.step)
        dist.log0("sample_grid", step=trainer.step, path=str(path))
    dist.wait_for_main("drawing the sample grid")


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
