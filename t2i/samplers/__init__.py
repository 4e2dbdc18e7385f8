"""Samplers as plain functions over VE noise levels, and the plan that prepares a diffusers-parity run."""

from t2i.samplers.diffusers_plan import SamplingPlan, prepare_sampling
from t2i.samplers.sampling import (
    SAMPLERS,
    randn_like,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)

__all__ = [
    "SAMPLERS",
    "SamplingPlan",
    "prepare_sampling",
    "randn_like",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
]
