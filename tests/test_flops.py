"""The FLOP count behind every run's logged MFU (iddpm_ds/train/flops.py), against a hand
count from the layer shapes of a real forward + backward; and the logged fields."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from iddpm_ds.diffusion import build_diffusion
from iddpm_ds.models import build_model, set_kernels
from iddpm_ds.models.unet import AttentionBlock
from iddpm_ds.testing import tiny_job
from iddpm_ds.train.flops import train_flops_per_image
from iddpm_ds.train.metrics import utilisation


def hand_count(job, batch: int = 2) -> float:
    """Forward + backward FLOPs per image of the job's model, from each layer's shapes as a
    real CPU step meets them: a convolution or linear layer does 2 * outputs * (inputs per
    output) in forward, the same again for its weight gradient, and once more for its input
    gradient when its input needs one (not for x_t or the timestep features). Attention
    does q k^T and weights v: 2 * 2 * L^2 * C per image forward, both operands' gradients
    in backward (twice that)."""
    torch.manual_seed(0)
    # model FLOPs: no checkpoint recomputation (its forward hooks would fire twice too)
    model = set_kernels(build_model(job.model.model_copy(update={"use_checkpoint": False})), attention="math")
    total = [0.0]

    def layer(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            per_output = module.in_features
        else:  # Conv1d / Conv2d: input channels per group times the kernel's taps
            per_output = module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
        forward = 2.0 * output.numel() * per_output
        total[0] += forward * (3 if inputs[0].requires_grad else 2)

    def attention(module: AttentionBlock, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]  # [N, C, H, W]
        n, c, length = x.shape[0], x.shape[1], x[0, 0].numel()
        total[0] += 3 * (2 * 2.0 * n * length * length * c)  # forward + both gradients

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            module.register_forward_hook(layer)
        elif isinstance(module, AttentionBlock):
            module.register_forward_hook(attention)
    diffusion = build_diffusion(job.diffusion)
    x_start = torch.rand(batch, 3, job.model.image_size, job.model.image_size) * 2 - 1  # [N, C, H, W]
    t = torch.randint(0, diffusion.num_timesteps, (batch,))
    y = torch.randint(0, 10, (batch,))
    diffusion.training_losses(model, x_start, t, model_kwargs={"y": y})["loss"].mean().backward()
    return total[0] / batch


@pytest.mark.parametrize("overrides", [{}, {"model.use_checkpoint": True, "train.attention_kernel": "sdpa"},
                                       {"model.num_res_blocks": 2, "model.attention_resolutions": "16,8"}])
def test_flops_per_image_match_a_hand_count_of_the_layers(tmp_path, overrides):
    job = tiny_job(tmp_path / "run", None, **overrides)
    assert train_flops_per_image(job) == pytest.approx(hand_count(job), rel=1e-9)


def test_utilisation_fields_on_cpu(tmp_path):
    """CPU: no data-sheet peak, so no MFU claimed; the achieved rate and max RSS, named."""
    fields = utilisation(2_000_000_000, 50.0, torch.device("cpu"), "bf16")
    assert fields["tflops_per_s_per_rank"] == pytest.approx(0.1)  # one rank: 2 GFLOP x 50 img/s
    assert fields["mfu"] is None and fields["peak_tflops_per_s"] is None
    assert fields["memory_kind"] == "cpu_max_rss" and fields["memory_mb_per_rank"][0] > 10
