"""GLIDE's noise-aware CLIP (Nichol et al. 2021, sec. 2.4): the shapes CLIP (`t2i.eval.shapes_clip`) whose image tower
reads noised images x_t and their timestep t, for CLIP guidance (`t2i.diffusion.clip_guidance`).

GLIDE's noised CLIP has an image encoder f(x_t, t) that reads noised images and their timestep; here the shapes
CLIP's ViT with the timestep embedded (sinusoid + MLP, as the diffusion U-Nets embed it) and added to every patch
token, and the image resized (bilinear) from the diffusion model's side to the ViT's. The MLP's output layer starts
at zero, so an untrained noise-aware tower *is* the clean one: `t2i train noisy-clip` fine-tunes the image tower
from the shipped CLIP on noised images against its frozen text tower. The time embedding enters through a
forward hook on the patch embedding, so the tower's parameters keep the shapes CLIP's names (and its weights load
as they are).

Its file (`save_noisy_clip`) holds the CLIP (text tower included), the time MLP, the config, and the diffusion
schedule the noise was drawn from (guidance refuses a model of another schedule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i.checkpoints.io import CheckpointError, load_state_dict, read_config, save_with_config
from t2i.diffusion.schedules import ScheduleConfig
from t2i.eval.shapes_clip import ShapesCLIP, ShapesCLIPConfig
from t2i.nets.embeddings import SinusoidalEmbedding, TimestepEmbedding

SYSTEM_NAME = "noisy_clip"


@dataclass
class NoisyCLIPConfig:
    """clip: the shapes CLIP's shape; image_size: the side of the noised images it reads (the guided model's)."""

    clip: ShapesCLIPConfig = field(default_factory=ShapesCLIPConfig)
    image_size: int = 32

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoisyCLIPConfig:
        return cls(clip=ShapesCLIPConfig.from_dict(d["clip"]), image_size=d["image_size"])


class NoisyCLIP(nn.Module):
    """The shapes CLIP with a timestep-aware image tower: encode_noisy(x_t, t) -> (B, E) unit-norm embeddings."""

    def __init__(self, cfg: NoisyCLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip = ShapesCLIP(cfg.clip)
        width = cfg.clip.vision_width
        self.time_proj = SinusoidalEmbedding(width)
        self.time_embedding = TimestepEmbedding(width, width)
        nn.init.zeros_(self.time_embedding.linear_2.weight)  # zero: the untrained tower is the clean CLIP's
        nn.init.zeros_(self.time_embedding.linear_2.bias)

    def encode_noisy(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: (B, 3, S, S) VP images (S = cfg.image_size) at timesteps t (B,) -> (B, E) unit-norm embeddings."""
        size = self.cfg.clip.image_size
        pixels = x_t if x_t.shape[-1] == size else F.interpolate(x_t, (size, size), mode="bilinear",
                                                                 align_corners=False)  # (B, 3, 64, 64)
        t = t.reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t
        emb = self.time_embedding(self.time_proj(t).to(pixels.dtype))  # (B, width)

        def add_time(_module: nn.Module, _inputs: Any, patches: torch.Tensor) -> torch.Tensor:
            return patches + emb[:, :, None, None]  # (B, width, h, w): every patch token

        hook = self.clip.vision.patch_embedding.register_forward_hook(add_time)
        try:
            return self.clip.encode_images(pixels)
        finally:
            hook.remove()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.encode_noisy(x_t, t)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """N captions -> (N, E) unit-norm embeddings of the (frozen) text tower."""
        return self.clip.embed_texts(texts)


def save_noisy_clip(model: NoisyCLIP, schedule: ScheduleConfig, path: str | Path) -> None:
    """One safetensors: the weights, and in its metadata the config and the schedule its noise was drawn from."""
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_with_config(state, path, {"model": dataclasses.asdict(model.cfg), "schedule": dataclasses.asdict(schedule)},
                     SYSTEM_NAME)


def is_noisy_clip(path: str | Path) -> bool:
    """Whether `path` is a file of `save_noisy_clip` (metadata only)."""
    try:
        read_config(path, "a noise-aware CLIP file", SYSTEM_NAME)
    except (FileNotFoundError, ValueError):
        return False
    return True


def load_noisy_clip(path: str | Path) -> tuple[NoisyCLIP, ScheduleConfig]:
    """A file of `save_noisy_clip` -> (the model in eval mode, frozen; the schedule it was trained on)."""
    raw = read_config(path, "a noise-aware CLIP file", SYSTEM_NAME)
    try:
        cfg, schedule = NoisyCLIPConfig.from_dict(raw["model"]), ScheduleConfig(**raw["schedule"])
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed noise-aware CLIP config ({type(e).__name__}: {e})") from None
    model = NoisyCLIP(cfg)
    model.load_state_dict(load_state_dict(path), strict=True)
    return model.eval().requires_grad_(False), schedule


def from_clean(clip: ShapesCLIP, image_size: int) -> NoisyCLIP:
    """A noise-aware CLIP starting from a trained (clean) shapes CLIP: its weights, a zero time embedding."""
    model = NoisyCLIP(NoisyCLIPConfig(clip=clip.cfg, image_size=image_size))
    model.clip.load_state_dict(clip.state_dict())
    return model
