"""Timestep embeddings: the sinusoidal table and the MLP on top of it (DDPM; LDM's U-Net).

t: (B,) timesteps (float or int) -> (B, dim) features, then Linear-SiLU-Linear to the width
the residual blocks read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_frequencies(
    dim: int, downscale_freq_shift: float = 0.0, max_period: float = 10000.0
) -> torch.Tensor:
    """The dim // 2 angular frequencies of the sinusoidal embedding, (dim // 2,) float32.

    freq_i = max_period ** (-i / (dim // 2 - downscale_freq_shift)), the DDPM/"Attention is
    all you need" geometric ladder; shift 1 is the original DDPM spacing, 0 the LDM one.
    """
    half = dim // 2
    # An explicit CPU device: modules built under `torch.device("meta")` (fast loading) still get
    # a real table, since it is not in the state dict and nothing would fill it later.
    steps = torch.arange(half, dtype=torch.float32, device="cpu")
    exponent = -math.log(max_period) * steps / (half - downscale_freq_shift)
    return torch.exp(exponent)


def _embed_with(t: torch.Tensor, freqs: torch.Tensor, dim: int, flip_sin_to_cos: bool) -> torch.Tensor:
    """t: (B,) -> (B, dim) [sin | cos] (or [cos | sin]) of t * freqs, zero-padded if dim is odd."""
    args = t[:, None].float() * freqs[None, :]  # (B, dim // 2)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2 * (dim // 2))
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, t: (B,) -> (B, dim) float32.

    SD uses flip_sin_to_cos=True (cos first) and shift 0. Modules that embed every step
    should hold a `SinusoidalEmbedding`, which precomputes the frequencies once.
    """
    freqs = sinusoidal_frequencies(dim, downscale_freq_shift, max_period).to(t.device)
    return _embed_with(t, freqs, dim, flip_sin_to_cos)


class SinusoidalEmbedding(nn.Module):
    """`timestep_embedding` with the frequency table built once. No parameters, nothing in
    the state dict.

    The table is a plain tensor attribute rather than a buffer on purpose: it must stay
    float32 when the model is cast to fp16/bf16 (at t ~ 1000 a half-precision table would
    be off by about a radian); it follows the device of the timesteps instead.
    """

    def __init__(
        self,
        dim: int,
        flip_sin_to_cos: bool = True,
        downscale_freq_shift: float = 0.0,
        max_period: float = 10000.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freqs = sinusoidal_frequencies(dim, downscale_freq_shift, max_period)  # (dim // 2,) float32

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) timesteps (float or int) -> (B, dim) float32."""
        if self.freqs.device != t.device:
            self.freqs = self.freqs.to(t.device)
        return _embed_with(t, self.freqs, self.dim, self.flip_sin_to_cos)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal embedding: Linear-SiLU-Linear, (B, in_dim) -> (B, dim)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(emb)))
