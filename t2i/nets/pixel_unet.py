"""The pixel-space U-Net of DDPM (Ho et al. 2020, Appendix B), optionally text-conditional.

DDPM's network is the SD U-Net's skeleton without text: ResBlocks with the timestep embedding
added, single-head-per-8-channels self-attention (GroupNorm, q/k/v, residual) at the lower
resolutions and in the middle. diffusers calls it `UNet2DModel` (DownBlock2D / AttnDownBlock2D,
UNetMidBlock2D); with `context_dim` set, the attention levels are instead the LDM spatial
transformers (self- plus cross-attention to text tokens), the text-conditional pixel model the
shapes world needs (GLIDE and Imagen condition pixel U-Nets on text the same way).

`PixelUNet` is `t2i.nets.unet.UNet` built from the same level blocks; only the attention modules
differ, so every U-Net option (skip resizing, DeepCache, stop polling on its ModuleLists) holds
here too. Parameter names equal diffusers' `UNet2DModel` for the self-attention layout, so a
diffusers `unet/` folder loads after a config translation (`t2i.checkpoints.diffusers_ddpm`).

Read top to bottom: config, model, presets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2i.nets.levels import MidBlock
from t2i.nets.resnet import ResBlock
from t2i.nets.spatial_attention import SpatialSelfAttention
from t2i.nets.unet import UNet, UNetConfig, UNetEncoder


@dataclass
class PixelUNetConfig:
    """Shape of a pixel U-Net. Per-level tuples are indexed from the highest resolution down.

    Attributes:
        in_channels, out_channels: image channels (3; out 6 for a learned-variance network).
        block_channels: feature width of each level.
        layers_per_block: ResBlocks per level on the down path (the up path has one more).
        attention: whether a level has attention after each ResBlock.
        num_heads: attention heads per level (diffusers' UNet2DModel: channels // attention_head_dim).
        transformer_depth: TransformerBlocks per spatial transformer (text-conditional only).
        context_dim: None for DDPM's self-attention (unconditional); else the width of the text
            tokens the levels' spatial transformers cross-attend to (384 for MiniLM).
        mid_attention: whether the middle block has attention between its two ResBlocks.
        norm_groups, norm_eps: GroupNorm settings of ResBlocks, attention and output norm.
        flip_sin_to_cos, freq_shift: sinusoidal timestep embedding layout.
        dropout: ResBlock dropout (DDPM used 0.1 on CIFAR-10).
        sample_size: image side the model was trained at.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: tuple[int, ...] = (1, 1, 1)
    attention: tuple[bool, ...] = (False, True, True)
    num_heads: tuple[int, ...] = (4, 8, 8)
    transformer_depth: tuple[int, ...] = (1, 1, 1)
    context_dim: int | None = None
    mid_attention: bool = True
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dropout: float = 0.0
    sample_size: int = 32

    def __post_init__(self) -> None:
        self.unet_config()  # one entry per level, checked once (JSON lists become tuples there)
        for name in ("block_channels", *_PER_LEVEL):
            setattr(self, name, tuple(getattr(self, name)))

    @property
    def text_conditional(self) -> bool:
        return self.context_dim is not None

    def unet_config(self) -> UNetConfig:
        """The SD U-Net layout with the same skeleton: its attention levels are spatial transformers
        when text-conditional, and absent (filled with self-attention by PixelUNet) otherwise."""
        n = len(self.block_channels)
        cross = self.text_conditional
        return UNetConfig(
            in_channels=self.in_channels, out_channels=self.out_channels, block_channels=self.block_channels,
            layers_per_block=self.layers_per_block,
            attention=tuple(self.attention) if cross else (False,) * n,
            num_heads=self.num_heads, transformer_depth=self.transformer_depth,
            context_dim=self.context_dim or 1, linear_projection=True, only_cross_attention=(False,) * n,
            mid_block=True, mid_attention=self.mid_attention and cross, norm_groups=self.norm_groups,
            norm_eps=self.norm_eps, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift,
            dropout=self.dropout, sample_size=self.sample_size)


_PER_LEVEL = ("layers_per_block", "attention", "num_heads", "transformer_depth")


def self_attentions(cfg: PixelUNetConfig, level: int, count: int) -> nn.ModuleList:
    """`count` of DDPM's self-attention blocks at a level's width."""
    return nn.ModuleList(SpatialSelfAttention(cfg.block_channels[level], cfg.num_heads[level], cfg.norm_groups,
                                              cfg.norm_eps) for _ in range(count))


def add_self_attention(encoder: UNetEncoder, cfg: PixelUNetConfig) -> None:
    """DDPM's attention in an unconditional U-Net's down levels: self-attention blocks where the SD layout
    would put transformers. Shared by `PixelUNet` and the noise-aware classifier (`t2i.nets.classifier`)."""
    for level, block in enumerate(encoder.down_blocks):
        if cfg.attention[level]:
            block.attentions = self_attentions(cfg, level, len(block.resnets))


def ddpm_mid_block(cfg: PixelUNetConfig) -> MidBlock:
    """diffusers' UNetMidBlock2D: two ResBlocks, with or without self-attention between them."""
    c, temb = cfg.block_channels[-1], 4 * cfg.block_channels[0]
    resnets = [ResBlock(c, c, temb, cfg.norm_groups, cfg.norm_eps, cfg.dropout) for _ in range(2)]
    return MidBlock(resnets, self_attentions(cfg, len(cfg.block_channels) - 1, 1) if cfg.mid_attention else None)


class PixelUNet(UNet):
    """eps(x_t, t[, text]) on images: forward(x (B, C, H, W), t (B,), context (B, T, D) or None)
    -> (B, out_channels, H, W). Unconditional networks take no context."""

    def __init__(self, cfg: PixelUNetConfig) -> None:
        super().__init__(cfg.unet_config())
        self.pixel_cfg = cfg
        if cfg.text_conditional:
            return
        add_self_attention(self, cfg)
        n = len(cfg.block_channels)
        for i, block in enumerate(self.up_blocks):
            if cfg.attention[n - 1 - i]:
                block.attentions = self_attentions(cfg, n - 1 - i, len(block.resnets))
        self.mid_block = ddpm_mid_block(cfg)  # last, as before: the same seed gives the same weights

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,  # type: ignore[override]
                **kwargs) -> torch.Tensor:
        """x: (B, C, H, W) VP images; t: (B,) timesteps; context: (B, T, context_dim) text tokens for a
        text-conditional network, None otherwise. Returns (B, out_channels, H, W)."""
        if self.pixel_cfg.text_conditional and context is None:
            raise ValueError("this pixel U-Net is text-conditional: pass context (B, T, context_dim)")
        return super().forward(x, t, context if self.pixel_cfg.text_conditional else None, **kwargs)


