"""The KL-regularised convolutional autoencoder of latent diffusion (the "SD VAE").

Rombach et al. 2022 (LDM) Sec. 3.1 and App. G: an encoder maps an image x in [-1, 1] to a
diagonal Gaussian posterior q(z|x) over a latent that is 2 ** (levels - 1) times smaller
(8 for SD), a decoder maps z back to pixels; a small KL penalty towards N(0, I) keeps the
latent scale sane. Diffusion runs on z * scaling_factor (0.18215 for SD1/2, 0.13025 for
SDXL), so the latents have roughly unit variance.

Parameter names equal diffusers' `AutoencoderKL` (`encoder.down_blocks.0.resnets.0.norm1`,
`decoder.mid_block.attentions.0.to_q`, `quant_conv`, ...), so a diffusers `vae/` folder
loads with `strict=True`. Weights use PyTorch's default init, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2i.nets.levels import DownBlock, MidBlock, UpBlock
from t2i.nets.resample import Downsample, Upsample
from t2i.nets.resnet import ResBlock
from t2i.nets.spatial_attention import SpatialSelfAttention


@dataclass
class AutoencoderKLConfig:
    """Shape of a KL autoencoder.

    Attributes:
        in_channels, out_channels: image channels (3).
        block_channels: width of each level; len(block_channels) - 1 downsamplings, so
            (128, 256, 512, 512) gives SD's factor 8 and three levels factor 4.
        layers_per_block: ResBlocks per encoder level (the decoder has one more).
        latent_channels: channels of z.
        norm_groups: GroupNorm groups everywhere.
        mid_attention: whether the mid blocks have the single-head self-attention.
        scaling_factor, shift_factor: diffusion latents are (z - shift) * scale.
        use_quant_conv, use_post_quant_conv: the 1x1 convs around the latent (SD: yes).
        sample_size: image size the model was trained at (metadata).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_groups: int = 32
    mid_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: int = 512

    def __post_init__(self) -> None:
        self.block_channels = tuple(self.block_channels)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each axis."""
        return 2 ** (len(self.block_channels) - 1)


class DiagonalGaussian:
    """The posterior N(mean, diag(std^2)) from the encoder's moments.

    moments: (B, 2C, h, w), mean then log-variance along channels; the log-variance is
    clamped to [-30, 20] as in the reference.
    """

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn from `generator`. (B, C, h, w)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The posterior mean, (B, C, h, w)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) summed over latent dimensions, (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


def _resblock(cfg: AutoencoderKLConfig, c_in: int, c_out: int) -> ResBlock:
    # No time embedding; eps 1e-6 as in the reference VAE (the U-Net uses 1e-5).
    return ResBlock(c_in, c_out, None, groups=cfg.norm_groups, eps=1e-6)


def _mid(cfg: AutoencoderKLConfig, c: int) -> MidBlock:
    if not cfg.mid_attention:  # both ResBlocks stay, as in the reference
        return MidBlock([_resblock(cfg, c, c), _resblock(cfg, c, c)])
    attn = SpatialSelfAttention(c, heads=1, groups=cfg.norm_groups, eps=1e-6)
    return MidBlock([_resblock(cfg, c, c), _resblock(cfg, c, c)], [attn])


class Encoder(nn.Module):
    """x (B, 3, H, W) -> moments (B, 2 * latent_channels, H / f, W / f), before quant_conv; with
    double_z=False (a VQ encoder, diffusers' VQModel) the latent itself (B, latent_channels, ...)."""

    def __init__(self, cfg: AutoencoderKLConfig, double_z: bool = True) -> None:
        super().__init__()
        ch = cfg.block_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        c_in = ch[0]
        for level, c in enumerate(ch):
            resnets = [_resblock(cfg, c_in if j == 0 else c, c) for j in range(cfg.layers_per_block)]
            last = level == len(ch) - 1
            # padding=0: pad right/bottom only, then a stride-2 conv (the LDM encoder's downsampling).
            self.down_blocks.append(DownBlock(resnets, None, None if last else Downsample(c, padding=0)))
            c_in = c
        self.mid_block = _mid(cfg, ch[-1])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], (2 if double_z else 1) * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h)
        h = self.mid_block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """z (B, latent_channels, h, w), after post_quant_conv -> image (B, 3, h * f, w * f)."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        ch = cfg.block_channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid_block = _mid(cfg, ch[-1])
        self.up_blocks = nn.ModuleList()
        c_in = ch[-1]
        for i, c in enumerate(reversed(ch)):
            resnets = [_resblock(cfg, c_in if j == 0 else c, c) for j in range(cfg.layers_per_block + 1)]
            last = i == len(ch) - 1
            self.up_blocks.append(UpBlock(resnets, None, None if last else Upsample(c)))
            c_in = c
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """encode(x) -> DiagonalGaussian over z; decode(z) -> x. z is the *unscaled* latent;
    `scale`/`unscale` convert to and from the diffusion latent space."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1] -> posterior over z (B, C, H / f, W / f)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) unscaled latents -> (B, 3, h * f, w * f), roughly in [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction for training: (x_hat (B, 3, H, W), posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder latent -> diffusion latent: (z - shift) * scaling_factor."""
        shift = self.cfg.shift_factor or 0.0
        return (z - shift) * self.cfg.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latent -> autoencoder latent: latents / scaling_factor + shift."""
        shift = self.cfg.shift_factor or 0.0
        return latents / self.cfg.scaling_factor + shift


AUTOENCODER_KL_CONFIGS: dict[str, AutoencoderKLConfig] = {
    # SD 1.x / 2.x VAE (f = 8, 4 latent channels).
    "sd": AutoencoderKLConfig(),
    # SDXL VAE: same network, different latent scale.
    "sdxl": AutoencoderKLConfig(scaling_factor=0.13025, sample_size=1024),
    # Small f = 4 autoencoder to train from scratch on 64x64 images (16x16x4 latents).
    # scaling_factor is a placeholder: set it to 1 / std of the trained latents.
    "f4_64": AutoencoderKLConfig(
        block_channels=(64, 128, 128),
        layers_per_block=1,
        latent_channels=4,
        scaling_factor=1.0,
        sample_size=64,
    ),
    # Test-sized network (f = 4).
    "tiny": AutoencoderKLConfig(
        block_channels=(16, 32, 32), layers_per_block=1, norm_groups=8, scaling_factor=1.0, sample_size=32
    ),
}
