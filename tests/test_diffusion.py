"""Gaussian diffusion: schedules, losses, posterior, respacing, samplers, training losses.

Checks are analytic: every expected value below is computed here from the formula
(Bayes on Gaussians, the Gaussian KL, the schedules' definitions), not by the code
under test.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from iddpm_ds import DiffusionSpec, build_diffusion
from iddpm_ds.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    mean_flat,
    normal_kl,
    space_timesteps,
)


class TinyModel(nn.Module):
    """A 3x3 conv whose output also depends on the timestep, 3 or 6 output channels."""

    def __init__(self, out_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, out_channels, 3, padding=1)
        self.t_scale = nn.Parameter(torch.tensor(0.01))
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        self.seen_t.append(t.detach().clone())
        # tanh keeps a learned-range output in [-1, 1], as a trained model's would be.
        return torch.tanh(self.conv(x) + self.t_scale * t.float().view(-1, 1, 1, 1) / 1000)


def cosine_abar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def make(steps=100, schedule="cosine", respacing="", **flags) -> SpacedDiffusion:
    return build_diffusion(DiffusionSpec(
        diffusion_steps=steps, noise_schedule=schedule, timestep_respacing=respacing, **flags))


def images(n=4, seed=0, size=8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ----------------------------------------------------------------- schedules
def test_linear_betas_match_formula():
    for T in (1000, 250, 40):
        betas = get_named_beta_schedule("linear", T)
        scale = 1000 / T
        i = np.arange(T)
        expected = scale * 1e-4 + i * (scale * 0.02 - scale * 1e-4) / (T - 1)
        assert betas.dtype == np.float64 and betas.shape == (T,)
        np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=1e-15)
        assert betas[0] == pytest.approx(0.1 / T) and betas[-1] == pytest.approx(20 / T)


def test_cosine_betas_match_formula_and_clip():
    T = 1000
    betas = get_named_beta_schedule("cosine", T)
    expected = np.array([min(1 - cosine_abar((i + 1) / T) / cosine_abar(i / T), 0.999) for i in range(T)])
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    assert betas[-1] == 0.999  # abar(1) = cos(pi/2)^2 ~ 0 -> clipped
    abar = np.cumprod(1 - betas)
    # Unclipped steps reproduce abar(t/T) / abar(0) exactly (telescoping product).
    unclipped = np.nonzero(betas < 0.999)[0]
    ref = np.array([cosine_abar((i + 1) / T) / cosine_abar(0) for i in unclipped])
    np.testing.assert_allclose(abar[unclipped], ref, rtol=1e-9)


def test_unknown_schedule_and_too_few_linear_steps_are_clear_errors():
    with pytest.raises(NotImplementedError, match="sqrt"):
        get_named_beta_schedule("sqrt", 100)
    with pytest.raises(ValueError, match="sqrt"):
        get_named_beta_schedule("sqrt", 100)
    with pytest.raises(ValueError, match="10 steps"):
        get_named_beta_schedule("linear", 10)
    with pytest.raises(ValueError):  # pydantic rejects the name before any compute
        DiffusionSpec(noise_schedule="sqrt")


# -------------------------------------------------------------------- losses
def test_normal_kl_zero_for_equal_and_matches_analytic():
    m = torch.randn(10, dtype=torch.float64)
    lv = torch.randn(10, dtype=torch.float64)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(10, dtype=torch.float64), atol=1e-14)
    # KL(N(1, 2) || N(0, 1)) = 0.5 log(1/2) + (2 + 1) / 2 - 0.5
    kl = normal_kl(torch.tensor(1.0, dtype=torch.float64), math.log(2.0), 0.0, 0.0)
    assert kl.item() == pytest.approx(0.5 * math.log(0.5) + 1.5 - 0.5, rel=1e-12)
    m1, m2 = torch.randn(2, 50, dtype=torch.float64)
    v1, v2 = torch.rand(2, 50, dtype=torch.float64) + 0.1
    analytic = 0.5 * torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
    assert torch.allclose(normal_kl(m1, v1.log(), m2, v2.log()), analytic, rtol=1e-10)


def test_approx_cdf_close_to_erf():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 5e-4


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.1)), (0.37, math.log(0.01)), (-0.9, 0.0),
                                            (1.5, math.log(0.5)), (0.0, math.log(1e-3))])
def test_discretized_likelihood_sums_to_one_over_256_bins(mean, log_scale):
    x = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).view(256, 1)  # every level
    means = torch.full_like(x, mean)
    log_scales = torch.full_like(x, log_scale)
    logp = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    assert (logp <= 0).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_discretized_likelihood_bin_probability():
    # A middle bin's probability is (approximately) Phi(upper) - Phi(lower).
    x = torch.tensor([[0.2 - 0.2 % (2 / 255)]], dtype=torch.float64)
    mean, sd = torch.tensor([[0.21]], dtype=torch.float64), 0.05
    logp = discretized_gaussian_log_likelihood(x, means=mean, log_scales=torch.full_like(x, math.log(sd)))
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    xv, mv = x.item(), mean.item()
    exact = phi((xv + 1 / 255 - mv) / sd) - phi((xv - 1 / 255 - mv) / sd)
    assert logp.exp().item() == pytest.approx(exact, rel=2e-3)


def test_mean_flat():
    x = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(mean_flat(x), torch.tensor([5.5, 17.5]))


# --------------------------------------------------------- forward / posterior
def test_q_sample_empirical_mean_and_variance():
    d = make(100)
    torch.manual_seed(0)
    n = 20000
    x0 = torch.tensor([0.8, -0.3, 0.0]).view(1, 3, 1, 1).expand(n, 3, 1, 1)
    for step in (0, 37, 99):
        t = torch.full((n,), step, dtype=torch.long)
        xt = d.q_sample(x0, t)
        abar = d.alphas_cumprod[step]
        mean, var = xt.mean(0).flatten(), xt.var(0).flatten()
        sd_err = math.sqrt(1 - abar) / math.sqrt(n)
        assert torch.allclose(mean, math.sqrt(abar) * x0[0].flatten(), atol=5 * sd_err + 1e-6)
        assert torch.allclose(var, torch.full((3,), 1 - abar), rtol=0.05, atol=1e-6)
        m, v, lv = d.q_mean_variance(x0[:2], t[:2])
        assert torch.allclose(m, math.sqrt(abar) * x0[:2]) and torch.allclose(v, torch.full_like(v, 1 - abar))
        assert torch.allclose(lv, torch.full_like(lv, math.log(1 - abar)), rtol=1e-5)


def test_q_posterior_matches_bayes_on_gaussians():
    d = make(100, schedule="linear")
    x0, xt = images(5, seed=1), images(5, seed=2)
    t = torch.tensor([0, 1, 2, 50, 99])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    betas = d.betas
    for k, step in enumerate(t.tolist()):
        beta = betas[step]
        abar_prev = np.prod(1 - betas[:step])  # empty product at t = 0 is 1
        # q(x_t | x_{t-1}) = N(sqrt(1-beta) x_{t-1}, beta); q(x_{t-1} | x_0) = N(sqrt(abar_prev) x0, 1-abar_prev)
        if step == 0:
            exp_var, exp_mean = 0.0, x0[k].double()
        else:
            precision = (1 - beta) / beta + 1 / (1 - abar_prev)
            exp_var = 1 / precision
            exp_mean = exp_var * (math.sqrt(1 - beta) * xt[k].double() / beta
                                  + math.sqrt(abar_prev) * x0[k].double() / (1 - abar_prev))
        assert torch.allclose(mean[k].double(), exp_mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(var[k].double(), torch.full_like(exp_mean, exp_var), rtol=1e-5, atol=1e-12)
    # Entry 0 of the clipped log variance is entry 1's value.
    assert torch.allclose(logvar[0], logvar[1]) and torch.allclose(logvar[1], var[1].log())


def test_coefficients_are_float64_and_gathered_as_float32():
    d = make(100)
    assert d.betas.dtype == np.float64 and d.posterior_variance.dtype == np.float64
    t = torch.tensor([3, 77])
    got = d._extract("posterior_mean_coef2", t, (2, 1, 1, 1))
    assert got.dtype == torch.float32
    expected = torch.from_numpy(d.posterior_mean_coef2[[3, 77]]).float().view(2, 1, 1, 1)
    assert torch.equal(got, expected)  # float64 -> float32 exactly as the reference casts
    assert torch.equal(torch.from_numpy(d.fixed_large_variance),
                       torch.from_numpy(np.append(d.posterior_variance[1], d.betas[1:])))


# ---------------------------------------------------------------- respacing
def test_space_timesteps_single_section_ties_round_to_even():
    # stride 99/24 = 4.125 is exact in binary: 16.5 -> 16, 49.5 -> 50, 82.5 -> 82.
    expected = [0, 4, 8, 12, 16, 21, 25, 29, 33, 37, 41, 45, 50, 54, 58, 62, 66, 70, 74, 78,
                82, 87, 91, 95, 99]
    assert sorted(space_timesteps(100, "25")) == expected
    assert sorted(space_timesteps(100, 25)) == expected
    assert space_timesteps(100, "100") == set(range(100))


def test_space_timesteps_sections_34_33_33():
    expected = ([0, 4, 7, 11, 15, 18, 22, 26, 29, 33]           # section 0..33, stride 33/9
                + [34, 38, 41, 45, 48, 52, 55, 59, 62, 66]      # section 34..66, stride 32/9
                + [67, 71, 74, 78, 81, 85, 88, 92, 95, 99])     # section 67..99, stride 32/9
    assert sorted(space_timesteps(100, "10,10,10")) == expected
    assert sorted(space_timesteps(100, [10, 10, 10])) == expected


def test_space_timesteps_ddim_and_errors():
    assert sorted(space_timesteps(100, "ddim25")) == list(range(0, 100, 4))
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    with pytest.raises(ValueError, match="41"):
        space_timesteps(100, "ddim41")
    with pytest.raises(ValueError, match="101"):
        space_timesteps(100, "101")
    with pytest.raises(ValueError, match="40"):
        space_timesteps(100, "10,40,10")  # sections of 34/33/33
    with pytest.raises(ValueError, match="ddimx"):
        space_timesteps(100, "ddimx")
    with pytest.raises(ValueError, match="77"):  # the spec validates before any compute
        DiffusionSpec(diffusion_steps=50, timestep_respacing="77")


def test_respaced_betas_and_timestep_map():
    base = make(100, schedule="linear")
    abar = base.alphas_cumprod  # all steps kept: same marginals as the base process
    for respacing in ("ddim25", "10,10,10", "25"):
        d = make(100, schedule="linear", respacing=respacing)
        kept = sorted(space_timesteps(100, respacing))
        assert d.timestep_map == kept and d.num_timesteps == len(kept) and d.original_num_steps == 100
        prev = np.concatenate([[1.0], abar[kept[:-1]]])
        np.testing.assert_allclose(d.betas, 1 - abar[kept] / prev, rtol=1e-12)
        np.testing.assert_allclose(d.alphas_cumprod, abar[kept], rtol=1e-12)
    raw = np.cumprod(1 - get_named_beta_schedule("linear", 100))
    np.testing.assert_array_equal(base.betas, 1 - raw / np.append(1.0, raw[:-1]))


@pytest.mark.parametrize("rescale", [True, False])
def test_model_receives_mapped_float_timesteps(rescale):
    d = make(100, respacing="ddim25", rescale_timesteps=rescale)
    model = TinyModel()
    t = torch.tensor([0, 1, 24, 10])
    d.training_losses(model, images(4), t)
    seen = model.seen_t[-1]
    assert seen.dtype == torch.float32
    expected = torch.tensor([0.0, 4.0, 96.0, 40.0]) * (10.0 if rescale else 1.0)
    assert torch.equal(seen, expected)
    # Every sampler goes through the same wrapper.
    model.seen_t.clear()
    d.ddim_sample(model, images(4), t)
    assert torch.equal(model.seen_t[-1], expected)


def test_model_kwargs_are_forwarded():
    d = make(100, respacing="10")
    got = {}

    def model(x, t, y=None, low_res=None):
        got.update(y=y, low_res=low_res)
        return torch.zeros_like(x)

    y = torch.tensor([1, 2])
    d.training_losses(model, images(2), torch.tensor([1, 2]), model_kwargs={"y": y, "low_res": 5})
    assert got["y"] is y and got["low_res"] == 5


# ------------------------------------------------------------ training losses
def test_vb_gradient_reaches_only_variance_channels():
    d = make(100, learn_sigma=True)
    x0 = images(4)
    out = (torch.rand(4, 6, 8, 8) * 2 - 1).requires_grad_(True)
    terms = d.training_losses(lambda x, t, **kw: out, x0, torch.tensor([0, 5, 50, 99]))
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert torch.count_nonzero(grad[:, :3]) == 0
    assert (grad[:, 3:].abs().sum(dim=(1, 2, 3)) > 0).all()  # every sample, t = 0 included
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.count_nonzero(grad_mse[:, 3:]) == 0 and torch.count_nonzero(grad_mse[:, :3]) > 0


def analytic_vb_bits(d: GaussianDiffusion, x0, xt, eps, v, step: int) -> torch.Tensor:
    """KL(q(x_{t-1}|x_t,x_0) || p) / ln 2 for eps-prediction and learned-range variance,
    from the textbook formulas in float64."""
    b = d.betas.astype(np.float64)
    abar = np.cumprod(1 - b)
    ab, ab_prev, beta = abar[step], abar[step - 1], b[step]
    post_var = beta * (1 - ab_prev) / (1 - ab)
    post_var_1 = b[1] * (1 - abar[0]) / (1 - abar[1])
    x0, xt, eps, v = (a.double() for a in (x0, xt, eps, v))
    true_mean = (math.sqrt(ab_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - ab_prev) * xt) / (1 - ab)
    true_logvar = math.log(post_var if step > 0 else post_var_1)
    pred_x0 = (xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    p_mean = (math.sqrt(ab_prev) * beta * pred_x0 + math.sqrt(1 - beta) * (1 - ab_prev) * xt) / (1 - ab)
    frac = (v + 1) / 2
    p_logvar = frac * math.log(beta) + (1 - frac) * math.log(post_var)
    kl = 0.5 * (p_logvar - true_logvar) + (math.exp(true_logvar) + (true_mean - p_mean) ** 2) / (
        2 * p_logvar.exp()) - 0.5
    return kl.mean(dim=(1, 2, 3)) / math.log(2)


def test_hybrid_loss_is_mse_plus_scaled_analytic_vb():
    for respacing, T in (("", 100), ("ddim20", 20)):
        d = make(100, respacing=respacing, learn_sigma=True)
        assert d.loss_type == LossType.RESCALED_MSE and d.num_timesteps == T
        x0 = images(3, seed=3)
        noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
        out = torch.cat([torch.randn(3, 3, 8, 8), torch.rand(3, 3, 8, 8) * 2 - 1], dim=1)
        t = torch.tensor([1, T // 2, T - 1])
        terms = d.training_losses(lambda x, ts, **kw: out, x0, t, noise=noise)
        assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
        assert torch.allclose(terms["mse"], ((noise - out[:, :3]) ** 2).mean(dim=(1, 2, 3)))
        xt = d.q_sample(x0, t, noise=noise)
        for k, step in enumerate(t.tolist()):
            vb = analytic_vb_bits(d, x0[k:k + 1], xt[k:k + 1], out[k:k + 1, :3], out[k:k + 1, 3:], step)
            assert terms["vb"][k].item() == pytest.approx(vb.item() * T / 1000, rel=1e-4)
    # Plain MSE with learned sigma: same vb, not rescaled.
    d_mse = make(100, learn_sigma=True, rescale_learned_sigmas=False)
    assert d_mse.loss_type == LossType.MSE
    terms = d_mse.training_losses(lambda x, ts, **kw: out, x0, torch.tensor([1, 50, 99]), noise=noise)
    xt = d_mse.q_sample(x0, torch.tensor([1, 50, 99]), noise=noise)
    vb = analytic_vb_bits(d_mse, x0[1:2], xt[1:2], out[1:2, :3], out[1:2, 3:], 50)
    assert terms["vb"][1].item() == pytest.approx(vb.item(), rel=1e-4)


def test_rescaled_kl_is_vb_times_T_and_decoder_nll_at_t0():
    d = make(100, respacing="50", use_kl=True, learn_sigma=True)
    assert d.loss_type == LossType.RESCALED_KL
    x0 = images(2)
    noise = torch.randn_like(x0)
    out = torch.cat([torch.randn(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)], dim=1)
    model = lambda x, ts, **kw: out  # noqa: E731
    t = torch.tensor([0, 30])
    terms = d.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss"}
    xt = d.q_sample(x0, t, noise=noise)
    vb = d._vb_terms_bpd(model, x0, xt, t, clip_denoised=False)["output"]
    assert torch.allclose(terms["loss"], vb * 50)
    p = d.p_mean_variance(model, xt, t, clip_denoised=False)
    nll0 = -discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"])
    assert vb[0].item() == pytest.approx(mean_flat(nll0)[0].item() / math.log(2), rel=1e-6)


def test_learned_range_and_fixed_variances():
    x, t = images(2), torch.tensor([0, 40])
    for flags, expected in (({"sigma_small": True}, "small"), ({}, "large"), ({"learn_sigma": True}, "range")):
        d = make(100, **flags)
        v = torch.full((2, 3, 8, 8), 1.5)  # outside [-1, 1]: extrapolates, no clamping
        model = (lambda x_, ts, **kw: torch.cat([x_, v], 1)) if expected == "range" else (lambda x_, ts, **kw: x_)
        lv = d.p_mean_variance(model, x, t)["log_variance"][:, 0, 0, 0].double()
        steps = [0, 40]
        small = np.log(np.append(d.posterior_variance[1], d.posterior_variance[1:]))[steps]
        large = np.log(np.append(d.posterior_variance[1], d.betas[1:]))[steps]
        want = {"small": small, "large": large, "range": 1.25 * np.log(d.betas[steps]) - 0.25 * small}[expected]
        assert np.allclose(lv.numpy(), want, rtol=1e-6), expected


MEAN_TYPES = list(ModelMeanType)
VAR_TYPES = list(ModelVarType)
LOSS_TYPES = list(LossType)


def test_every_parameterisation_trains_forward_and_backward():
    torch.manual_seed(0)
    betas = get_named_beta_schedule("cosine", 50)
    x0 = images(3)
    for mean_type, var_type, loss_type in itertools.product(MEAN_TYPES, VAR_TYPES, LOSS_TYPES):
        d = SpacedDiffusion(
            use_timesteps=space_timesteps(50, "25"), betas=betas, model_mean_type=mean_type,
            model_var_type=var_type, loss_type=loss_type, rescale_timesteps=True)
        learned = var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        model = TinyModel(6 if learned else 3)
        terms = d.training_losses(model, x0, torch.tensor([0, 7, 24]))
        combo = (mean_type.name, var_type.name, loss_type.name)
        assert terms["loss"].shape == (3,) and torch.isfinite(terms["loss"]).all(), combo
        if not loss_type.is_vb():
            assert ("vb" in terms) == learned and terms["mse"].shape == (3,), combo
        terms["loss"].mean().backward()
        grad = model.conv.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, combo


def test_bf16_model_output_is_cast_to_float32():
    d = make(100, learn_sigma=True)
    model = TinyModel(6).to(torch.bfloat16)
    terms = d.training_losses(lambda x, ts, **kw: model(x.bfloat16(), ts), images(2), torch.tensor([0, 60]))
    assert all(v.dtype == torch.float32 for v in terms.values())
    terms["loss"].sum().backward()
    assert model.conv.weight.grad.dtype == torch.bfloat16


def test_wrong_output_channels_is_a_clear_error():
    d = make(100, learn_sigma=True)
    with pytest.raises(ValueError, match="learn_sigma"):
        d.training_losses(TinyModel(3), images(2), torch.tensor([1, 2]))


# ------------------------------------------------------------------ sampling
def test_p_sample_adds_no_noise_at_t0():
    d = make(100)
    model = TinyModel()
    x = images(2)
    t = torch.tensor([0, 0])
    torch.manual_seed(1)
    a = d.p_sample(model, x, t)["sample"]
    torch.manual_seed(2)
    b = d.p_sample(model, x, t)["sample"]
    assert torch.equal(a, b)
    assert torch.equal(a, d.p_mean_variance(model, x, t)["mean"])
    torch.manual_seed(1)
    c = d.p_sample(model, x, torch.tensor([5, 5]))["sample"]
    torch.manual_seed(2)
    assert not torch.equal(c, d.p_sample(model, x, torch.tensor([5, 5]))["sample"])


def test_p_sample_loop_reproducible_with_fixed_noise_and_seed():
    d = make(100, respacing="10")
    model = TinyModel()
    noise = torch.randn(2, 3, 8, 8)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(d.p_sample_loop(model, (2, 3, 8, 8), noise=noise))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert torch.isfinite(runs[0]).all()
    steps = list(d.p_sample_loop_progressive(model, (2, 3, 8, 8), noise=noise))
    assert len(steps) == 10 and set(steps[0]) == {"sample", "pred_xstart"}


def test_ddim_eta0_deterministic_given_noise():
    d = make(100, respacing="ddim10")
    model = TinyModel()
    noise = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    a = d.ddim_sample_loop(model, (2, 3, 8, 8), noise=noise)
    torch.manual_seed(123)
    b = d.ddim_sample_loop(model, (2, 3, 8, 8), noise=noise)
    c = d.ddim_sample_loop(model, (2, 3, 8, 8), noise=torch.randn(2, 3, 8, 8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.manual_seed(0)
    e1 = d.ddim_sample_loop(model, (2, 3, 8, 8), noise=noise, eta=1.0)
    torch.manual_seed(1)
    e2 = d.ddim_sample_loop(model, (2, 3, 8, 8), noise=noise, eta=1.0)
    assert not torch.equal(e1, e2)


@pytest.mark.parametrize("step,eta", [("p_sample", None), ("ddim_sample", 0.0),
                                      ("ddim_sample", 0.7)])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_injected_noise_is_the_global_rng_draw_it_replaces(step, eta, learn_sigma):
    # noise_fn must be a drop-in for the reference's torch.randn_like: same draws, same step
    d = make(100, respacing="ddim10" if eta is not None else "10", learn_sigma=learn_sigma)
    model = TinyModel(6 if learn_sigma else 3)
    x, t = images(3), torch.tensor([0, 4, 9])  # t = 0 adds no noise in both
    kwargs = {} if eta is None else {"eta": eta}
    torch.manual_seed(5)
    expected = getattr(d, step)(model, x, t, **kwargs)["sample"]
    torch.manual_seed(5)
    noise = torch.randn_like(x)
    torch.manual_seed(6)  # the global RNG must not matter any more
    got = getattr(d, step)(model, x, t, noise_fn=lambda like: noise, **kwargs)["sample"]
    assert torch.equal(got, expected)
    zero = getattr(d, step)(model, x, t, noise_fn=torch.zeros_like, **kwargs)["sample"]
    assert torch.equal(zero[0], got[0])
    assert torch.equal(zero[1:], got[1:]) == (eta == 0.0)  # only DDIM at eta 0 ignores noise
    with pytest.raises(ValueError, match=r"noise_fn gave shape \(1, 3, 8, 8\)"):
        getattr(d, step)(model, x, t, noise_fn=lambda like: noise[:1], **kwargs)


@pytest.mark.parametrize("loop,eta", [("p_sample_loop", None), ("ddim_sample_loop", 1.0)])
def test_loops_take_every_step_noise_from_noise_fn(loop, eta):
    d = make(100, respacing="ddim5" if eta else "5")
    model, x_T = TinyModel(), images(2, seed=1)
    kwargs = {} if eta is None else {"eta": eta}
    calls = []

    def noise_fn(like: torch.Tensor) -> torch.Tensor:
        calls.append(like.shape)
        return torch.randn(like.shape, generator=gen)

    runs = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(3)
        torch.manual_seed(seed)
        runs.append(getattr(d, loop)(model, x_T.shape, noise=x_T, noise_fn=noise_fn, **kwargs))
    assert torch.equal(runs[0], runs[1]) and calls == [x_T.shape] * 10
    torch.manual_seed(0)
    assert not torch.equal(runs[0], getattr(d, loop)(model, x_T.shape, noise=x_T, **kwargs))


def test_ddim_reverse_then_forward_round_trip():
    # With eps == 0, x_t = sqrt(abar_t) x_0 exactly: reverse and forward DDIM steps invert.
    d = make(100, respacing="ddim20")
    zero_eps = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731
    x0 = images(2) * 0.5
    t = torch.tensor([7, 7])
    x7 = d.q_sample(x0, t, noise=torch.zeros_like(x0))
    x8 = d.ddim_reverse_sample(zero_eps, x7, t, clip_denoised=False)["sample"]
    back = d.ddim_sample(zero_eps, x8, t + 1, clip_denoised=False)["sample"]
    assert torch.allclose(back, x7, atol=1e-5)
    assert torch.allclose(x8, d.q_sample(x0, t + 1, noise=torch.zeros_like(x0)), atol=1e-5)
    with pytest.raises(ValueError):
        d.ddim_reverse_sample(zero_eps, x7, t, eta=0.5)


def test_calc_bpd_loop_shapes_and_prior():
    d = make(100, respacing="8", learn_sigma=True)
    x0 = images(3)
    out = d.calc_bpd_loop(TinyModel(6), x0)
    assert out["vb"].shape == (3, 8) and out["xstart_mse"].shape == (3, 8) and out["mse"].shape == (3, 8)
    assert out["total_bpd"].shape == (3,) and out["prior_bpd"].shape == (3,)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert torch.allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    ab = d.alphas_cumprod[-1]
    prior = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x0.double() ** 2)
    assert torch.allclose(out["prior_bpd"].double(), prior.mean(dim=(1, 2, 3)) / math.log(2), rtol=1e-4)
    # Fresh noise at every step: with eps_pred == 0 the mse column k is mean(noise_k^2),
    # so equal columns would mean reused noise.
    zero = lambda x, t, **kw: torch.zeros(x.shape[0], 6, *x.shape[2:])  # noqa: E731
    mse = d.calc_bpd_loop(zero, x0, clip_denoised=False)["mse"]
    assert torch.allclose(mse.mean(), torch.tensor(1.0), atol=0.15)
    assert len(set(mse[0].tolist())) == 8


# ------------------------------------------------------------------ builder
def test_build_diffusion_maps_flags_like_the_reference():
    d = build_diffusion(DiffusionSpec())
    assert isinstance(d, SpacedDiffusion) and d.num_timesteps == 1000 and d.original_num_steps == 1000
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
        ModelMeanType.EPSILON, ModelVarType.FIXED_LARGE, LossType.RESCALED_MSE)
    assert d.rescale_timesteps and d.timestep_map == list(range(1000))
    np.testing.assert_allclose(d.betas, get_named_beta_schedule("linear", 1000), rtol=1e-9)
    d = build_diffusion(DiffusionSpec(sigma_small=True, predict_xstart=True, rescale_learned_sigmas=False,
                                      rescale_timesteps=False))
    assert (d.model_mean_type, d.model_var_type, d.loss_type, d.rescale_timesteps) == (
        ModelMeanType.START_X, ModelVarType.FIXED_SMALL, LossType.MSE, False)
    d = build_diffusion(DiffusionSpec(learn_sigma=True, use_kl=True, timestep_respacing="ddim50"))
    assert (d.model_var_type, d.loss_type, d.num_timesteps) == (
        ModelVarType.LEARNED_RANGE, LossType.RESCALED_KL, 50)


def test_diffusion_pickles_without_device_caches():
    import pickle

    d = make(100, respacing="10")
    d.training_losses(TinyModel(), images(2), torch.tensor([1, 2]))
    assert d._device_tables
    d2 = pickle.loads(pickle.dumps(d))
    assert d2._device_tables == {} and d2.timestep_map == d.timestep_map


def test_with_the_project_unet():
    from iddpm_ds import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec(image_size=8, num_channels=32, num_res_blocks=1, attention_resolutions=(4,),
                     channel_mult=(1, 2), num_heads=1, learn_sigma=True)
    model = build_model(spec)
    d = make(100, respacing="20", learn_sigma=True)
    terms = d.training_losses(model, images(2), torch.tensor([0, 19]))
    terms["loss"].mean().backward()
    assert torch.isfinite(terms["loss"]).all() and "vb" in terms
    sample = d.ddim_sample_loop(model, (1, 3, 8, 8))
    assert sample.shape == (1, 3, 8, 8) and torch.isfinite(sample).all()


@pytest.mark.parametrize("flags", [{"learn_sigma": True}, {"learn_sigma": True, "use_kl": True}, {}])
def test_training_losses_never_reads_values_on_the_host(flags):
    # On the meta device tensors have no values: any .item()/.cpu()/data-dependent
    # Python branch would raise, so this proves the training step has no host sync.
    with pytest.raises(Exception):
        torch.empty(1, device="meta").item()
    d = make(100, respacing="50", **flags)
    model = TinyModel(6 if flags else 3).to("meta")
    x0 = torch.empty(4, 3, 8, 8, device="meta")
    t = torch.empty(4, dtype=torch.long, device="meta")
    terms = d.training_losses(model, x0, t)
    terms["loss"].mean().backward()
    assert all(v.shape == (4,) and v.device.type == "meta" for v in terms.values())
    assert model.conv.weight.grad is not None
