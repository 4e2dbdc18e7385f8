"""The shape of a convolutional tokenizer's encoder and decoder: the KL autoencoder's blocks
(`t2i.autoencoders.kl`), which the dVAE and the VQ-VAE-2 (bottom level) build on, as the VQ-VAE does."""

from __future__ import annotations

from dataclasses import dataclass

from t2i.autoencoders.kl import AutoencoderKLConfig


@dataclass
class ConvShape:
    """Fields as in `AutoencoderKLConfig`; `latent_channels` at the latent, f = 2^(levels - 1)."""

    in_channels: int = 3
    out_channels: int = 3
    block_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    latent_channels: int = 16
    norm_groups: int = 8
    mid_attention: bool = True
    sample_size: int = 64  # image size the model was trained at (metadata)

    def __post_init__(self) -> None:
        self.block_channels = tuple(self.block_channels)

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each axis."""
        return 2 ** (len(self.block_channels) - 1)

    def blocks(self) -> AutoencoderKLConfig:
        """The encoder/decoder shape as the KL autoencoder's config."""
        return AutoencoderKLConfig(
            in_channels=self.in_channels, out_channels=self.out_channels, block_channels=self.block_channels,
            layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
            norm_groups=self.norm_groups, mid_attention=self.mid_attention, scaling_factor=1.0,
            sample_size=self.sample_size)
