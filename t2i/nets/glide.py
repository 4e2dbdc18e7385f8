"""GLIDE's text-conditional pixel U-Net (Nichol et al. 2021, "Text-conditional diffusion models"): a text transformer
trained from scratch with the diffusion model, read by the ADM U-Net in two places.

    caption ids (B, L) --embedding + positions (padding: a learned embedding)--> transformer --> final LayerNorm
        --> states (B, L, W)
    class embedding  = transformer_proj(states[:, -1])    (B, temb)   added to the timestep embedding
    context          = states                             (B, L, W)   projected to extra keys and values
                                                                      in every attention layer

The U-Net is unCLIP's decoder (`t2i.nets.unclip_unet.UnCLIPUNet`: unCLIP built its decoder on GLIDE's): its
`class_emb` input takes the final token embedding and its added-KV attention (one softmax over [text; pixels], the
text keys/values from a per-layer projection, GLIDE's `encoder_kv`) takes the token sequence; GLIDE attends to the
padding tokens too (they carry the learned padding embedding), so no context mask is passed. The transformer is
non-causal without a padding mask, as GLIDE's (`xf_ar = 0`, `xf_padding`): padded positions are replaced by the
padding embedding before it, and the last position, a padding token unless the caption fills the window, is the
summary that reaches the time embedding. Its blocks are t2i's pre-norm blocks (`t2i.nets.transformer`).

The upsampler (GLIDE's second stage) is the same network with 6 input channels: the noisy image concatenated with
the low-resolution one upsampled bilinearly (`low_res`, given at the low resolution).

Read top to bottom: configs, text transformer, model, presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.transformer import PreNormBlock
from t2i.nets.unclip_unet import UnCLIPUNet, UnCLIPUNetConfig

IMAGE_CHANNELS = 3


@dataclass
class GlideTextConfig:
    """Shape of GLIDE's caption transformer (GLIDE: 24 blocks of width 2048 over 128 tokens; here small).

    vocab: token ids (the tokenizer's specials + words); length: tokens per caption (GLIDE's text_ctx);
    pad_id: the padding token, replaced by the learned padding embedding."""

    vocab: int = 64
    length: int = 20
    width: int = 64
    layers: int = 2
    heads: int = 4
    pad_id: int = 0


@dataclass
class GlideNetConfig:
    """A GLIDE network: its caption transformer and its U-Net (`UnCLIPUNetConfig`, whose context_dim is the
    transformer's width and whose class embedding is the projected final token)."""

    text: GlideTextConfig = field(default_factory=GlideTextConfig)
    unet: UnCLIPUNetConfig = field(default_factory=UnCLIPUNetConfig)

    def __post_init__(self) -> None:
        if self.unet.context_dim != self.text.width:
            raise ValueError(f"the U-Net's context_dim ({self.unet.context_dim}) must be the text width "
                             f"({self.text.width})")
        if not self.unet.class_embedding:
            raise ValueError("GLIDE adds the final token embedding to the time embedding: unet.class_embedding=True")
        if self.unet.in_channels not in (IMAGE_CHANNELS, 2 * IMAGE_CHANNELS):
            raise ValueError(f"in_channels must be 3 (base) or 6 (upsampler), got {self.unet.in_channels}")

    @property
    def upsampler(self) -> bool:
        return self.unet.in_channels == 2 * IMAGE_CHANNELS

    @property
    def learned_variance(self) -> bool:
        return self.unet.out_channels == 2 * IMAGE_CHANNELS

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.unet.block_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GlideNetConfig:
        return cls(text=GlideTextConfig(**d["text"]), unet=UnCLIPUNetConfig(**d["unet"]))


# ---------------------------------------------------------------------------------------
# The caption transformer
# ---------------------------------------------------------------------------------------


class GlideTextTransformer(nn.Module):
    """Caption ids (B, L) -> states (B, L, width): token embedding + learned positions, padded positions replaced
    by the learned padding embedding (GLIDE's `xf_padding`), non-causal pre-norm blocks, a final LayerNorm."""

    def __init__(self, cfg: GlideTextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.length, cfg.width))
        self.padding_embedding = nn.Parameter(torch.empty(cfg.length, cfg.width))
        self.blocks = nn.ModuleList(PreNormBlock(cfg.width, cfg.heads, 4 * cfg.width, "gelu", 1e-5)
                                    for _ in range(cfg.layers))
        self.final_ln = nn.LayerNorm(cfg.width)
        # N(0, 0.01): small, as the token families' embeddings (GLIDE's released code leaves them to its checkpoint)
        for p in (self.token_embedding.weight, self.positional_embedding, self.padding_embedding):
            nn.init.normal_(p, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) int64 ids, L = cfg.length -> (B, L, width)."""
        if tokens.shape[1] != self.cfg.length:
            raise ValueError(f"expected {self.cfg.length} caption tokens, got {tokens.shape[1]}")
        x = self.token_embedding(tokens) + self.positional_embedding  # (B, L, W)
        pad = (tokens == self.cfg.pad_id)[..., None]  # (B, L, 1)
        x = torch.where(pad, self.padding_embedding.to(x.dtype), x)
        for block in self.blocks:
            x = block(x)
        return self.final_ln(x)


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


class GlideNet(nn.Module):
    """forward(x (B, C_in, H, W) VP images, t (B,), tokens (B, L), low_res (B, 3, h, w) for an upsampler)
    -> (B, out_channels, H, W): eps (and the variance values with a learned variance)."""

    def __init__(self, cfg: GlideNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = GlideTextTransformer(cfg.text)
        self.transformer_proj = nn.Linear(cfg.text.width, cfg.unet.time_embed_dim)
        self.unet = UnCLIPUNet(cfg.unet)

    def encode(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Caption ids (B, L) -> the U-Net's text inputs: context (B, L, W) and class_emb (B, temb)."""
        states = self.transformer(tokens)  # (B, L, W)
        return {"context": states, "class_emb": self.transformer_proj(states[:, -1])}

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
                low_res: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.upsampler:
            if low_res is None:
                raise ValueError("an upsampler needs low_res, the image to upsample")
            up = F.interpolate(low_res.to(x.dtype), x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, up], dim=1)  # (B, 6, H, W), GLIDE's SuperResText2ImUNet
        return self.unet(x, t, **self.encode(tokens))


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------


