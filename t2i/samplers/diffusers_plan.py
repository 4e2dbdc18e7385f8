"""Preparing a diffusers-parity sampling run from a model's schedule: ``prepare_sampling`` -> ``SamplingPlan``.

A plan holds everything a sampler run needs besides the network: the VE noise levels, the
network timestep that belongs to each of them, how to make the starting latents from the
seed noise, and how to hand back the latents diffusers would hold at the end. It reproduces
the diffusers scheduler each sampler mirrors:

    ddim -> DDIMScheduler            ddpm     -> DDPMScheduler
    euler -> EulerDiscreteScheduler  euler_a  -> EulerAncestralDiscreteScheduler
    heun -> HeunDiscreteScheduler    dpmpp_2m -> DPMSolverMultistepScheduler (dpmsolver++, order 2)
    lcm  -> LCMScheduler (multistep consistency sampling on its skipping-step timesteps)

It is the diffusers-parity path of models whose schedule is a ``ScheduleConfig`` (SD and
t2i's own latent models), and only that: schedules that are not diffusers' (EDM sigmas,
IDDPM/GLIDE respacing, a distilled model's few timesteps) are plain functions in
``t2i.diffusion.schedules`` handed straight to the samplers, never branches here.

VP and VE latents, in one place
-------------------------------
Our samplers walk VE latents ``x = x0 + sigma * noise``. diffusers' DDIM, DDPM, DPM and LCM hold
VP latents ``x_vp = x / sqrt(1 + sigma^2)``, its Euler-family schedulers hold VE latents.
``start`` and ``finish`` are the only conversions:

* ``start(noise)``: diffusers multiplies the seed noise by ``init_noise_sigma``: 1 for the VP
  schedulers (x_vp = noise, so x = noise * sqrt(1 + sigma_max^2)); for Euler/Heun sigma_max
  with "linspace"/"trailing" spacing but sqrt(1 + sigma_max^2) with "leading". The plan's
  ``init_noise_scale`` is that factor in VE terms. With ``init_latents`` (img2img) it is
  ``init_latents + sigma_start * noise`` for every scheduler (diffusers' add_noise).
* ``finish(x)``: at sigma 0 both forms agree; a VP scheduler ending at sigma_min > 0 (DDIM
  without set_alpha_to_one, DPM with final_sigmas_type "sigma_min") holds
  ``x / sqrt(1 + sigma_last^2)``, which is what finish returns (``resume`` is its inverse).

Starting or stopping part-way: ``from_strength`` (img2img, SDEdit) keeps the last
``int(steps * strength)`` steps as diffusers' img2img pipelines do; ``split(fraction)`` cuts
the schedule where the timestep falls below ``round(T * (1 - fraction))``, diffusers'
``denoising_end``/``denoising_start`` (SDXL base -> refiner hand-off). Hand the latents over
as ``tail.resume(head.finish(x))`` (the identity when both plans hold the same form).

Where diffusers cannot be matched (measured in tests/test_samplers_parity.py)
----------------------------------------------------------------------------
* ddim/ddpm with rescale_betas_zero_snr: diffusers' DDIM/DDPM keep alphas_cumprod[-1] = 0
  (sigma_max = inf, not representable in VE form); we use 2**-24 as diffusers' own Euler and
  DPM do. Final latents differ by 3e-4 (ddim) / 6e-4 (ddpm) of their std with v-prediction
  (with eps-prediction diffusers itself produces NaN).
* heun with ``split``: diffusers counts the duplicated timesteps of its interleaved Heun
  schedule and can stop the base in the middle of a Heun step, restarting the refiner from
  the earlier sigma; we always split at whole steps.
* heun ignores rescale_betas_zero_snr in diffusers and defaults beta_start/beta_end to
  0.00085/0.012 when the keys are missing; the model's schedule (ScheduleConfig) is used for
  every sampler here.
* lcm with ``from_strength`` (img2img) keeps the last steps of the text-to-image plan, as for
  every sampler; diffusers' LatentConsistencyModelImg2ImgPipeline instead rebuilds the timesteps
  from the first ``int(50 * strength)`` distillation timesteps.
* one generator for a batch: diffusers draws the whole (B, ...) noise from it at once; t2i's
  convention is one generator per image (seed + i), which equals diffusers given a list of
  generators.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from t2i.diffusion.denoiser import DiscreteDenoiser
from t2i.diffusion.guidance import ClipDenoised
from t2i.diffusion.schedules import (
    PER_CLASS_SETTINGS,
    ScheduleConfig,
    dpm_timesteps,
    karras_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)
from t2i.diffusion.thresholding import DynamicThresholding, dynamic_threshold
from t2i.samplers.sampling import SAMPLERS, Generator, consistency_boundary_scalings

VP_SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "lcm")
EULER_FAMILY = ("euler", "euler_a", "heun")
NO_KARRAS = ("ddim", "ddpm", "lcm")  # diffusers' classes without use_karras_sigmas
# sampler_kwargs that hold one entry per step (cut along with the steps by `_slice`)
PER_STEP_KWARGS = ("sigmas_to", "c_skip", "c_out")
# LCMScheduler's own settings and their defaults (ScheduleConfig has no field for them yet; the
# scheduler reader refuses other values, see t2i.checkpoints.diffusers_scheduler)
LCM_SETTINGS: dict[str, Any] = {"original_inference_steps": 50, "timestep_scaling": 10.0}

# The defaults of the diffusers class each sampler mirrors, for the settings whose default
# differs between classes (ScheduleConfig.PER_CLASS_SETTINGS). `<Class>.from_config(config)`
# keeps what a config states and takes these for what it leaves out: an SDXL folder saved with
# EulerDiscreteScheduler states no clip_sample, so its DDIMScheduler clips x0 to +-1.
# (set_alpha_to_one exists in DDIM only; the others always end at alphas_cumprod 1.)
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": {"timestep_spacing": "leading", "clip_sample": True, "set_alpha_to_one": True},
    "ddpm": {"timestep_spacing": "leading", "clip_sample": True},
    "euler": {"timestep_spacing": "linspace"},
    "euler_a": {"timestep_spacing": "linspace"},
    "heun": {"timestep_spacing": "linspace", "clip_sample": False},
    "dpmpp_2m": {"timestep_spacing": "linspace"},
    "lcm": {"timestep_spacing": "leading", "clip_sample": False, "set_alpha_to_one": True},
}


def resolve_settings(cfg: ScheduleConfig, sampler: str) -> ScheduleConfig:
    """cfg with every setting it leaves unset (None, only in configs read from diffusers folders)
    replaced by the default of the diffusers scheduler class that `sampler` mirrors."""
    unset = {name: CLASS_DEFAULTS[sampler].get(name) for name in PER_CLASS_SETTINGS
             if getattr(cfg, name) is None}
    return dataclasses.replace(cfg, **unset) if unset else cfg


@dataclass
class SamplingPlan:
    """One sampler run, in VE form.

    Attributes:
        sampler: name in SAMPLERS.
        sigmas: (N+1,) float32 descending noise levels; N steps.
        timesteps: (N,) float32 network timestep for sigmas[:N].
        init_noise_scale: x_T = noise * init_noise_scale when starting from pure noise.
        alphas_cumprod: (T,) the model's training schedule.
        prediction_type: "epsilon", "v_prediction" or "sample".
        sampler_kwargs: extra options for the sampler function (eta, sigmas_to, lower_order_final,
            LCM's c_skip and c_out).
        x0_limit: ("clip", range) or ("threshold", ratio, max_value) from the config, or None.
        total_steps: the step count the schedule was made for (before any cut).
    """

    sampler: str
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_scale: float
    alphas_cumprod: torch.Tensor
    prediction_type: str
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)
    x0_limit: tuple | None = None
    total_steps: int = 0

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def held_scale(self, sigma: torch.Tensor) -> float:
        """VP factor of the latents diffusers' scheduler holds at sigma: 1 / sqrt(1 + sigma^2)
        for ddim/ddpm/dpmpp_2m/lcm, 1 for the Euler family (which holds VE latents)."""
        return float((sigma**2 + 1) ** -0.5) if self.sampler in VP_SAMPLERS else 1.0

    def denoiser(self, net: torch.nn.Module | Callable) -> DiscreteDenoiser:
        """The network behind the denoiser contract, seeing this plan's timesteps."""
        den = DiscreteDenoiser(net, self.alphas_cumprod, self.prediction_type)
        return den.with_timesteps(self.sigmas[: self.steps], self.timesteps)

    def x0_limiter(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The config's clip_sample / thresholding as a function of x0, or None."""
        if self.x0_limit is None:
            return None
        if self.x0_limit[0] == "clip":
            limit = self.x0_limit[1]
            return lambda x0: x0.clamp(-limit, limit)
        return functools.partial(dynamic_threshold, percentile=self.x0_limit[1], max_value=self.x0_limit[2])

    def limit_x0(self, denoiser: Callable) -> Callable:
        """Wrap the (guided) denoiser with the config's clip_sample / thresholding, if any.
        DDIM is left unwrapped: it limits x0 inside its step (see `sample_ddim`)."""
        if self.x0_limit is None or self.sampler == "ddim":
            return denoiser
        if self.x0_limit[0] == "clip":
            return ClipDenoised(denoiser, self.x0_limit[1])
        return DynamicThresholding(denoiser, self.x0_limit[1], self.x0_limit[2])

    def start(self, noise: torch.Tensor, init_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Starting VE latents (B, C, h, w) from the seed noise (and img2img latents)."""
        if init_latents is None:
            return noise.to(torch.float32) * self.init_noise_scale
        return init_latents.to(torch.float32) + self.sigmas[0] * noise.to(torch.float32)

    def run(self, denoiser: Callable, x: torch.Tensor, extra_args: dict | None = None,
            callback: Callable | None = None, generator: Generator = None) -> torch.Tensor:
        """Call the sampler on this plan's sigmas with its options."""
        if self.steps == 0:
            return x
        kwargs = dict(self.sampler_kwargs)
        if self.sampler == "ddim" and self.x0_limit is not None:
            kwargs["limit_x0"] = self.x0_limiter()
        return SAMPLERS[self.sampler](denoiser, x, self.sigmas, extra_args, callback, generator, **kwargs)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The latents diffusers' scheduler would hold at the end of this plan (VE x unchanged
        at sigma 0; VP x / sqrt(1 + sigma_last^2) for a VP scheduler stopping above 0)."""
        scale = self.held_scale(self.sigmas[-1])
        return x if scale == 1.0 else x * scale

    def resume(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of ``finish`` at this plan's first sigma: continue from latents another plan
        handed over in diffusers' form (e.g. the refiner after ``split``)."""
        scale = self.held_scale(self.sigmas[0])
        return latents.to(torch.float32) if scale == 1.0 else latents.to(torch.float32) / scale

    def _slice(self, start: int, stop: int, ends_schedule: bool) -> SamplingPlan:
        kwargs = dict(self.sampler_kwargs)
        for name in PER_STEP_KWARGS:
            if name in kwargs:
                kwargs[name] = kwargs[name][start:stop]
        if "lower_order_final" in kwargs and not ends_schedule:
            kwargs["lower_order_final"] = False
        sigmas = self.sigmas[start : stop + 1]
        timesteps = self.timesteps[start:stop]
        return dataclasses.replace(self, sigmas=sigmas, timesteps=timesteps, sampler_kwargs=kwargs)

    def from_strength(self, strength: float) -> SamplingPlan:
        """img2img: the last int(steps * strength) steps, as diffusers' img2img pipelines.
        Strength 0 leaves no step: the plan is the single sigma 0 and returns the input."""
        n = self.steps
        t_start = max(n - min(int(n * strength), n), 0)
        if t_start == n:
            return dataclasses.replace(self, sigmas=self.sigmas.new_zeros(1), timesteps=self.timesteps[:0],
                                       sampler_kwargs={})
        return self._slice(t_start, n, True)

    def split(self, fraction: float) -> tuple[SamplingPlan, SamplingPlan]:
        """Cut at denoising fraction f in (0, 1): steps whose timestep >= round(T (1 - f)) go
        to the first plan (diffusers' denoising_end), the rest to the second (denoising_start)."""
        T = self.alphas_cumprod.shape[0]
        cutoff = int(round(T - fraction * T))
        n = int((self.timesteps >= cutoff).sum())
        return self._slice(0, n, n == self.steps), self._slice(n, self.steps, True)


def _check_supported(cfg: ScheduleConfig, sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if cfg.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
    if sampler == "ddpm" and cfg.variance_type not in (None, "fixed_small", "fixed_small_log"):
        raise ValueError(f"ddpm supports variance_type fixed_small only, not {cfg.variance_type!r}")


def _table(acp: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The training sigmas and their logs as float32 numpy, as diffusers holds them."""
    sig = sigmas_from_alphas_cumprod(acp).numpy()
    return sig, np.log(sig)


def _acp_sigma(acp: torch.Tensor | float) -> float:
    """sigma of one alphas_cumprod value, computed in float32 as diffusers does."""
    acp = torch.as_tensor(acp, dtype=torch.float32)
    return float(((1 - acp) / acp) ** 0.5)


def plan_for_request(cfg: ScheduleConfig, sampler: str, steps: int, schedule: str,
                     eta: float | None = None) -> SamplingPlan:
    """`prepare_sampling` for a request's schedule name: "karras" asks for Karras sigmas, "default" takes
    the config's own spacing (none for ddim / ddpm, which have no Karras option); eta None is 0."""
    karras = True if schedule == "karras" else (False if sampler in ("ddim", "ddpm") else None)
    return prepare_sampling(cfg, sampler, steps, karras=karras, eta=eta or 0.0)


def prepare_sampling(cfg: ScheduleConfig, sampler: str, steps: int, karras: bool | None = None,
                     eta: float = 0.0) -> SamplingPlan:
    """Everything a run needs from a model's schedule config, matching diffusers.

    Args:
        cfg: the model's schedule (``t2i.checkpoints.diffusers_scheduler.read_scheduler_config``).
        sampler: one of SAMPLERS.
        steps: number of sampler steps N (network calls: N, or 2N - 1 for heun).
        karras: Karras sigmas (rho 7); None takes the config's use_karras_sigmas (ignored by
            ddim/ddpm, as in diffusers; an explicit True is an error there). For euler_a (no
            Karras option in diffusers) they are made as Euler's.
        eta: DDIM's eta (ddim only).
    Returns:
        The SamplingPlan.
    """
    _check_supported(cfg, sampler)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T = cfg.num_train_timesteps
    if steps > T:
        raise ValueError(f"steps ({steps}) cannot exceed num_train_timesteps ({T})")
    if karras is None:  # the config's choice; diffusers' DDIM/DDPM/LCM have no Karras option and ignore it
        karras = cfg.use_karras_sigmas and sampler not in NO_KARRAS
    if karras and sampler in NO_KARRAS:
        raise ValueError(f"Karras sigmas are not available for {sampler}; use euler, euler_a, heun, dpmpp_2m")
    if eta and sampler != "ddim":
        raise ValueError("eta applies to the ddim sampler only")
    cfg = resolve_settings(cfg, sampler)
    spacing = cfg.timestep_spacing
    acp = cfg.alphas_cumprod()
    table, log_table = _table(acp)
    kwargs: dict[str, Any] = {}

    if sampler in EULER_FAMILY:
        ts = spaced_timesteps(spacing, T, steps, cfg.steps_offset, integer=False)
        sig = np.interp(ts, np.arange(T), table)
        if karras:
            smin = cfg.sigma_min if cfg.sigma_min is not None and sampler == "euler" else sig[-1].item()
            smax = cfg.sigma_max if cfg.sigma_max is not None and sampler == "euler" else sig[0].item()
            sig = karras_sigmas(smin, smax, steps)
            ts = sigma_to_t(sig, log_table)
        final = _acp_sigma(acp[0]) if sampler == "euler" and cfg.final_sigmas_type == "sigma_min" else 0.0
        sigmas = torch.from_numpy(np.concatenate([sig, [final]]).astype(np.float32))
        smax32 = sigmas.max()
        init = smax32 if spacing in ("linspace", "trailing") else (smax32**2 + 1) ** 0.5
    elif sampler == "dpmpp_2m":
        last = T
        if cfg.lambda_min_clipped is not None and cfg.lambda_min_clipped > -np.inf:
            lam = torch.log(acp.sqrt()) - torch.log((1 - acp).sqrt())
            last = T - int(torch.searchsorted(torch.flip(lam, [0]), cfg.lambda_min_clipped))
        ts = dpm_timesteps(spacing, T, steps, cfg.steps_offset, last)
        if karras:
            sig = karras_sigmas(float(table[0]), float(table[-1]), steps)
            ts = sigma_to_t(sig, log_table)
            if cfg.beta_schedule not in ("squaredcos_cap_v2", "cosine"):
                ts = ts.round()
        else:
            sig = np.interp(ts, np.arange(T), table)
        final = _acp_sigma(acp[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
        sigmas = torch.from_numpy(np.concatenate([sig, [final]]).astype(np.float32))
        kwargs["lower_order_final"] = bool(cfg.euler_at_final or (cfg.lower_order_final and steps < 15))
        init = (sigmas[0] ** 2 + 1) ** 0.5
    elif sampler == "lcm":
        ts = _lcm_timesteps(cfg, steps)
        kwargs.update(_lcm_scalings(cfg, ts))
        # the last step returns x0 without noise whatever the final alphas_cumprod: sigma 0
        sigmas = torch.from_numpy(np.concatenate([table[ts], [0.0]]).astype(np.float32))
        init = (sigmas[0] ** 2 + 1) ** 0.5
    else:  # ddim, ddpm: integer timesteps, VP latents
        ts = spaced_timesteps(spacing, T, steps, cfg.steps_offset, integer=True)
        if sampler == "ddim":
            final_acp = 1.0 if cfg.set_alpha_to_one else acp[0]
            prev = ts - T // steps
        else:
            final_acp = 1.0
            prev = np.concatenate([ts[1:], [-1]])
        final = _acp_sigma(final_acp)
        sig_to = np.array([table[p] if p >= 0 else final for p in prev], dtype=np.float32)
        sigmas = torch.from_numpy(np.concatenate([table[ts], [final]]).astype(np.float32))
        if sampler == "ddim":
            kwargs["eta"] = eta
            if not np.array_equal(sig_to, sigmas[1:].numpy()):
                kwargs["sigmas_to"] = torch.from_numpy(sig_to)
        init = (sigmas[0] ** 2 + 1) ** 0.5

    x0_limit = None
    if sampler in ("ddim", "ddpm", "dpmpp_2m", "lcm") and cfg.thresholding:
        x0_limit = ("threshold", cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
    elif sampler in ("ddim", "ddpm", "heun", "lcm"):
        if cfg.clip_sample:
            x0_limit = ("clip", cfg.clip_sample_range)

    return SamplingPlan(
        sampler=sampler,
        sigmas=sigmas,
        timesteps=torch.from_numpy(np.asarray(ts).astype(np.float32)),
        init_noise_scale=float(init),
        alphas_cumprod=acp,
        prediction_type=cfg.prediction_type,
        sampler_kwargs=kwargs,
        x0_limit=x0_limit,
        total_steps=steps,
    )


def _lcm_setting(cfg: ScheduleConfig, name: str) -> Any:
    value = getattr(cfg, name, None)  # a ScheduleConfig field once there is one
    return LCM_SETTINGS[name] if value is None else value


def _lcm_timesteps(cfg: ScheduleConfig, steps: int) -> np.ndarray:
    """LCMScheduler's timesteps (int64, descending): the distillation schedule of
    original_inference_steps (50) timesteps k - 1, 2k - 1, ..., T - 1 with the skipping step
    k = T // 50 (Luo et al. 2023 sec. 4.3), of which `steps` are taken at evenly spaced indices
    from the top: 999, 759, 499, 259 for 4 steps of T = 1000."""
    original = int(_lcm_setting(cfg, "original_inference_steps"))
    T = cfg.num_train_timesteps
    if not 1 <= original <= T:
        raise ValueError(f"original_inference_steps ({original}) must be in 1..num_train_timesteps ({T})")
    if steps > original:
        raise ValueError(f"the lcm sampler takes at most original_inference_steps ({original}) steps, got {steps}")
    origin = (np.arange(1, original + 1) * (T // original) - 1)[::-1]
    return origin[np.floor(np.linspace(0, original, num=steps, endpoint=False)).astype(np.int64)]


def _lcm_scalings(cfg: ScheduleConfig, timesteps: np.ndarray) -> dict[str, torch.Tensor]:
    """sample_lcm's per-step boundary scalings (c_skip, c_out) at LCMScheduler's timesteps."""
    scaling = float(_lcm_setting(cfg, "timestep_scaling"))
    c_skip, c_out = consistency_boundary_scalings(torch.from_numpy(timesteps), scaling)
    return {"c_skip": c_skip, "c_out": c_out}
