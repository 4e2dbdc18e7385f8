"""A Vision Transformer image tower (Dosovitskiy et al. 2021) in CLIP's form (Radford et al. 2021).

Patches -> linear embedding, a learned class token in front, learned positions, a LayerNorm
before the transformer (CLIP's `ln_pre`), pre-norm blocks with full (non-causal) attention,
and a LayerNorm on the class token's final state. An optional bias-free projection maps it
into the joint image-text space. Blocks are t2i.nets.transformer's pre-norm blocks; the
transformers names (`vision_model.pre_layrnorm`, ...) are mapped in `t2i.eval.clip_score`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2i.nets.transformer import PreNormBlock


@dataclass
class ViTConfig:
    """Shape of a ViT image tower. Defaults: OpenAI CLIP ViT-B/32."""

    image_size: int = 224
    patch_size: int = 32
    channels: int = 3
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512  # width of the image embedding; None: no projection


@dataclass
class ViTOutput:
    """last_hidden_state: (B, 1 + N, D), no final norm. pooled: (B, D) the normed class token.
    image_embeds: (B, P) = projection(pooled), when the config has a projection."""

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    image_embeds: torch.Tensor | None


class VisionTransformer(nn.Module):
    """CLIP's image tower: pixels (B, C, H, W) at cfg.image_size -> ViTOutput."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(cfg.width) * cfg.width**-0.5)
        self.position_embedding = nn.Embedding(n_patches + 1, cfg.width)
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(
            PreNormBlock(cfg.width, cfg.heads, cfg.mlp_dim, cfg.activation, cfg.layer_norm_eps)
            for _ in range(cfg.layers)
        )
        self.post_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None

    def forward(self, pixels: torch.Tensor) -> ViTOutput:
        """pixels: (B, C, S, S) normalized as the checkpoint expects (CLIP: mean/std per channel)."""
        size = self.cfg.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"expected {size}x{size} pixels, got {tuple(pixels.shape[-2:])}")
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1 + N, D)
        x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x)
        pooled = self.post_norm(x[:, 0])  # (B, D)
        embeds = self.projection(pooled) if self.projection is not None else None  # (B, P)
        return ViTOutput(x, pooled, embeds)
