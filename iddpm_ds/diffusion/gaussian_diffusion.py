"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021): forward process, posterior,
model parameterisations, the training losses and the ancestral / DDIM samplers.

Method and argument names are the reference's (improved-diffusion), so sampling code
written against it keeps working. This is the one implementation of the DDPM and DDIM
steps: each step's noise comes from an optional noise_fn (default: the global RNG, as in
the reference), which is how iddpm_ds.image_sampler gives every image its own noise.

Precision: every coefficient is a float64 numpy array indexed by t; it is gathered at t
from a float64 torch copy that lives on t's device (made once per device, so the
training step never syncs with the host) and only then cast to float32.

Dtypes: x_start, noise and x_t stay in the caller's dtype (float32 in training); the
model is called with x_t as is and float timesteps. Its output is cast to x_t's dtype
before any loss or sampling math, so a bf16/fp16 model (DeepSpeed engine) is fine as
long as the callable passed in casts its *inputs* to the engine's dtype (the train
loop's model wrapper does that; the diffusion never casts inputs).
"""
from __future__ import annotations

import enum
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

Model = Callable[..., torch.Tensor]
DenoisedFn = Optional[Callable[[torch.Tensor], torch.Tensor]]
# A step's noise source: x [N, ...] -> standard normal noise shaped like x. None is
# torch.randn_like (the global RNG, as the reference); the image sampler passes one that
# draws each image's noise from that image's own generator.
NoiseFn = Optional[Callable[[torch.Tensor], torch.Tensor]]


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise eps


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained."""

    LEARNED = enum.auto()  # the model outputs log variance
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (posterior variance at t = 0)
    LEARNED_RANGE = enum.auto()  # model output v in [-1, 1] interpolates log beta~_t .. log beta_t


class LossType(enum.Enum):
    MSE = enum.auto()  # raw MSE (+ vb when the variance is learned)
    RESCALED_MSE = enum.auto()  # hybrid: MSE + vb * T / 1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound times T (estimates the full bound)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


