"""A tiny preview decoder that stands in for the KL autoencoder's decoder (TAESD-like).

TAESD (Bohan, 2023, github.com/madebyollin/taesd) replaces the SD VAE decoder by a plain stack of
3x3 convolutions: ReLU residual blocks at a constant width of 64, nearest-neighbour upsampling,
no attention and no GroupNorm. That is why it is fast: the SD decoder spends most of its FLOPs in
512- and 256-wide ResBlocks at high resolution (and its mid-block attention is quadratic in the
pixels); this one keeps every layer 64 wide. It is trained by distillation to reproduce the
frozen VAE decoder's output on the same latents (`t2i.train.preview`), so its images are a close,
slightly blurrier preview of the real decode.

Unlike TAESD, which reads the diffusion (scaled) latents and writes [0, 1], a `PreviewDecoder`
has the VAE decoder's contract: unscaled latents in (what `AutoencoderKL.decode` takes), images
in [-1, 1] out. The VAE's scaling is stored in the config and applied first, so the network sees
roughly unit-variance inputs whatever the VAE.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from t2i.autoencoders.kl import AutoencoderKLConfig
from t2i.checkpoints.io import load_state_dict, read_config, save_with_config
from t2i.nets.resample import Upsample

SYSTEM = "preview_decoder"  # "t2i_system" in the file's metadata


@dataclass
class PreviewDecoderConfig:
    """Shape of a preview decoder.

    Attributes:
        latent_channels: channels of the latents it decodes (4 for SD and the shapes VAE).
        out_channels: image channels (3).
        upsamples: 2x upsamplings, log2 of the VAE's downsample factor (2 for the shapes model's
            f=4 VAE, 3 for SD's f=8).
        width: channels of every convolution (TAESD: 64).
        blocks: residual blocks before each upsampling (TAESD: 3).
        final_blocks: residual blocks at full resolution (TAESD: 1; the costliest per block).
        latent_scale, latent_shift: the VAE's scaling_factor and shift_factor; the network reads
            (z - shift) * scale, the diffusion latent, which has roughly unit variance.
    """

    latent_channels: int = 4
    out_channels: int = 3
    upsamples: int = 3
    width: int = 64
    blocks: int = 3
    final_blocks: int = 1
    latent_scale: float = 1.0
    latent_shift: float = 0.0

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each axis (the VAE's factor it stands in for)."""
        return 2**self.upsamples

    @classmethod
    def for_vae(cls, vae: AutoencoderKLConfig, width: int = 64, blocks: int = 3,
                final_blocks: int = 1) -> PreviewDecoderConfig:
        """A decoder of this shape for `vae`'s latents: channels, upsamplings and scaling from `vae`."""
        return cls(latent_channels=vae.latent_channels, out_channels=vae.out_channels,
                   upsamples=int(math.log2(vae.downsample_factor)), width=width, blocks=blocks,
                   final_blocks=final_blocks, latent_scale=vae.scaling_factor, latent_shift=vae.shift_factor or 0.0)


class ReLUBlock(nn.Module):
    """TAESD's residual block: relu(x + conv(relu(conv(relu(conv(x)))))), no normalisation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        h = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(x + h)


class PreviewDecoder(nn.Module):
    """z (B, latent_channels, h, w), unscaled VAE latents -> image (B, 3, h * f, w * f), about [-1, 1]
    (not clamped, like the VAE decoder it imitates; `to_pil` clamps)."""

    def __init__(self, cfg: PreviewDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv_in = nn.Conv2d(cfg.latent_channels, w, 3, padding=1)
        self.stages = nn.ModuleList()
        for _ in range(cfg.upsamples):  # then 2x nearest + conv, as the SD decoder upsamples
            self.stages.append(nn.Sequential(*[ReLUBlock(w) for _ in range(cfg.blocks)], Upsample(w)))
        self.stages.append(nn.Sequential(*[ReLUBlock(w) for _ in range(cfg.final_blocks)]))
        self.conv_out = nn.Conv2d(w, cfg.out_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        # Without normalisation, a stack of default-initialised residual blocks grows the activations
        # block after block; zeroing each block's last conv makes it start as the identity (SkipInit,
        # De & Smith 2020), so the untrained decoder is well scaled at any depth.
        for m in self.modules():
            if isinstance(m, ReLUBlock):
                nn.init.zeros_(m.conv3.weight)
                nn.init.zeros_(m.conv3.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = (z - self.cfg.latent_shift) * self.cfg.latent_scale  # (B, C, h, w), the diffusion latent
        # TAESD's soft clamp: sampler outputs can stray far outside the latents the VAE ever made; tanh
        # bounds them to (-3, 3) and is nearly the identity inside (|x| < 1 moves by under 4%).
        x = 3.0 * torch.tanh(x / 3.0)
        h = F.relu(self.conv_in(x))  # (B, width, h, w)
        for stage in self.stages:
            h = stage(h)  # (B, width, 2h, 2w) after each upsampling stage
        return self.conv_out(h)  # (B, 3, h * f, w * f)

    def save(self, path: str | Path) -> None:
        """float32 weights with the config in the metadata, written atomically."""
        state = {k: v.detach().float() for k, v in self.state_dict().items()}
        save_with_config(state, path, dataclasses.asdict(self.cfg), SYSTEM)

    @classmethod
    def load(cls, path: str | Path) -> PreviewDecoder:
        """A file written by `save` -> frozen PreviewDecoder in eval mode."""
        model = cls(PreviewDecoderConfig(**read_config(path, "a preview decoder file", SYSTEM)))
        model.load_state_dict(load_state_dict(path))
        return model.eval().requires_grad_(False)


PREVIEW_DECODER_CONFIGS: dict[str, PreviewDecoderConfig] = {
    # TAESD's shape for SD 1/2/XL latents (f = 8); latent_scale is SD 1/2's (SDXL: 0.13025).
    "sd": PreviewDecoderConfig(upsamples=3, latent_scale=0.18215),
    # The shapes model's f = 4 VAE (t2i.systems.shapes_ldm); its scaling comes from the model file. That VAE
    # is small already: its decoder costs 0.51 GFLOP per 64x64 image, TAESD's width 2.15, width 32 0.54,
    # width 16 0.14, so only a narrower preview decodes it faster.
    "shapes": PreviewDecoderConfig(upsamples=2),
    # Test-sized (f = 4).
    "tiny": PreviewDecoderConfig(upsamples=2, width=8, blocks=1),
}
