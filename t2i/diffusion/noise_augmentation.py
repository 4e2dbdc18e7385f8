"""Noise conditioning augmentation for super-resolution stages (Ho et al. 2021, "Cascaded Diffusion
Models", sec. 4.1; Imagen, Saharia et al. 2022, sec. 2.3).

A cascade's super-resolution stage is trained on low-resolution images made from real ones, but at
sampling time it reads the previous stage's samples, which carry that stage's artefacts. Noising the
low-resolution input with the forward process at a level the network is told about closes the gap:
at training the level is drawn at random per image; at sampling a fixed level is used (DeepFloyd IF:
timestep 250 of a cosine schedule, diffusers' `noise_level`), the same for every image.

    z = sqrt(acp[level]) * x_low + sqrt(1 - acp[level]) * noise       (the forward process q(z | x_low))

The network receives z (upsampled, concatenated to its noisy input) and `level` (embedded like a
timestep: `t2i.nets.if_unet.IFUNetConfig.class_embed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NoiseAugmentation:
    """The forward process of an augmentation schedule.

    Attributes:
        alphas_cumprod: (T,) the schedule's cumulative alphas (IF: cosine, T = 1000).
        max_level: the highest level drawn at training (inclusive; None: T - 1). Imagen draws the
            level over the whole range and lets sampling pick one.
    """

    alphas_cumprod: torch.Tensor
    max_level: int | None = None

    @property
    def levels(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def apply(self, image: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """image: (B, C, H, W) in [-1, 1]; level: (B,) integer timesteps in [0, T); noise: like image ->
        (B, C, H, W), the image noised at each level (diffusers' DDPMScheduler.add_noise)."""
        if int(level.min()) < 0 or int(level.max()) >= self.levels:
            raise ValueError(f"noise levels must be in [0, {self.levels}), got {level.tolist()}")
        acp = self.alphas_cumprod.to(image.device)[level.long()].to(image.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        return acp.sqrt() * image + (1 - acp).sqrt() * noise

    def at_level(self, image: torch.Tensor, level: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling: every image noised at the one fixed `level`. Returns (noised image, levels (B,))."""
        levels = torch.full((image.shape[0],), int(level), dtype=torch.long, device=image.device)
        return self.apply(image, levels, noise), levels

    def sample(self, image: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
        """Training: a level drawn uniformly from [0, max_level] for each image, and fresh noise.
        Returns (noised image, levels (B,))."""
        top = self.levels - 1 if self.max_level is None else self.max_level
        levels = torch.randint(0, top + 1, (image.shape[0],), generator=generator, device=image.device)
        noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        return self.apply(image, levels, noise), levels
