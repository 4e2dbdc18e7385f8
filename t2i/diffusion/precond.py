"""Continuous-sigma preconditioning and learned-variance networks, at the edge of the contract.

Beside ``DiscreteDenoiser`` (a network trained on a discrete VP schedule), two more ways a
network meets the one denoiser contract ``D(x, sigma, **cond) -> x0`` used by every sampler:

* ``EDMDenoiser``: Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based
  Generative Models", Table 1 and eq. 7: ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``
  with the network F trained directly on continuous sigma (EDM's ``EDMPrecond``).
* ``LearnedVariance``: networks that predict the reverse-process variance too (IDDPM, Nichol &
  Dhariwal 2021; ADM; GLIDE; DiT) return 2C channels, the mean parameterisation (eps, v or x0)
  then the variance interpolation values. The contract takes the first half, as k-diffusion's
  ``external.py`` does (``model_output.chunk(2, dim=1)[0]``); the second half stays reachable
  for a sampler that wants it (``LearnedVariance.both``, ``learned_log_variance``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from t2i.diffusion.denoiser import broadcast_sigma


def edm_preconditioning(
    sigma: torch.Tensor, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Karras et al. (2022) Table 1, "EDM" column, for noise levels sigma (any shape):

        c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
        c_out  = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
        c_noise = ln(sigma) / 4

    chosen so that the network's input and its training target both have unit variance
    (sigma_data: the standard deviation of the data, 0.5 for images in [-1, 1]).
    Returns (c_skip, c_out, c_in, c_noise), each shaped like sigma.
    """
    var = sigma**2 + sigma_data**2
    return sigma_data**2 / var, sigma * sigma_data / var.sqrt(), 1 / var.sqrt(), sigma.log() / 4


class EDMDenoiser(nn.Module):
    """Wraps ``net(x_in, c_noise, **cond) -> F`` as ``D(x, sigma, **cond) -> x0`` (Karras et al.
    2022, eq. 7 with the Table 1 EDM preconditioning).

    Args:
        net: called with c_in * x (B, C, H, W) and c_noise (B,) float32.
        sigma_data: the data's standard deviation.
    """

    def __init__(self, net: nn.Module | Callable, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def c_skip(self, sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """c_skip broadcast to x (guidance rescale measures the network's own output with it)."""
        return edm_preconditioning(broadcast_sigma(sigma, x), self.sigma_data)[0]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: torch.Tensor) -> torch.Tensor:
        """Denoise.

        Args:
            x: (B, C, H, W) noisy samples x0 + sigma * noise.
            sigma: () or (B,) noise levels.
            cond: passed to the network unchanged.
        Returns:
            (B, C, H, W) float32 x0 estimate.
        """
        s = broadcast_sigma(sigma, x)  # (B, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = edm_preconditioning(s, self.sigma_data)
        f = self.net(c_in * x, c_noise.reshape(-1), **cond).to(torch.float32)  # (B, C, H, W)
        return c_skip * x + c_out * f


def split_learned_variance(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2C, ...) output of a learned-variance network -> (mean part (B, C, ...), variance
    values (B, C, ...)), the mean parameterisation first as IDDPM/ADM/GLIDE/DiT order them."""
    if out.shape[1] % 2:
        raise ValueError(f"a learned-variance output has an even channel count, got {out.shape[1]}")
    mean, var_values = out.chunk(2, dim=1)
    return mean, var_values


class LearnedVariance(nn.Module):
    """A learned-variance network seen as a plain one: ``forward`` returns the mean half, so
    ``DiscreteDenoiser(LearnedVariance(net), ...)`` meets the denoiser contract; ``both`` gives a
    sampler that wants the variance both halves from the same call.

    Args:
        net: ``net(x, t, **cond) -> (B, 2C, H, W)``.
    """

    def __init__(self, net: nn.Module | Callable):
        super().__init__()
        self.net = net

    def both(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean part, variance values), each (B, C, H, W)."""
        return split_learned_variance(self.net(x, t, **cond))

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        return self.both(x, t, **cond)[0]


def learned_log_variance(var_values: torch.Tensor, acp: torch.Tensor, acp_prev: torch.Tensor) -> torch.Tensor:
    """IDDPM's learned reverse-process log-variance (Nichol & Dhariwal 2021, eq. 15):
    ``log Sigma = v log beta_t + (1 - v) log beta_tilde_t`` with v = (var_values + 1) / 2 in
    [0, 1], between the step's beta_t = 1 - acp / acp_prev and the posterior variance
    beta_tilde_t = beta_t (1 - acp_prev) / (1 - acp). For a respaced run acp and acp_prev are
    the alphas_cumprod of this step and the next kept one, as IDDPM's respaced betas give.

    Args:
        var_values: (B, C, ...) the network's variance half, nominally in [-1, 1].
        acp, acp_prev: () or (B,) alphas_cumprod at this step and the next (acp_prev > acp).
            The last step (acp_prev = 1) has beta_tilde = 0 and draws no noise (IDDPM's
            nonzero_mask); its log variance is -inf on the beta_tilde side and unused.
    Returns:
        (B, C, ...) log variance of x_prev in the VP parameterisation.
    """
    acp = broadcast_sigma(acp, var_values)
    acp_prev = broadcast_sigma(acp_prev, var_values)
    beta = 1 - acp / acp_prev
    beta_tilde = beta * (1 - acp_prev) / (1 - acp)
    frac = (var_values.float() + 1) / 2
    return frac * beta.log() + (1 - frac) * beta_tilde.log()
