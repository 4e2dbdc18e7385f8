"""The one denoiser contract, ``D(x, sigma, **cond) -> x0`` (its training loss: `t2i.diffusion.losses`).

A discrete-time network ``net(x_vp, t, **cond)`` (the SD U-Net and friends) is trained on
VP latents ``x_vp = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps`` to predict eps, v or x0
("sample"). ``DiscreteDenoiser`` puts it behind the VE contract used by every sampler
(k-diffusion's ``DiscreteEpsDDPMDenoiser`` / EDM's preconditioning, Karras et al. 2022
Table 1), with ``x = x0 + sigma * eps`` and ``sigma = sqrt((1 - acp) / acp)``:

    c_in = 1 / sqrt(1 + sigma^2)            (x_vp = c_in * x)
    eps:    D = x - sigma * out
    v:      D = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * out
    sample: D = out

Which timestep the network sees for a noise level
-------------------------------------------------
diffusers feeds the network the scheduler's own timestep for each step: the discrete
timestep (DDIM, DDPM, DPM, Euler with leading/trailing spacing), a fractional one whose
sigma was made by *linear* interpolation in sigma (Euler/Heun "linspace"), a fractional one
found by *log-sigma* interpolation (Euler/Heun Karras), or that value *rounded* (DPM Karras).
No single interpolation inverts all of these (rounding cannot be inverted), so the t that
belongs to each sigma of a run is carried alongside it: ``with_timesteps(sigmas, timesteps)``
pins those pairs (the sampling plan provides them), and any other sigma falls back to
log-sigma interpolation over the training table. This keeps the samplers pure functions of
sigma while the network sees exactly the timesteps diffusers would give it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from t2i.diffusion.schedules import sigmas_from_alphas_cumprod

Prediction = Literal["epsilon", "v_prediction", "sample"]
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def broadcast_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """() or (B,) noise levels -> (B, 1, ..., 1) float32 on x's device, broadcastable against x (B, ...)."""
    sigma = torch.as_tensor(sigma).to(device=x.device, dtype=torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


class DiscreteDenoiser(nn.Module):
    """Wraps ``net(x_vp, t, **cond) -> eps | v | x0`` as ``D(x, sigma, **cond) -> x0``.

    Args:
        net: the discrete-time network; called with VP input (B, C, H, W) and t (B,) float32.
        alphas_cumprod: (T,) the training schedule the network was trained with.
        prediction_type: "epsilon", "v_prediction" or "sample".
    """

    def __init__(
        self, net: nn.Module | Callable, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"
    ):
        super().__init__()
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTIONS}")
        self.net = net
        self.prediction_type = prediction_type
        acp = alphas_cumprod.detach().to(torch.float32).cpu()
        self.register_buffer("alphas_cumprod", acp, persistent=False)
        self.register_buffer("log_sigmas", sigmas_from_alphas_cumprod(acp).log(), persistent=False)
        # pinned (sigma, t) pairs of the current run, float32 on CPU; empty = interpolate only
        self.pinned_sigmas = torch.zeros(0)
        self.pinned_timesteps = torch.zeros(0)

    def with_timesteps(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> DiscreteDenoiser:
        """A copy (sharing the network) that gives ``timesteps[i]`` to the network at ``sigmas[i]``.

        Args:
            sigmas: (N,) noise levels of a run (a zero final sigma is never evaluated).
            timesteps: (N,) the network timestep for each of them.
        """
        if sigmas.shape[0] != timesteps.shape[0]:
            raise ValueError(f"{sigmas.shape[0]} sigmas but {timesteps.shape[0]} timesteps")
        other = DiscreteDenoiser(self.net, self.alphas_cumprod, self.prediction_type)
        other.pinned_sigmas = sigmas.detach().to(torch.float32).cpu()
        other.pinned_timesteps = timesteps.detach().to(torch.float32).cpu()
        return other

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Network timestep for each noise level, (B,) -> (B,) float32 (see module docstring)."""
        sigma = sigma.detach().to(torch.float32).cpu().reshape(-1)
        # float64 interpolation over the float32 log table, as diffusers' numpy _sigma_to_t
        log_sigma = sigma.double().clamp(min=1e-10).log()
        log_sigmas = self.log_sigmas.cpu().double()
        dists = log_sigma[None, :] - log_sigmas[:, None]  # (T, B)
        low = (dists >= 0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = ((1 - w) * low + w * (low + 1)).float()
        if self.pinned_sigmas.numel():
            # exact pinned pairs win; a relative 1e-6 tolerance absorbs dtype round trips
            rel = (sigma[:, None] - self.pinned_sigmas[None, :]).abs() <= 1e-6 * self.pinned_sigmas[None, :]
            hit = rel.any(dim=1)
            idx = rel.float().argmax(dim=1)
            t = torch.where(hit, self.pinned_timesteps[idx], t)
        return t

    def c_skip(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The part of D that is a multiple of x (k-diffusion's c_skip), broadcast to x.
        Guidance rescale uses it to measure the network's own output space."""
        s = broadcast_sigma(sigma, x)
        if self.prediction_type == "epsilon":
            return torch.ones_like(s)
        if self.prediction_type == "v_prediction":
            return 1 / (s**2 + 1)
        return torch.zeros_like(s)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: torch.Tensor) -> torch.Tensor:
        """Denoise.

        Args:
            x: (B, C, H, W) VE latents at noise level sigma.
            sigma: () or (B,) noise levels.
            cond: passed to the network unchanged (e.g. encoder_hidden_states (B, T, D)).
        Returns:
            (B, C, H, W) x0 estimate, float32.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        t = self.sigma_to_t(sigma).to(x.device)  # (B,)
        s = broadcast_sigma(sigma, x)
        # the operations are ordered as in diffusers' Euler scheduler so that float32 rounding
        # agrees too (it matters where sigma is huge: cosine or zero-terminal-SNR schedules)
        root = (s**2 + 1) ** 0.5
        out = self.net(x / root, t, **cond).to(torch.float32)  # c_in = 1 / sqrt(sigma^2 + 1)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return out * (-s / root) + x / (s**2 + 1)
        return out
