"""Expert denoisers by noise level (eDiff-I, Balaji et al. 2022, sec. 4.1 "ensemble of expert denoisers").

eDiff-I trains one model over all noise levels, then splits the noise range in two and fine-tunes a
copy on each half (a binary tree, `t2i.train.ediffi`); at sampling time each step is denoised by the
expert whose interval holds the step's sigma. `SigmaExperts` is that switch as a plain wrapper over
denoisers ``D(x, sigma, **cond) -> x0``, so every sampler, guidance wrapper and x0 limit works on it
unchanged, and a multistep sampler keeps its history across the switch (it only sees one denoiser).

The SDXL refiner is the same idea with one boundary, but its two models read different
conditioning (its own text encoder, an aesthetic score), so `t2i.systems.latent_diffusion` hands the
latents over between two sampler runs, as diffusers' denoising_end / denoising_start do; experts that
share the conditioning need no hand-off and switch here, inside one run.

Intervals are half-open in sigma, [lo, hi): expert i holds boundaries[i - 1] <= sigma < boundaries[i],
with 0 below the first boundary and infinity above the last. An expert trained on the timesteps
[lo_t, hi_t) of a discrete schedule holds [sigma(lo_t), sigma(hi_t)) (`timestep_boundaries`): a sigma
between two training timesteps goes to the expert that trained the lower one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from t2i.diffusion.schedules import sigmas_from_alphas_cumprod

Denoiser = Callable[..., torch.Tensor]


def check_intervals(intervals: Sequence[tuple[int, int]], total: int) -> None:
    """ValueError unless the timestep intervals [lo, hi) are sorted and tile [0, total) exactly."""
    edge = 0
    for lo, hi in intervals:
        if lo != edge or not lo < hi:
            raise ValueError(f"expert timestep intervals {list(intervals)} do not tile [0, {total}) in order")
        edge = hi
    if edge != total:
        raise ValueError(f"expert timestep intervals {list(intervals)} end at {edge}, not at {total}")


def timestep_boundaries(intervals: Sequence[tuple[int, int]], alphas_cumprod: torch.Tensor) -> list[float]:
    """The sigma boundaries between experts trained on the timestep intervals [lo, hi) that tile the
    schedule (checked): sigma(lo) of every expert but the first, ascending. alphas_cumprod: (T,)."""
    check_intervals(intervals, alphas_cumprod.shape[0])
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.double())  # (T,) ascending in t
    return [float(sigmas[lo]) for lo, _ in intervals[1:]]


def sigma_interval(interval: tuple[int, int], alphas_cumprod: torch.Tensor) -> tuple[float, float | None]:
    """The sigma interval [lo, hi) of a timestep interval: (0 for t = 0, None for hi = T: unbounded)."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.double())
    lo, hi = interval
    return (0.0 if lo == 0 else float(sigmas[lo]), None if hi >= sigmas.shape[0] else float(sigmas[hi]))


class SigmaExperts(nn.Module):
    """``D(x, sigma, **cond)`` = the denoiser of the expert whose sigma interval holds sigma.

    Args:
        experts: one denoiser per interval, lowest noise first.
        boundaries: the len(experts) - 1 sigmas between them, strictly ascending; expert i holds
            [boundaries[i - 1], boundaries[i]) (0 and infinity at the ends).
    A batch whose rows sit in different intervals (not what a sampler sends, but possible) is split,
    each part denoised by its own expert, and put back together in order.
    """

    def __init__(self, experts: Sequence[Denoiser], boundaries: Sequence[float]) -> None:
        super().__init__()
        if len(boundaries) != len(experts) - 1:
            raise ValueError(f"{len(experts)} experts need {len(experts) - 1} boundaries, got {len(boundaries)}")
        if any(b <= a for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)):
            raise ValueError(f"expert boundaries must be strictly ascending, got {list(boundaries)}")
        self.experts = list(experts)
        self.boundaries = torch.tensor(list(boundaries), dtype=torch.float64)

    def expert_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) noise levels -> (B,) long index of the expert that holds each."""
        # right=True: index i with boundaries[i - 1] <= sigma < boundaries[i], the half-open intervals
        return torch.bucketize(sigma.detach().double().cpu(), self.boundaries, right=True)

    def c_skip(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The experts' shared preconditioning (guidance rescale reads it): the first expert's, 0
        (the x0 form) where it has none."""
        own = getattr(self.experts[0], "c_skip", None)
        return own(sigma, x) if own is not None else torch.zeros_like(x)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        """x: (B, C, H, W) at noise level sigma, () or (B,); cond: batched as x. -> (B, C, H, W) x0."""
        s = torch.as_tensor(sigma, dtype=torch.float32)
        s = s.expand(x.shape[0]) if s.ndim == 0 else s  # (B,)
        index = self.expert_index(s)  # (B,)
        first = int(index[0])
        if bool((index == first).all()):
            return self.experts[first](x, sigma, **cond)
        out = torch.empty_like(x, dtype=torch.float32)
        for i in index.unique().tolist():
            rows = (index == i).nonzero().flatten()  # (b,)
            part = {k: v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == x.shape[:1] else v
                    for k, v in cond.items()}
            out[rows.to(x.device)] = self.experts[i](x[rows], s[rows], **part).float()
        return out
