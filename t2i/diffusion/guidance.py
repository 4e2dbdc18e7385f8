"""Guidance as wrappers around a denoiser ``D(x, sigma, **cond) -> x0`` (DESIGN principle 4).

* ``CFGDenoiser``: classifier-free guidance (Ho & Salimans 2022), conditional and
  unconditional branches in one batched call, with optional guidance rescale (Lin et al.
  2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16).
* Dynamic thresholding (Imagen) is ``t2i.diffusion.thresholding.DynamicThresholding``.
* ``ClipDenoised``: static clipping of x0 (diffusers' ``clip_sample``).

Guidance is linear, so mixing x0 estimates equals mixing the network outputs (eps or v)
that diffusers mixes. Guidance rescale is not linear: it matches standard deviations, and
diffusers measures them on the network's own output. Every parameterisation has
``out = (x0 - c_skip(sigma) x) / c_out(sigma)`` with the same c_skip, c_out for both
branches, so the rescale below works on ``x0 - c_skip x`` (c_skip from the inner denoiser;
0, i.e. the paper's x0 form, when it has none) and equals diffusers' ``rescale_noise_cfg``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Denoiser = Callable[..., torch.Tensor]


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditioning values along the batch: tensors by ``torch.cat``, dicts
    key by key (e.g. SDXL's added conditions), anything else must be equal and is kept."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise ValueError(f"cond and uncond have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: cat_cond(a[k], b[k]) for k in a}
    if a != b:
        raise ValueError(f"non-tensor conditioning differs between cond and uncond: {a!r} vs {b!r}")
    return a


def rescale_guidance(cfg: torch.Tensor, pos: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al. (2023) eq. 15-16: scale the guided prediction to the std of the conditional
    one, then mix ``rescale * rescaled + (1 - rescale) * cfg``.

    Args:
        cfg, pos: (B, ...) guided and conditional predictions in the same output space.
    """
    dims = list(range(1, cfg.ndim))
    factor = pos.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True)  # (B, 1, ...)
    return cfg * (rescale * factor + (1 - rescale))


class CFGDenoiser(nn.Module):
    """``D_cfg(x, sigma, cond, uncond) = D_u + scale * (D_c - D_u)``.

    Args:
        denoiser: the denoiser to guide (e.g. a ``DiscreteDenoiser``).
        scale: guidance scale w; w <= 1 or uncond None runs the conditional branch alone
            (as diffusers does for guidance_scale <= 1).
        rescale: guidance rescale phi in [0, 1] (0 disables it).
    """

    def __init__(self, denoiser: Denoiser, scale: float, rescale: float = 0.0):
        super().__init__()
        self.inner = denoiser
        self.scale = scale
        self.rescale = rescale

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict[str, Any],
                uncond: dict[str, Any] | None = None) -> torch.Tensor:
        """Args:
            x: (B, C, H, W) latents at noise level sigma.
            sigma: () or (B,) noise levels.
            cond, uncond: network keyword arguments for the two branches, each batched as x
                (e.g. encoder_hidden_states (B, T, D)); uncond = negative prompt.
        Returns:
            (B, C, H, W) guided x0 estimate.
        """
        if uncond is None or self.scale <= 1.0:
            return self.inner(x, sigma, **cond)
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        both = cat_cond(uncond, cond)  # unconditional first, as diffusers batches them
        d_uncond, d_cond = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        guided = d_uncond + self.scale * (d_cond - d_uncond)
        if self.rescale > 0:
            c_skip = getattr(self.inner, "c_skip", None)
            ref = c_skip(sigma, x) * x if c_skip is not None else torch.zeros_like(x)
            guided = ref + rescale_guidance(guided - ref, d_cond - ref, self.rescale)
        return guided


class ClipDenoised(nn.Module):
    """Static clipping of x0 to [-limit, limit] (diffusers' clip_sample / clip_sample_range)."""

    def __init__(self, denoiser: Denoiser, limit: float = 1.0):
        super().__init__()
        self.inner, self.limit = denoiser, limit

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        return self.inner(x, sigma, **cond).clamp(-self.limit, self.limit)
