"""Stable Diffusion 1.x / 2.x / XL (seed 002, seed 003): diffusers folders and single files.

The family's facts: which layouts it reads (a diffusers pipeline folder, an original-layout single
file: the adapters in `t2i.checkpoints` read them into `LatentDiffusionParts`), its generation
defaults per layout, the sampler that stands for each diffusers scheduler class, how parts become
a `LatentDiffusionPipeline`, how a pipeline is written back out (`export`, used by `t2i convert`),
and a tiny random model for the tests every family gets.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from t2i.autoencoders.kl import AutoencoderKL, AutoencoderKLConfig
from t2i.checkpoints.diffusers_folder import SUPPORTED_PIPELINES, is_diffusers_folder, load_diffusers_parts
from t2i.checkpoints.export import save_diffusers_folder, save_single_file
from t2i.checkpoints.io import check_safetensors_header, read_json_object
from t2i.checkpoints.parts import LatentDiffusionParts, text_layout
from t2i.checkpoints.single_file import is_single_file, load_single_file
from t2i.checkpoints.single_file_config import default_schedule
from t2i.nets.unet import UNet, UNetConfig
from t2i.systems.base import GenerationDefaults, System
from t2i.systems.latent_diffusion import LatentDiffusionPipeline
from t2i.text.clip import CLIPTextConfig, CLIPTextModel
from t2i.text.clip_tokenizer import CLIPTokenizer
from t2i.text.encoders import CLIPTextEncoder

NAME = "stable_diffusion"

# A checkpoint's diffusers scheduler class decides its default sampler, as it does in diffusers.
SCHEDULER_SAMPLERS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
    "PNDMScheduler": "euler",  # PNDM/PLMS is not implemented; Euler is the usual stand-in
}
# ...and the class an exported checkpoint names for a pipeline's default sampler.
SAMPLER_SCHEDULERS = {s: c for c, s in SCHEDULER_SAMPLERS.items() if c != "PNDMScheduler"}
DEFAULT_SAMPLER, DEFAULT_SCHEDULER = "euler", "EulerDiscreteScheduler"


# Latent consistency models (LatentConsistencyModelPipeline folders, or any SD folder with LCMScheduler):
# diffusers' LCM pipeline defaults, 4 steps at guidance_scale 8.5 (the w-embedding of w = 7.5). An
# LCMScheduler without the w input (LCM-LoRA fused into an SD U-Net) runs without CFG, guidance 1.
LCM_STEPS, LCM_GUIDANCE, LCM_LORA_GUIDANCE = 4, 8.5, 1.0


def generation_defaults(parts: LatentDiffusionParts) -> GenerationDefaults:
    """SDXL: 30 steps at guidance 5; SD 1/2: 20 at 7.5; an LCM (LCMScheduler): 4 steps at 8.5 as
    embedded guidance, 1.0 without the embedding; the native size is the U-Net's sample size in
    pixels; the sampler follows the scheduler class. Settings the file stores win."""
    xl = parts.layout.startswith("sdxl")
    size = parts.unet.cfg.sample_size * parts.vae.cfg.downsample_factor
    sampler = SCHEDULER_SAMPLERS.get(parts.scheduler_class or "", DEFAULT_SAMPLER)
    steps, guidance = (30, 5.0) if xl else (20, 7.5)
    if sampler == "lcm":
        embedded = parts.unet.cfg.time_cond_proj_dim is not None
        steps, guidance = LCM_STEPS, LCM_GUIDANCE if embedded else LCM_LORA_GUIDANCE
    defaults = GenerationDefaults(sampler=sampler, steps=steps, guidance=guidance, width=size, height=size)
    return dataclasses.replace(defaults, **_stored_defaults(parts.defaults, parts.name))


def _stored_defaults(stored: dict[str, Any], name: str) -> dict[str, Any]:
    """The stored settings GenerationDefaults knows, each of its field's kind (ValueError otherwise)."""
    out = {}
    for f in dataclasses.fields(GenerationDefaults):
        if f.name not in stored:
            continue
        value, kind = stored[f.name], type(f.default)
        ok = isinstance(value, str) if kind is str else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (kind is float or (isinstance(value, int) and 1 <= value <= 1 << 14)))
        if not ok:
            raise ValueError(f"{name}: stored default {f.name}={value!r} is not a valid setting")
        out[f.name] = value
    return out


