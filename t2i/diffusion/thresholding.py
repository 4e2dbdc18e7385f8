"""Dynamic thresholding of the x0 estimate (Saharia et al. 2022, "Photorealistic Text-to-Image
Diffusion Models with Deep Language Understanding" (Imagen), sec. 2.3), as a denoiser wrapper.

At every step, s = the p-th percentile of |x0| over each sample, s <- max(s, 1), and
x0 <- clamp(x0, -s, s) / s. With s = 1 it is static clipping to [-1, 1]; above, saturated pixels
are pushed inwards instead of piling up at +-1, which is what lets Imagen use large guidance
weights. diffusers (`thresholding=True` in DDPM/DDIM/DPM-Solver/LCM) also caps s at
`sample_max_value` (DeepFloyd IF: p = 0.95, cap 1.5); `max_value` is that cap, none by default
as in the paper.

It is a wrapper around a denoiser ``D(x, sigma, **cond) -> x0`` (DESIGN principle 4), outermost,
after guidance: samplers never know about it. DDIM, which steps with the unthresholded eps, takes
the function `dynamic_threshold` instead (`t2i.samplers.diffusers_plan.SamplingPlan.x0_limiter`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Denoiser = Callable[..., torch.Tensor]


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995, max_value: float = math.inf) -> torch.Tensor:
    """Imagen's dynamic thresholding of one x0 estimate (B, ...) -> the same shape and dtype.

    Args:
        x0: (B, ...) the denoiser's estimate, in the data range [-1, 1] the model was trained on.
        percentile: p in [0, 1], the quantile of |x0| per sample (diffusers' dynamic_thresholding_ratio).
        max_value: upper bound on s (diffusers' sample_max_value).
    """
    # quantile needs fp32/fp64 (and clamp has no CPU half kernel); fp64 is kept, as diffusers does
    work = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()
    flat = work.reshape(x0.shape[0], -1)  # (B, N)
    s = torch.quantile(flat.abs(), percentile, dim=1).clamp(min=1, max=max_value)[:, None]  # (B, 1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


class DynamicThresholding(nn.Module):
    """``D_thr(x, sigma, **cond) = dynamic_threshold(D(x, sigma, **cond))``.

    Args:
        denoiser: the denoiser whose x0 is thresholded (wrap the guided one).
        percentile: p, the quantile of |x0| per sample (Imagen: 0.995 in the paper's sweep,
            DeepFloyd IF 0.95).
        max_value: cap on s (diffusers' sample_max_value; IF 1.5).
    """

    def __init__(self, denoiser: Denoiser, percentile: float = 0.995, max_value: float = math.inf):
        super().__init__()
        if not 0.0 <= percentile <= 1.0:
            raise ValueError(f"percentile must be in [0, 1], got {percentile}")
        self.inner, self.percentile, self.max_value = denoiser, percentile, max_value

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        """x: (B, ...) noisy input at sigma; returns the thresholded x0, (B, ...)."""
        return dynamic_threshold(self.inner(x, sigma, **cond), self.percentile, self.max_value)