class GaussianDiffusion:
    """A diffusion process with T steps given by `betas` (float64, in (0, 1])."""

    def __init__(
        self,
        *,
        betas: np.ndarray | Sequence[float],
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must lie in (0, 1]; got min {betas.min()}, max {betas.max()}")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self._device_tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        with np.errstate(divide="ignore"):  # T = 1: the posterior variance is 0, its log -inf
            self._compute_tables()

    def _compute_tables(self) -> None:
        betas = self.betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1 else self.posterior_variance)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod))
        # Derived tables the reference computes inline (same float64 numbers, computed once).
        self.log_betas = np.log(betas)
        large = np.append(self.posterior_variance[1], betas[1:]) if self.num_timesteps > 1 else betas
        self.fixed_large_variance = large
        self.fixed_large_log_variance = np.log(large)
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1

    # ------------------------------------------------------------------ tables
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_device_tables"] = {}  # device copies are rebuilt on demand
        return state

    def _table(self, name: str, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The numpy table `name` as a torch tensor on `device`, copied there once."""
        if dtype == torch.float64 and device.type == "mps":  # no float64 on Apple GPUs
            dtype = torch.float32
        key = (name, device, dtype)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(np.ascontiguousarray(getattr(self, name))).to(device=device, dtype=dtype)
            self._device_tables[key] = table
        return table

    def _extract(self, name: str, t: torch.Tensor, broadcast_shape: Sequence[int]) -> torch.Tensor:
        """table[t] in float32, broadcast to broadcast_shape ([N] -> [N, 1, ...] -> shape)."""
        res = self._table(name, t.device)[t].float()  # [N]
        res = res.reshape(*res.shape, *([1] * (len(broadcast_shape) - res.dim())))
        return res.expand(*broadcast_shape)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ------------------------------------------------------- forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise)

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ")
        posterior_mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t)
        posterior_variance = self._extract("posterior_variance", t, x_t.shape)
        posterior_log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # -------------------------------------------------------- reverse process
    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: Optional[dict] = None,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from the model, and its prediction of x_0.

        Returns "mean", "variance", "log_variance", "pred_xstart" (each shaped like x).
        denoised_fn is applied to the predicted x_0 before clipping to [-1, 1].
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        model_output = _to_dtype_of(model(x, self._scale_timesteps(t), **model_kwargs), x)
        model_output, model_variance, model_log_variance = self._model_variance(model_output, x, t)

        def process_xstart(pred: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                pred = denoised_fn(pred)
            return pred.clamp(-1, 1) if clip_denoised else pred

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _model_variance(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split off the variance channels if learned: (mean part, variance, log variance)."""
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, model_var_values = _split_learned(model_output, x)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("log_betas", t, x.shape)
                frac = (model_var_values + 1) / 2  # v in [-1, 1] -> [0, 1], not clamped
                model_log_variance = frac * max_log + (1 - frac) * min_log
            return model_output, torch.exp(model_log_variance), model_log_variance
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            names = ("fixed_large_variance", "fixed_large_log_variance")
        else:
            names = ("posterior_variance", "posterior_log_variance_clipped")
        return (model_output, self._extract(names[0], t, x.shape), self._extract(names[1], t, x.shape))

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps)

    def _predict_xstart_from_xprev(
        self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor
    ) -> torch.Tensor:
        # Inverts posterior mean = coef1 * x_0 + coef2 * x_t.
        return (
            self._extract("recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._extract("posterior_mean_coef2_over_coef1", t, x_t.shape) * x_t)

    def _predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    # ---------------------------------------------------- ancestral sampling
    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: Optional[dict] = None,
        noise_fn: NoiseFn = None,
    ) -> dict[str, torch.Tensor]:
        """One step x_t -> x_{t-1}; no noise is added where t == 0. Returns "sample", "pred_xstart".
        noise_fn(x) gives the step's noise (default: torch.randn_like)."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        noise = _step_noise(noise_fn, x)  # [N, C, H, W]
        nonzero_mask = _nonzero_mask(t, x)  # [N, 1, ...]
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: Optional[dict] = None,
        device: Optional[torch.device] = None,
        progress: bool = False,
        noise_fn: NoiseFn = None,
    ) -> torch.Tensor:
        """Samples of `shape` from x_T = noise (or fresh N(0, I)) down to x_0; each step's
        noise from noise_fn (default: the global RNG)."""
        final = None
        for sample in self.p_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                model_kwargs=model_kwargs, device=device, progress=progress, noise_fn=noise_fn):
            final = sample
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: Optional[dict] = None,
        device: Optional[torch.device] = None,
        progress: bool = False,
        noise_fn: NoiseFn = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield p_sample's output at every step t = T-1, ..., 0."""
        yield from self._progressive(
            self.p_sample, model, shape, noise, device, progress,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
            noise_fn=noise_fn)

    # ---------------------------------------------------------------- DDIM
    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
        noise_fn: NoiseFn = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2020, eq. 12); eta = 0 is deterministic.
        noise_fn(x) gives the step's noise (default: torch.randn_like)."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        # Re-derive eps from the (possibly clipped) x_0 so the step is consistent with it.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (
            eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        noise = _step_noise(noise_fn, x)  # [N, C, H, W]; drawn even at eta = 0, as the reference
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Deterministic DDIM step x_t -> x_{t+1} (encoding an image into noise)."""
        if eta != 0.0:
            raise ValueError("the reverse ODE is only defined for deterministic DDIM (eta=0)")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: Optional[dict] = None,
        device: Optional[torch.device] = None,
        progress: bool = False,
        eta: float = 0.0,
        noise_fn: NoiseFn = None,
    ) -> torch.Tensor:
        """DDIM samples of `shape` from x_T = noise (or fresh N(0, I)); each step's noise
        (used when eta > 0) from noise_fn (default: the global RNG)."""
        final = None
        for sample in self.ddim_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
                noise_fn=noise_fn):
            final = sample
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: Optional[dict] = None,
        device: Optional[torch.device] = None,
        progress: bool = False,
        eta: float = 0.0,
        noise_fn: NoiseFn = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ddim_sample's output at every step t = T-1, ..., 0."""
        yield from self._progressive(
            self.ddim_sample, model, shape, noise, device, progress,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta,
            noise_fn=noise_fn)

    def _progressive(self, step: Callable[..., dict], model: Model, shape: Sequence[int],
                     noise: Optional[torch.Tensor], device: Optional[torch.device], progress: bool,
                     **step_kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
        """The shared reverse loop: x_T, then `step` at t = T-1, ..., 0, yielding each output."""
        img, device = _initial_noise(model, shape, noise, device)
        for i in _step_indices(self.num_timesteps, progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)  # [N]
            with torch.no_grad():
                out = step(model, img, t, **step_kwargs)
            yield out
            img = out["sample"]

    # --------------------------------------------------------------- losses
    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample term of the variational bound, in bits per dimension:
        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL -log p(x_0|x_1) at t = 0.
        Returns "output" [N] and "pred_xstart"."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)  # [N]
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)  # [N]
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses [N] at timesteps t [N]: "loss", plus "mse" (and "vb" when the
        variance is learned) for the MSE loss types. No host sync."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)  # [N, C, H, W]
        if self.loss_type.is_vb():
            loss = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                loss = loss * self.num_timesteps
            return {"loss": loss}
        model_output = _to_dtype_of(model(x_t, self._scale_timesteps(t), **model_kwargs), x_t)
        terms: dict[str, torch.Tensor] = {}
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, model_var_values = _split_learned(model_output, x_t)
            terms["vb"] = self._learned_variance_vb(model_output, model_var_values, x_start, x_t, t)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        if model_output.shape != target.shape:
            raise ValueError(f"model output {tuple(model_output.shape)} != target {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _learned_variance_vb(
        self,
        model_output: torch.Tensor,
        model_var_values: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """vb [N] that trains only the variance: the mean channels are detached, so the MSE
        alone drives the mean (IDDPM's hybrid objective)."""
        frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)  # [N, 2C, H, W]
        vb = self._vb_terms_bpd(
            model=lambda *args, r=frozen_out, **kwargs: r, x_start=x_start, x_t=x_t, t=t,
            clip_denoised=False)["output"]
        if self.loss_type == LossType.RESCALED_MSE:
            # The MSE term is a mean over T terms, the bound a sum; T/1000 keeps the
            # balance of the 1000-step case whatever T is.
            vb = vb * (self.num_timesteps / 1000.0)
        return vb

    # ------------------------------------------------------------ evaluation
    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) per sample in bits/dim [N]; not learned, ~0 for a good schedule."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / math.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None,
    ) -> dict[str, torch.Tensor]:
        """The full variational bound in bits/dim, one term per step, fresh noise per step.

        Returns total_bpd [N], prior_bpd [N], vb [N, T], xstart_mse [N, T], mse [N, T].
        """
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps)[::-1]:
            t_batch = torch.full((batch_size,), i, device=device, dtype=torch.long)  # [N]
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t_batch, clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb, dim=1)  # [N, T], column 0 is t = T-1 as in the reference
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb_t.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }


