"""Training losses as callables outside the networks: ``loss(model, x0, cond, generator) -> scalar``
(the shape of EDM's ``EDMLoss``, Karras et al. 2022, training/loss.py).

A loss draws its own noise levels and noise from the generator it is given, so a training step's
randomness is a pure function of that generator (``t2i.train.loop.step_generator``) and a resumed
run draws exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from t2i.diffusion.denoiser import PREDICTIONS, DiscreteDenoiser


class DiffusionLoss:
    """The denoising objective (DDPM "simple" loss generalised to eps/v/x0 targets).

    ``loss(model, x0, cond, generator) -> scalar``: draws t ~ U{0..T-1} and eps ~ N(0, I)
    per sample from ``generator``, noises in VP form and regresses the network output onto
    the target of its parameterisation (eps; v = sqrt(acp) eps - sqrt(1 - acp) x0; x0).
    ``min_snr_gamma`` applies Min-SNR-gamma weighting (Hang et al. 2023) normalised so that
    each objective keeps its usual scale: eps weight min(snr, g)/snr, v weight
    min(snr, g)/(snr + 1), x0 weight min(snr, g).

    Args:
        alphas_cumprod: (T,) the training schedule.
        prediction_type: what the network predicts.
        min_snr_gamma: None for the plain (unweighted) MSE.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 min_snr_gamma: float | None = None):
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTIONS}")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32)
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) per-sample loss weights for integer timesteps t (B,)."""
        acp = self.alphas_cumprod.to(t.device)[t]
        if self.min_snr_gamma is None:
            return torch.ones_like(acp)
        snr = acp / (1 - acp)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    def __call__(self, model: nn.Module | Callable, x0: torch.Tensor, cond: dict | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Args:
            model: the raw network ``net(x_vp, t, **cond)`` or a DiscreteDenoiser around it.
            x0: (B, C, H, W) clean latents.
            cond: network keyword arguments, batched like x0.
            generator: RNG for t and noise (drawn on CPU, then moved to x0's device).
        Returns:
            () the weighted mean squared error.
        """
        net = model.net if isinstance(model, DiscreteDenoiser) else model
        b = x0.shape[0]
        T = self.alphas_cumprod.shape[0]
        t = torch.randint(0, T, (b,), generator=generator).to(x0.device)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        acp = self.alphas_cumprod.to(x0.device)[t].reshape(b, *([1] * (x0.ndim - 1)))
        x_t = acp.sqrt() * x0 + (1 - acp).sqrt() * noise  # (B, C, H, W) VP
        out = net(x_t, t.to(torch.float32), **(cond or {}))
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = acp.sqrt() * noise - (1 - acp).sqrt() * x0
        else:
            target = x0
        per_sample = ((out.float() - target.float()) ** 2).mean(dim=tuple(range(1, x0.ndim)))  # (B,)
        return (self.weights(t) * per_sample).mean()