def pipeline_from_parts(parts: LatentDiffusionParts) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline(parts.unet, parts.vae, parts.text_encoder, parts.schedule, name=parts.name,
                                   family=NAME, defaults=generation_defaults(parts),
                                   micro_conditioning=parts.micro_conditioning,
                                   zero_empty_negative=parts.zero_empty_negative)


def parts_of(pipe: LatentDiffusionPipeline) -> LatentDiffusionParts:
    """A pipeline's parts, as an exporter writes them (the scheduler class named for its sampler)."""
    return LatentDiffusionParts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.schedule, pipe.name,
                                text_layout(pipe.text_encoder),
                                SAMPLER_SCHEDULERS.get(pipe.defaults.sampler, DEFAULT_SCHEDULER),
                                pipe.zero_empty_negative, dataclasses.asdict(pipe.defaults))


def detect(path: Path) -> bool:
    """A diffusers folder whose pipeline class is one of SD's (or whose model_index.json cannot be
    read: the loader then says what is wrong with it), or a single weight file."""
    if is_diffusers_folder(path):
        try:
            cls = read_json_object(path / "model_index.json", "model_index.json").get("_class_name")
        except ValueError:
            return True
        return cls in SUPPORTED_PIPELINES
    if is_single_file(path) and path.suffix == ".safetensors":
        # Any weight file but another t2i family's (their metadata names it): a file that is no SD
        # checkpoint either gets the SD loader's error, which says what an SD file holds.
        try:
            meta = check_safetensors_header(path).get("__metadata__") or {}
        except ValueError:
            return True  # the loader says what is wrong with it
        return "t2i_system" not in meta
    return is_single_file(path)


def load(path: Path, dtype: torch.dtype | None = torch.float32, *, prediction: str | None = None,
         config: Path | None = None, compact: torch.dtype | None = None) -> LatentDiffusionPipeline:
    """A diffusers folder or a single file -> LatentDiffusionPipeline. dtype None keeps the dtype the
    U-Net's weights are stored in. prediction and config ("epsilon" / "v_prediction", a diffusers
    folder describing the nets) apply to single files only (see t2i.checkpoints.single_file_config).
    compact (torch.bfloat16 or torch.float16, with dtype float32): weights read straight into 16-bit
    storage and widened layer by layer, float32 compute: about half the memory (`t2i.compact`)."""
    path = Path(path)
    if is_diffusers_folder(path):
        if prediction or config:
            raise ValueError("--prediction and --config apply to single-file sources only")
        return pipeline_from_parts(load_diffusers_parts(path, dtype, compact=compact))
    return pipeline_from_parts(load_single_file(path, prediction=prediction, config=config, dtype=dtype,
                                                compact=compact))


def export(pipe: LatentDiffusionPipeline, dst: Path) -> Path:
    """Write `pipe` to DST: one `.safetensors` in the original SD layout, else a new diffusers folder."""
    dst = Path(dst)
    parts = parts_of(pipe)
    return save_single_file(parts, dst) if dst.suffix == ".safetensors" else save_diffusers_folder(parts, dst)


# A tiny SD 1.x: 16x16 latents (32x32 images, an f=2 autoencoder), one attention level, a 2-layer
# CLIP tower on the real vocabulary (the bundled tokenizer).
TINY_UNET = UNetConfig(block_channels=(32, 64), layers_per_block=(1, 1), attention=(True, False), num_heads=(2, 2),
                       transformer_depth=(1, 1), context_dim=32, only_cross_attention=(False, False),
                       norm_groups=8, sample_size=16)
TINY_VAE = AutoencoderKLConfig(block_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_groups=8,
                               sample_size=32)
TINY_TEXT = CLIPTextConfig(width=32, layers=2, heads=2, mlp_dim=64, eos_token_id=2, pooling="argmax")


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """A random SD 1.x diffusers folder `folder/tiny-sd`, written by t2i's own exporter."""
    torch.manual_seed(seed)
    text = CLIPTextEncoder(CLIPTokenizer.default(), CLIPTextModel(TINY_TEXT), "last")
    parts = LatentDiffusionParts(UNet(TINY_UNET), AutoencoderKL(TINY_VAE), text, default_schedule("epsilon"),
                                 "tiny-sd", "sd1", DEFAULT_SCHEDULER)
    folder.mkdir(parents=True, exist_ok=True)
    return save_diffusers_folder(parts, folder / "tiny-sd")


SYSTEM = System(
    name=NAME,
    description="Stable Diffusion 1.x/2.x/XL: a diffusers folder (model_index.json) or a single .safetensors/.ckpt",
    detect=detect, load=load, write_tiny=write_tiny, export=export)