def _to_dtype_of(model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Model output in x's dtype (a bf16/fp16 model's output becomes float32 before the math)."""
    return model_output if model_output.dtype == x.dtype else model_output.to(x.dtype)


def _split_learned(model_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 2C, ...] -> mean part [N, C, ...], variance part [N, C, ...]."""
    n, c = x.shape[:2]
    if model_output.shape != (n, 2 * c, *x.shape[2:]):
        raise ValueError(
            f"a learned variance needs a model output of shape {(n, 2 * c, *x.shape[2:])} "
            f"(twice x's channels), got {tuple(model_output.shape)}: does model.learn_sigma "
            "agree with diffusion.learn_sigma?")
    return torch.split(model_output, c, dim=1)


def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1.0 where t != 0, else 0.0, shaped [N, 1, ...] to broadcast against x."""
    return (t != 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _step_noise(noise_fn: NoiseFn, x: torch.Tensor) -> torch.Tensor:
    """The step's standard normal noise shaped like x: noise_fn(x), else from the global RNG."""
    if noise_fn is None:
        return torch.randn_like(x)
    noise = noise_fn(x)
    if noise.shape != x.shape:
        raise ValueError(f"noise_fn gave shape {tuple(noise.shape)} for x of shape {tuple(x.shape)}")
    return noise


def _initial_noise(
    model: Model, shape: Sequence[int], noise: Optional[torch.Tensor], device: Optional[torch.device]
) -> tuple[torch.Tensor, torch.device]:
    if device is None:
        device = noise.device if noise is not None else next(model.parameters()).device
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
        return noise.to(device), device
    return torch.randn(*shape, device=device), device


def _step_indices(num_timesteps: int, progress: bool) -> Sequence[int]:
    indices = list(range(num_timesteps))[::-1]
    if progress:
        from tqdm.auto import tqdm  # only when asked; keeps import time low

        return tqdm(indices)
    return indices
