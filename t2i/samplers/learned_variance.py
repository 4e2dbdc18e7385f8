"""Ancestral DDPM sampling with a learned reverse-process variance (IDDPM, Nichol & Dhariwal 2021).

The denoiser contract carries x0 only, so the variance half of a learned-variance network travels
beside it: ``VarianceTap`` is the network seen as a plain (mean-only) one that keeps the variance
values of its latest call, and ``sample_ddpm_learned`` reads them after each denoiser call. Every
wrapper between the two (CFG, x0 clipping, classifier guidance) is untouched; with CFG the network
is called on [uncond; cond] and the conditional rows' variance is used, as GLIDE does. The mean half may
predict eps, v or x0 (the plan's prediction_type, read by the `DiscreteDenoiser` around the tap): the step
only sees the x0 it implies, so a v-predicting learned-variance network (`t2i train ddpm --learn-sigma
--prediction v_prediction`, `t2i train glide --prediction v_prediction`) samples as diffusers'
DDPMScheduler(prediction_type="v_prediction", variance_type="learned_range") does (tests/test_iddpm.py).

Each step is Algorithm 2 of Ho et al. (2020) with Sigma_theta of IDDPM eq. 15,
``log Sigma = v log beta_t + (1 - v) log beta~_t`` for this step's beta_t = 1 - acp_t / acp_prev
(a respaced run's betas, IDDPM sec. 4: acp_prev is the next kept timestep's), as diffusers'
DDPMScheduler with ``variance_type="learned_range"``. In VE form (x = x_vp / sqrt(acp)):

    x_next = x0 + (sigma_next / sigma)^2 (x - x0) + sqrt(Sigma) / sqrt(acp_prev) * z
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from t2i.diffusion.guidance import CFGDenoiser
from t2i.diffusion.precond import LearnedVariance, learned_log_variance

if TYPE_CHECKING:
    from t2i.samplers.diffusers_plan import SamplingPlan
from t2i.samplers.sampling import Callback, Denoiser, Generator, ancestral_step, randn_like, report_step, sigma_batch


class VarianceTap(LearnedVariance):
    """``net(x, t, **cond) -> (B, 2C, ...)`` as a mean-only network that keeps the variance values of
    its latest call (``take``)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__(net)
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        mean, var_values = self.both(x, t, **cond)
        self.last = var_values.detach()
        return mean

    def take(self, batch: int) -> torch.Tensor:
        """(batch, C, ...) variance values of the latest call: its last `batch` rows (CFG batches the
        unconditional rows first, so these are the conditional branch's)."""
        if self.last is None or self.last.shape[0] < batch:
            raise RuntimeError("the learned-variance network was not called for this batch")
        return self.last[-batch:]


@torch.no_grad()
def sample_ddpm_learned(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, generator: Generator = None, *,
                        variance: VarianceTap, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDPM ancestral steps with the learned variance (see the module docstring).

    Args:
        denoiser: D(x, sigma, **extra_args) -> x0 whose network is `variance` (possibly wrapped).
        x: (B, C, H, W) VE samples at sigmas[0].
        sigmas: (N+1,) descending noise levels ending at 0.
        variance: the tap around the network.
        alphas_cumprod: (N+1,) the training alphas_cumprod of each sigma (1 for the final 0), taken from
            the table rather than recomputed from sigma, so that beta_t = 1 - acp_t / acp_prev keeps
            float32 precision where it is ~1e-4.
    Noise is drawn for every step that ends above sigma 0, as in `sample_ddpm`.
    """
    extra_args = extra_args or {}
    acp = alphas_cumprod.to(torch.float32)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigma_batch(sigmas[i], x), **extra_args)
        var_values = variance.take(x.shape[0])
        sigma_down, _ = ancestral_step(sigmas[i], sigmas[i + 1], 1.0)
        x = denoised + (x - denoised) * (sigma_down / sigmas[i])  # the posterior mean
        if sigmas[i + 1] > 0:
            log_var = learned_log_variance(var_values, acp[i], acp[i + 1])  # (B, C, H, W), VP
            x = x + randn_like(x, generator) * ((0.5 * log_var).exp() / acp[i + 1].sqrt())
        report_step(callback, x, i, sigmas, denoised)
    return x


def run_plan(plan: SamplingPlan, denoiser: Any, x: torch.Tensor, extra_args: dict, callback: Any, generators: Any,
             tap: VarianceTap | None) -> torch.Tensor:
    """plan.run, except that "ddpm" on a learned-variance network (`tap` around it) draws its noise with the
    learned variance, the betas of the plan's own timesteps (respaced ones included)."""
    if tap is None or plan.sampler != "ddpm" or plan.steps == 0:
        return plan.run(denoiser, x, extra_args, callback, generators)
    acp = torch.cat([plan.alphas_cumprod[plan.timesteps.long()], torch.ones(1)])  # (N+1,), 1 after t = 0
    return sample_ddpm_learned(denoiser, x, plan.sigmas, extra_args, callback, generators, variance=tap,
                               alphas_cumprod=acp)


def sample_guided(plan: SamplingPlan, net: Any, x: torch.Tensor, cond: dict, uncond: dict | None, guidance: float,
                  generators: Any, callback: Any, *, learned_variance: bool,
                  guide: Callable[[Any, Callable], Any] | None = None) -> torch.Tensor:
    """One pixel stage's sampler run (DDPM, GLIDE's two stages, IF's two stages) from x (B, C, H, W), VE at
    plan.sigmas[0], to the sample diffusers holds at the end (`plan.finish`).

    The denoiser, inside out: `net(x_vp, t, **cond)` (with `learned_variance`, a tap keeps its variance half for
    the learned-variance DDPM steps) -> the VP preconditioning of the plan's parameterisation (eps, v or x0) ->
    classifier-free guidance at `guidance` (uncond None or guidance <= 1: the conditional branch alone) ->
    `guide(denoiser, sigma_to_t)`, an x0 shift (ADM's classifier guidance, GLIDE's CLIP guidance) -> the
    schedule's x0 limit (clipping, dynamic thresholding) outermost, so that a shifted x0 is limited too.
    """
    tap = VarianceTap(net) if learned_variance else None
    base = plan.denoiser(tap or net)
    denoiser: Any = CFGDenoiser(base, guidance)
    if guide is not None:
        denoiser = guide(denoiser, base.sigma_to_t)
    denoiser = plan.limit_x0(denoiser)
    return plan.finish(run_plan(plan, denoiser, x, {"cond": cond, "uncond": uncond}, callback, generators, tap))
