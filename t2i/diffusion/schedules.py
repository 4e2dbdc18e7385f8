"""Noise schedules: betas -> alphas_cumprod -> sigmas, and the inference spacings.

Everything here is a plain function of numbers. Two parameterisations of the same
forward process are used across t2i:

* variance preserving (VP, what SD networks see and what diffusers' DDIM/DDPM/DPM hold):
  ``x_vp = sqrt(acp) * x0 + sqrt(1 - acp) * noise``;
* variance exploding (VE, Karras et al. 2022 / k-diffusion, what our samplers walk):
  ``x = x0 + sigma * noise`` with ``sigma = sqrt((1 - acp) / acp)``,
  so ``x_vp = x / sqrt(1 + sigma**2)``.

The inference spacings ("leading", "trailing", "linspace", Table 2 of Lin et al. 2023,
"Common Diffusion Noise Schedules and Sample Steps are Flawed") are reproduced exactly as
diffusers computes them, including each scheduler's small differences, because sampler
parity with diffusers depends on the very same timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "cosine"]
Spacing = Literal["leading", "trailing", "linspace"]

# diffusers replaces a zero terminal alphas_cumprod by the smallest fp16 subnormal so that
# sigma_max stays finite (Euler, Euler-a and DPM-Solver do this; we do it everywhere).
ZERO_SNR_ACP = 2.0**-24


def cosine_alpha_bar(t: float) -> float:
    """Nichol & Dhariwal (2021) eq. 17 cosine alpha_bar(t) for t in [0, 1] (s = 0.008)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(
    schedule: BetaSchedule | str,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Training betas, (T,) float32, exactly as diffusers builds them.

    "linear": DDPM (Ho et al. 2020); "scaled_linear": linear in sqrt(beta) (LDM / SD);
    "squaredcos_cap_v2" (alias "cosine"): improved DDPM cosine schedule, betas capped at max_beta.
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if schedule in ("squaredcos_cap_v2", "cosine"):
        n = num_train_timesteps
        betas = [min(1 - cosine_alpha_bar((i + 1) / n) / cosine_alpha_bar(i / n), max_beta) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"unknown beta schedule {schedule!r}; expected linear, scaled_linear or squaredcos_cap_v2 (cosine)"
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of Lin et al. (2023): shift and scale sqrt(acp) so the last step has SNR 0.

    Args:
        betas: (T,) training betas.
    Returns:
        (T,) betas whose alphas_cumprod ends at exactly 0 and starts where it did.
    """
    sqrt_acp = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_acp[0].clone(), sqrt_acp[-1].clone()
    sqrt_acp = (sqrt_acp - last) * (first / (first - last))
    acp = sqrt_acp**2
    alphas = torch.cat([acp[0:1], acp[1:] / acp[:-1]])
    return 1.0 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor, zero_terminal_snr: bool = False) -> torch.Tensor:
    """(T,) float32 cumulative product of (1 - beta); with zero terminal SNR the last entry
    becomes ZERO_SNR_ACP instead of 0 so that sigma_max is finite (as diffusers' Euler/DPM do)."""
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    acp = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr:
        acp[-1] = ZERO_SNR_ACP
    return acp


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise levels sigma_t = sqrt((1 - acp_t) / acp_t), (T,) ascending in t, same dtype."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def vp_scale(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """sqrt(acp) for a VE sigma: multiply VE latents by it to get the VP latents."""
    return (sigma**2 + 1) ** -0.5


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Forward process in VE form, x = x0 + sigma * noise.

    Args:
        x0: (B, ...) clean samples.
        noise: (B, ...) standard normal noise.
        sigma: scalar or (B,) noise levels.
    Returns:
        (B, ...) noisy samples; the VP latents diffusers holds are ``x * vp_scale(sigma)``.
    """
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    sigma = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim)) if sigma.ndim else sigma
    return x0 + sigma * noise


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: n noise levels from sigma_max down to sigma_min, (n,) float64
    (numpy, as diffusers computes them before mapping to timesteps)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma by linear interpolation of log-sigma over the training
    table (k-diffusion's ``DiscreteSchedule.sigma_to_t``; diffusers' ``_sigma_to_t``).

    Args:
        sigma: (N,) noise levels (float64 numpy).
        log_sigmas: (T,) log of the training sigmas, ascending in t.
    Returns:
        (N,) float64 timesteps in [0, T-1].
    """
    sigma = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]  # (T, N)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def spaced_timesteps(
    spacing: Spacing | str,
    num_train_timesteps: int,
    steps: int,
    steps_offset: int = 0,
    integer: bool = False,
) -> np.ndarray:
    """Inference timesteps, descending, exactly as diffusers' schedulers compute them.

    Args:
        spacing: "leading" (arange(steps) * (T // steps) + steps_offset), "trailing"
            (round(arange(T, 0, -T/steps)) - 1) or "linspace" (linspace(0, T-1, steps)).
        integer: DDIM/DDPM round "linspace" to integers and keep int64; the Euler family keeps
            float32 fractional timesteps.
    Returns:
        (steps,) timesteps, float32 (or int64 when integer).
    """
    T = num_train_timesteps
    if spacing == "linspace":
        if integer:
            return np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].copy()
        ts = ts.astype(np.int64 if integer else np.float32)
        return ts + steps_offset
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64 if integer else np.float32)
        return ts - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected leading, trailing or linspace")


def dpm_timesteps(
    spacing: Spacing | str,
    num_train_timesteps: int,
    steps: int,
    steps_offset: int = 0,
    last_timestep: int = 0,
) -> np.ndarray:
    """DPMSolverMultistepScheduler's variant of the spacings: it divides [0, last_timestep) into
    steps + 1 intervals for "linspace" and "leading" and drops the last point. (steps,) int64.

    last_timestep defaults to num_train_timesteps (no lambda_min_clipped)."""
    last = last_timestep or num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (steps + 1)
        ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return ts + steps_offset
    if spacing == "trailing":
        ts = np.arange(last, 0, -num_train_timesteps / steps).round().copy().astype(np.int64)
        return ts - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected leading, trailing or linspace")


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The EDM sampler's noise levels (Karras et al. 2022, eq. 5, defaults of their Table 1) with
    the final 0 appended: (steps + 1,) float32, descending, for the plain samplers."""
    sigmas = torch.from_numpy(karras_sigmas(sigma_min, sigma_max, steps, rho)).to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def respace_timesteps(num_train_timesteps: int, section_counts: str | list[int]) -> list[int]:
    """The training timesteps an IDDPM-style respaced run keeps (Nichol & Dhariwal 2021, sec. 4;
    "25 of 1000 steps"), ascending.

    Args:
        section_counts: step counts for equal consecutive sections of [0, T), as a list or a
            comma-separated string ("10,15,20" on T = 300: 10 steps among 0..99, 15 among
            100..199, 20 among 200..299, each section's first and last timestep included); or
            "ddimN": the integer stride that gives exactly N steps from 0 (DDIM's striding).
    Returns:
        sorted distinct timesteps.
    """
    T = num_train_timesteps
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        want = int(section_counts[len("ddim"):])
        for stride in range(1, T):
            if len(range(0, T, stride)) == want:
                return list(range(0, T, stride))
        raise ValueError(f"no integer stride gives exactly {want} of {T} steps")
    counts = [int(c) for c in section_counts.split(",")] if isinstance(section_counts, str) else section_counts
    size, extra = divmod(T, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        length = size + (i < extra)  # the first `extra` sections are one step longer
        if count > length:
            raise ValueError(f"cannot take {count} steps from a section of {length}")
        stride = (length - 1) / (count - 1) if count > 1 else 1
        # the index accumulates in float and rounds half to even, as IDDPM's space_timesteps
        # does: a closed form i * stride rounds a few ties the other way
        idx = 0.0
        for _ in range(count):
            kept.add(start + round(idx))
            idx += stride
        start += length
    return sorted(kept)


def respaced_sigmas(alphas_cumprod: torch.Tensor, timesteps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A respaced run over kept training timesteps, for the plain samplers.

    Walking sigmas[i] -> sigmas[i+1] over the kept timesteps is IDDPM's respaced process (its
    betas 1 - acp[t_i] / acp[t_(i-1)]): DDPM's posterior between consecutive kept levels is
    ``ancestral_step`` in VE form, and DDIM's step does not depend on the betas at all.

    Args:
        alphas_cumprod: (T,) the training schedule.
        timesteps: kept training timesteps (any order; ``respace_timesteps``).
    Returns:
        sigmas (N+1,) float32 descending with a final 0, and the network timesteps (N,) float32
        of sigmas[:N] (pin them with ``DiscreteDenoiser.with_timesteps``).
    """
    ts = torch.tensor(sorted(set(timesteps), reverse=True), dtype=torch.long)  # (N,)
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.to(torch.float32)[ts])
    return torch.cat([sigmas, sigmas.new_zeros(1)]), ts.to(torch.float32)


# The settings whose default differs between diffusers' scheduler classes (DDIM and DDPM
# space timesteps "leading" and clip x0 to +-1, DDIM steps to alphas_cumprod 1 at the end; the
# Euler family and DPM-Solver space "linspace" and do not clip). A config read from a diffusers
# folder may leave them unset (None); t2i's own configs state them.
PER_CLASS_SETTINGS = ("timestep_spacing", "clip_sample", "set_alpha_to_one")

# t2i's own values for settings an older t2i file stored as None: never clip or threshold x0
# (latents are not images in [-1, 1]), end DDIM at sigma 0, trailing spacing (Lin et al. 2023,
# which starts every sampler at the last training timestep).
T2I_SETTINGS = {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": True,
                "final_sigmas_type": "zero"}


@dataclass
class ScheduleConfig:
    """A model's noise schedule and its inference settings, named as in diffusers'
    ``scheduler_config.json`` (read by ``t2i.checkpoints.diffusers_scheduler``).

    Every setting that changes what a sampler does is explicit. The one exception is a config
    read from a diffusers folder (``class_defaults=True``): there a PER_CLASS_SETTINGS entry the
    file does not state stays None and each sampler takes the default of the diffusers
    scheduler class it mirrors, exactly as ``DDIMScheduler.from_config(that config)`` would
    (``t2i.samplers.diffusers_plan.resolve_settings``). In t2i's own configs
    (``class_defaults=False``) a None, as older t2i files stored, reads as T2I_SETTINGS.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: str | None = T2I_SETTINGS["timestep_spacing"]
    steps_offset: int = 0
    set_alpha_to_one: bool | None = T2I_SETTINGS["set_alpha_to_one"]
    clip_sample: bool | None = T2I_SETTINGS["clip_sample"]
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    use_karras_sigmas: bool = False
    sigma_min: float | None = None  # Euler: None means the training table's smallest sigma
    sigma_max: float | None = None  # Euler: None means the training table's largest sigma
    final_sigmas_type: str | None = T2I_SETTINGS["final_sigmas_type"]
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float | None = None  # DPM-Solver: None (or -inf) means no clipping
    variance_type: str | None = None  # DDPM: None is "fixed_small"
    class_defaults: bool = False

    def __post_init__(self) -> None:
        if self.final_sigmas_type is None:  # "zero" is every diffusers class's default too
            self.final_sigmas_type = "zero"
        if not self.class_defaults:
            for name in PER_CLASS_SETTINGS:
                if getattr(self, name) is None:
                    setattr(self, name, T2I_SETTINGS[name])

    def betas(self) -> torch.Tensor:
        """(T,) float32 training betas (trained_betas win over the named schedule)."""
        if self.trained_betas is not None:
            return torch.tensor(self.trained_betas, dtype=torch.float32)
        return make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)

    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float32 alphas_cumprod of the training schedule."""
        return alphas_cumprod_from_betas(self.betas(), self.rescale_betas_zero_snr)
