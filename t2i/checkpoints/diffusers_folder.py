"""The diffusers folder layout of a Stable Diffusion pipeline, read into our modules.

    model_index.json          which pipeline class and components
    unet/       config.json + diffusion_pytorch_model.safetensors
    vae/        config.json + diffusion_pytorch_model.safetensors
    text_encoder(_2)/  config.json + model.safetensors (transformers layout)
    tokenizer(_2)/     vocab.json + merges.txt (+ special_tokens_map.json)
    scheduler/  scheduler_config.json

Our U-Net and autoencoder use the diffusers parameter names, so their weights load as they
are; the text encoders are mapped in `transformers_text`. Everything is offline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from t2i.autoencoders.kl import AutoencoderKL
from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers, vae_config_from_diffusers
from t2i.checkpoints.diffusers_scheduler import read_scheduler_config
from t2i.checkpoints.io import CheckpointError, find_weights, load_state_dict
from t2i.nets.unet import UNet
from t2i.systems.latent_diffusion import GenerationDefaults, LatentDiffusionPipeline
from t2i.text.encoders import load_diffusers_text_encoder

SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}

# The folder's own scheduler decides the default sampler, as it does in diffusers.
SCHEDULER_SAMPLERS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "PNDMScheduler": "euler",  # PNDM/PLMS is not implemented; Euler is the usual stand-in
}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a complete diffusers folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None


def _load_module(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    # assign=True: the loaded tensors become the parameters (no copy into a second set), which is
    # also what fills a module built on the meta device.
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not fit the config: {len(missing)} missing "
                              f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


M = TypeVar("M", bound=torch.nn.Module)


def _build_and_load(build: Callable[[], M], folder: Path, dtype: torch.dtype, variant: str | None) -> M:
    """Build a module on the meta device (no random init: for the SD U-Net that alone took most of
    the load time) and fill it with the folder's weights, cast to dtype."""
    state: dict[str, torch.Tensor] = {}
    for file in find_weights(folder, "diffusion_pytorch_model", variant):
        state.update(load_state_dict(file))  # safetensors: memory-mapped; NaN/Inf refused
    with torch.device("meta"):
        module = build()
    _load_module(module, {k: v.to(dtype) for k, v in state.items()}, folder)
    return module.eval().requires_grad_(False)


def load_unet(folder: Path, dtype: torch.dtype = torch.float32, variant: str | None = None) -> UNet:
    cfg = unet_config_from_diffusers(_read_json(folder / "config.json"))
    return _build_and_load(lambda: UNet(cfg), folder, dtype, variant)


def load_vae(folder: Path, dtype: torch.dtype = torch.float32, variant: str | None = None) -> AutoencoderKL:
    cfg = vae_config_from_diffusers(_read_json(folder / "config.json"))
    return _build_and_load(lambda: AutoencoderKL(cfg), folder, dtype, variant)


def load_diffusers_pipeline(path: str | Path, dtype: torch.dtype = torch.float32,
                            variant: str | None = None) -> LatentDiffusionPipeline:
    """A diffusers Stable Diffusion (1.x, 2.x, XL) folder -> LatentDiffusionPipeline."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    index = _read_json(root / "model_index.json")
    cls = index.get("_class_name", "")
    family = SUPPORTED_PIPELINES.get(cls)
    if family is None:
        raise CheckpointError(f"{root}: unsupported pipeline class {cls!r} "
                              f"(supported: {', '.join(sorted(SUPPORTED_PIPELINES))})")
    for part in ("unet", "vae", "scheduler"):
        if not (root / part).is_dir():
            raise FileNotFoundError(f"{root / part} is missing: not a complete diffusers folder")
    unet = load_unet(root / "unet", dtype, variant)
    vae = load_vae(root / "vae", dtype, variant)
    text_encoder = load_diffusers_text_encoder(root, dtype)
    schedule = read_scheduler_config(root / "scheduler" / "scheduler_config.json")
    scheduler_class = _read_json(root / "scheduler" / "scheduler_config.json").get("_class_name", "")
    size = unet.cfg.sample_size * vae.cfg.downsample_factor
    defaults = GenerationDefaults(sampler=SCHEDULER_SAMPLERS.get(scheduler_class, "euler"),
                                  steps=30 if family == "sdxl" else 20, width=size, height=size,
                                  guidance=5.0 if family == "sdxl" else 7.5)
    return LatentDiffusionPipeline(unet, vae, text_encoder, schedule, name=root.name, defaults=defaults,
                                   micro_conditioning=unet.add_embedding is not None,
                                   zero_empty_negative=bool(index.get("force_zeros_for_empty_prompt", False)))