PIXEL_UNET_PRESETS: dict[str, PixelUNetConfig] = {
    # 32x32 shapes world, text-conditional on MiniLM: 32 -> 16 -> 8, cross-attention at 16 and 8.
    "shapes_32": PixelUNetConfig(block_channels=(32, 64, 128), layers_per_block=(1, 1, 1),
                                 attention=(False, True, True), num_heads=(1, 2, 4), context_dim=384,
                                 norm_groups=16, sample_size=32),
    # What one CPU core trains in minutes (1.6 M parameters, ~1.5 s per batch of 16 on a shared core):
    # 32 -> 16 -> 8, cross-attention at 8x8 only.
    "shapes_32_s": PixelUNetConfig(block_channels=(32, 64, 64), layers_per_block=(1, 1, 1),
                                   attention=(False, False, True), num_heads=(1, 2, 2), context_dim=384,
                                   norm_groups=16, sample_size=32),
    # A few-second test network (text-conditional), 16x16 images.
    "tiny": PixelUNetConfig(block_channels=(16, 32), layers_per_block=(1, 1), attention=(False, True),
                            num_heads=(2, 2), transformer_depth=(1, 1), context_dim=384, norm_groups=8,
                            sample_size=16),
    # The same, unconditional (DDPM's self-attention).
    "tiny_uncond": PixelUNetConfig(block_channels=(16, 32), layers_per_block=(1, 1), attention=(False, True),
                                   num_heads=(2, 2), transformer_depth=(1, 1), norm_groups=8, sample_size=16),
}
