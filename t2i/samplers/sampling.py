"""Samplers: plain, stateless functions over a descending sequence of VE noise levels.

Every sampler has k-diffusion's signature
``sample_x(denoiser, x, sigmas, extra_args=None, callback=None, generator=None, **options) -> x``:

* ``denoiser(x, sigma, **extra_args) -> x0`` is the one denoiser contract (t2i.diffusion);
* ``x`` (B, C, H, W) holds VE latents at ``sigmas[0]`` (``x = x0 + sigma * noise``);
* ``sigmas`` (N+1,) descending noise levels, the last usually 0; N denoiser steps are taken;
* ``callback({"x", "i", "sigma", "sigma_next", "denoised"})`` after every step;
* ``generator``: a torch.Generator, or a list with one per batch row, for the fresh noise of
  the stochastic samplers. It is drawn exactly as diffusers' ``randn_tensor`` draws it
  (``torch.randn(x.shape, generator=g)`` on the generator's device, one draw per step), so the
  same CPU generator gives diffusers' trajectory.

The update rules are the textbook ones in sigma space; the sigmas come from outside:
``t2i.samplers.diffusers_plan`` reproduces diffusers' schedulers (SD and friends), and the
schedules that are not diffusers' are plain functions in ``t2i.diffusion.schedules``
(``edm_sigmas``, ``karras_sigmas``, IDDPM respacing with ``respaced_sigmas``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict[str, Any]], None]
Generator = torch.Generator | list[torch.Generator] | None


def randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal noise shaped like x (B, ...), drawn as diffusers' ``randn_tensor``:
    one call on the generator's device for a single generator, one (1, ...) call per row for
    a list of generators."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        rows = [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=torch.float32)
                for g in generator]
        return torch.cat(rows).to(x.device, x.dtype)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


def ancestral_step(
    sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step sigma -> sigma_next into a deterministic part down to sigma_down and fresh
    noise of std sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2.

    With eta = 1 this is the DDPM posterior q(x_next | x, x0) written in VE form (Ho et al.
    2020 eq. 7: mean x0 + sigma_next^2 / sigma^2 (x - x0), variance
    sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2); eta scales the std as DDIM's eta does
    (Song et al. 2021 eq. 16).
    """
    sigma_up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_up = torch.minimum(sigma_up, sigma_next)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def sigma_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Scalar sigma -> (B,) for the denoiser."""
    return sigma * x.new_ones([x.shape[0]], dtype=torch.float32)


def report_step(callback: Callback | None, x, i, sigmas, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, generator: Generator = None) -> torch.Tensor:
    """Euler steps on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
    (Karras et al. 2022, Algorithm 2 without churn; diffusers' EulerDiscreteScheduler)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigma_batch(sigmas[i], x), **extra_args)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        report_step(callback, x, i, sigmas, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                           extra_args: dict | None = None, callback: Callback | None = None,
                           generator: Generator = None, eta: float = 1.0) -> torch.Tensor:
    """Ancestral Euler (k-diffusion ``sample_euler_ancestral``; diffusers'
    EulerAncestralDiscreteScheduler): Euler down to sigma_down, then fresh noise of std sigma_up.
    Noise is drawn at every step, the last included, as diffusers does."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigma_batch(sigmas[i], x), **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        x = x + randn_like(x, generator) * sigma_up
        report_step(callback, x, i, sigmas, denoised)
    return x


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, generator: Generator = None) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with the "fixed_small" posterior
    variance, skipping steps between the given sigmas as diffusers' DDPMScheduler does. In VE
    form this is ``ancestral_step`` with eta = 1. Noise is drawn for every step that ends above
    sigma 0 (diffusers skips the draw only at t = 0, where the variance is 0 anyway)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigma_batch(sigmas[i], x), **extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], 1.0)
        x = denoised + (x - denoised) * (sigma_down / sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + randn_like(x, generator) * sigma_up
        report_step(callback, x, i, sigmas, denoised)
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, generator: Generator = None, eta: float = 0.0,
                sigmas_to: torch.Tensor | None = None,
                limit_x0: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12). With eta = 0 it is exactly an Euler step in sigma
    space, x_next = x0 + sigma_next * eps; eta > 0 adds fresh noise of std eta * sigma_up and
    draws it at every step, as diffusers' DDIMScheduler does.

    Args:
        eta: DDIM's eta (0 = deterministic, 1 = DDPM-like variance).
        sigmas_to: optional (N,) target of each step when it is not the next step's start.
            diffusers' DDIM always steps timestep t to t - T // steps; with "linspace" spacing
            (or "trailing" when steps does not divide T) that is not the next timestep, and
            the next step reinterprets the VP latents at its own noise level. Passing the
            targets here reproduces that: step to sigmas_to[i], then carry the VP latents
            over, x *= sqrt(1 + sigmas[i+1]^2) / sqrt(1 + sigmas_to[i]^2).
        limit_x0: clip_sample / thresholding applied to x0 only: as in diffusers' DDIM (without
            use_clipped_model_output) the step keeps the direction of the unclipped estimate.
    """
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        target = sigmas[i + 1] if sigmas_to is None else sigmas_to[i]
        denoised = denoiser(x, sigma_batch(sigmas[i], x), **extra_args)
        direction = x - denoised  # sigma * eps
        if limit_x0 is not None:
            denoised = limit_x0(denoised)
        if eta > 0:
            sigma_down, sigma_up = ancestral_step(sigmas[i], target, eta)
        else:
            sigma_down, sigma_up = target, None
        x = denoised + direction * (sigma_down / sigmas[i])
        if sigma_up is not None:
            x = x + randn_like(x, generator) * sigma_up
        if sigmas_to is not None and target != sigmas[i + 1]:
            x = x * ((1 + sigmas[i + 1] ** 2) / (1 + target**2)) ** 0.5
        report_step(callback, x, i, sigmas, denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, generator: Generator = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn; diffusers'
    HeunDiscreteScheduler): an Euler step, then the trapezoidal correction with the slope at
    the end point; the step to sigma 0 is plain Euler. 2N - 1 denoiser calls."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigma_batch(sigmas[i], x), **extra_args)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = denoiser(x_2, sigma_batch(sigmas[i + 1], x), **extra_args)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
        report_step(callback, x, i, sigmas, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callback | None = None, generator: Generator = None,
                    lower_order_final: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, midpoint form; k-diffusion
    ``sample_dpmpp_2m``; diffusers' DPMSolverMultistepScheduler with solver_order 2).

    In VE form with lambda = -log sigma and h = lambda_next - lambda:
    x_next = (sigma_next / sigma) x - expm1(-h) D, where D is the current x0 estimate on the
    first step and (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_prev / h, afterwards.
    The step to sigma 0 is first order.

    Args:
        lower_order_final: also take a first-order last step when the last sigma is not 0
            (diffusers' lower_order_final below 15 steps, or euler_at_final).
    """
    extra_args = extra_args or {}
    old_denoised = None
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoiser(x, sigma_batch(sigmas[i], x), **extra_args)
        h = sigmas[i].log() - sigmas[i + 1].log()  # lambda_next - lambda (inf when sigma_next = 0)
        first_order = old_denoised is None or sigmas[i + 1] == 0 or (lower_order_final and i == n - 1)
        if first_order:
            d = denoised
        else:
            r = (sigmas[i - 1].log() - sigmas[i].log()) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d
        old_denoised = denoised
        report_step(callback, x, i, sigmas, denoised)
    return x


def consistency_boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float = 10.0,
                                  sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The boundary condition of a consistency model at discrete timesteps, as LCM uses it.

    The consistency function is f(x, t) = c_skip(t) x + c_out(t) F(x, t), with c_skip(0) = 1 and
    c_out(0) = 0 so that f is the identity at the boundary (Song et al. 2023,
    "Consistency Models" sec. 3; Luo et al. 2023 (LCM) sec. 4.1, where F is the x0 estimate from the network's
    eps / v and x is the VP latent). diffusers' LCMScheduler and the LCM code take
    c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2) with t scaled by
    s = timestep_scaling (10), which makes the scalings almost a step function: at t >= 19 (the
    smallest LCM timestep) c_skip < 1e-5.

    Args:
        timesteps: (N,) discrete network timesteps.
    Returns:
        (c_skip, c_out), each (N,) float64, for the VP latent and the x0 estimate.
    """
    scaled = timesteps.to(torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


@torch.no_grad()
def sample_lcm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Callback | None = None, generator: Generator = None,
               c_skip: torch.Tensor | None = None, c_out: torch.Tensor | None = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; the multistep latent
    consistency sampling of Luo et al. 2023 (LCM); diffusers' LCMScheduler): at every sigma jump straight to the
    consistency function's x0, then re-noise it to the next sigma with fresh noise,
    x_next = x0 + sigma_next * z. The last step (sigma_next = 0) returns x0 and draws nothing, so
    one step is a one-step consistency sample.

    Args:
        c_skip, c_out: optional (N,) boundary scalings of each step (`consistency_boundary_scalings`),
            x0 = c_out[i] D(x, sigma_i) + c_skip[i] x_vp with x_vp = x / sqrt(1 + sigma_i^2), the
            latent the LCM was trained on. None: c_skip 0, c_out 1 (x0 = D, the plain form).
    """
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigma_batch(sigmas[i], x), **extra_args)
        if c_out is not None:
            denoised = float(c_out[i]) * denoised
        if c_skip is not None:
            denoised = denoised + float(c_skip[i]) * (x / (sigmas[i] ** 2 + 1) ** 0.5)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + randn_like(x, generator) * sigmas[i + 1]  # VP: sqrt(acp') x0 + sqrt(1 - acp') z
        report_step(callback, x, i, sigmas, denoised)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "lcm": sample_lcm,
}