def _net(text: GlideTextConfig, **unet: Any) -> GlideNetConfig:
    return GlideNetConfig(text=text, unet=UnCLIPUNetConfig(context_dim=text.width, class_embedding=True, **unet))


_SHAPES_TEXT = GlideTextConfig(length=20, width=64, layers=2, heads=4)
_TINY_TEXT = GlideTextConfig(length=12, width=16, layers=1, heads=2)

GLIDE_PRESETS: dict[str, GlideNetConfig] = {
    # The shapes world's base model at 32x32 (GLIDE's 64x64 base, scaled to our world): 32 -> 16 -> 8, text
    # attention at 16x16 and 8x8 (GLIDE attends at every resolution below the full one), learned variance.
    "shapes_base_32": _net(_SHAPES_TEXT, block_channels=(32, 64, 64), layers_per_block=1,
                           attention=(False, True, True), head_dim=32, norm_groups=16, sample_size=32),
    # Its upsampler 32 -> 64 (GLIDE's 64 -> 256 stage), text attention at 16x16 and 8x8.
    "shapes_up_64": _net(_SHAPES_TEXT, in_channels=6, block_channels=(32, 64, 64, 64), layers_per_block=1,
                         attention=(False, False, True, True), head_dim=32, norm_groups=16, sample_size=64),
    # Few-second test networks: a 16x16 base and a 16 -> 32 upsampler.
    "tiny_base": _net(_TINY_TEXT, block_channels=(16, 32), layers_per_block=1, attention=(False, True), head_dim=8,
                      norm_groups=8, sample_size=16),
    "tiny_up": _net(_TINY_TEXT, in_channels=6, block_channels=(16, 32), layers_per_block=1, attention=(False, True),
                    head_dim=8, norm_groups=8, sample_size=32),
}


def preset(name: str, vocab: int, length: int | None = None, **unet: Any) -> GlideNetConfig:
    """A copy of GLIDE_PRESETS[name] over a tokenizer of `vocab` ids (and `length` tokens; unet fields replaced)."""
    if name not in GLIDE_PRESETS:
        raise ValueError(f"unknown GLIDE preset {name!r}; choose from {sorted(GLIDE_PRESETS)}")
    base = GLIDE_PRESETS[name]
    text = replace(base.text, vocab=vocab, length=length or base.text.length)
    return GlideNetConfig(text=text, unet=replace(base.unet, **unet))
