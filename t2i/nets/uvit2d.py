"""The U-ViT of aMUSEd (Patil et al. 2024, "aMUSEd: An Open MUSE Reproduction", sec. 3), diffusers'
`UVit2DModel`: the masked token model of Muse (Chang et al. 2023) over a VQ-GAN's token grid.

    tokens (B, h, w) ──embed (RMSNorm, 1x1 conv)──▶ (B, C, h, w)
      ──down block: [ConvNeXt block (FiLM by c) + two cross-attentions to the text] x R (+ 2x2 down)──▶
      ──tokens (B, hw, D): L transformer layers (self-attn, cross-attn, GEGLU FF, each after an
        adaptive RMS/LayerNorm modulated by c)──▶
      ──up block (2x2 up +) [ConvNeXt + cross-attentions] x R──▶ 1x1 conv, RMSNorm, 1x1 conv ──▶ logits (B, K, h, w)

c = MLP([pooled text embedding; sinusoidal micro-conditions (width, height, crop top, crop left,
aesthetic score)]), SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2) as aMUSEd uses it.
K = the codebook size: the mask token (id >= K) is an input only, never predicted.

Parameter names follow diffusers' `UVit2DModel` except the feed-forward (`ff.0.proj`, `ff.1` here
for `ff.net.0.proj`, `ff.net.2`), so `t2i.checkpoints.diffusers_amused` maps keys with one rule.
Every Linear, convolution and LayerNorm has a bias exactly when `use_bias` (aMUSEd: none), as in
diffusers; the shared blocks that always build one (GEGLU, TimestepEmbedding) lose it in
`_drop_biases`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.attention import Attention
from t2i.nets.dit import modulate
from t2i.nets.embeddings import SinusoidalEmbedding, TimestepEmbedding
from t2i.nets.spatial_attention import GEGLU

NUM_MICRO_CONDS = 5  # width, height, crop top, crop left, aesthetic score


@dataclass
class UVit2DConfig:
    """Shape of a U-ViT token model (diffusers' `UVit2DModel` config names in brackets).

    width [hidden_size], layers [num_hidden_layers], heads [num_attention_heads], mlp_dim
    [intermediate_size]: the transformer over the (possibly downsampled) token grid.
    use_bias: biases in every Linear / conv / LayerNorm. text_dim [encoder_hidden_size]: width
    of the text encoder's token states; pooled_dim [cond_embed_dim]: of its pooled embedding.
    micro_cond_dim [micro_cond_encode_dim]: sinusoidal features per micro-condition (5 of them:
    micro_cond_embed_dim = 5 * micro_cond_dim).
    vocab_size: embedding rows (codebook + mask token, rounded up); codebook_size: K, the logits.
    embed_dim [in_channels]: token embedding width; channels [block_out_channels]: the conv
    blocks' width; res_blocks [num_res_blocks]; block_heads [block_num_heads]: their attention.
    downsample / upsample: a 2x2 strided conv before / transposed conv after the transformer.
    eps [layer_norm_eps], affine [ln_elementwise_affine]: of the norms.
    sample_size: the token grid side it was trained at (aMUSEd-256: 16, -512: 32).
    """

    width: int = 1024
    layers: int = 22
    heads: int = 16
    mlp_dim: int = 2816
    use_bias: bool = False
    text_dim: int = 768
    pooled_dim: int = 768
    micro_cond_dim: int = 256
    vocab_size: int = 8256
    codebook_size: int = 8192
    embed_dim: int = 768
    channels: int = 768
    res_blocks: int = 3
    block_heads: int = 12
    downsample: bool = False
    upsample: bool = False
    eps: float = 1e-6
    affine: bool = True
    sample_size: int = 16

    @property
    def num_codes(self) -> int:
        """The codes it writes (the token families' name for the codebook size)."""
        return self.codebook_size


class RMSNorm(nn.Module):
    """x / rms(x) (* weight): Zhang & Sennrich 2019, eq. 4, over the last axis; rms in float32.

    The same arithmetic as T5's and diffusers' RMSNorm; `affine` False has no weight."""

    def __init__(self, dim: int, eps: float, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)."""
        variance = x.float().pow(2).mean(-1, keepdim=True)  # (..., 1)
        x = (x * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return x if self.weight is None else x * self.weight


def norm_channels(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A norm over the last axis applied to the channels of a map: (B, C, H, W) -> (B, C, H, W)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN (Woo et al. 2023, eq. 1-3): each channel scaled by its L2 norm over the
    map relative to the mean over channels, gamma * (x * N(x)) + beta + x. Starts as the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) channels last -> (B, H, W, C)."""
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class AdaNorm(nn.Module):
    """norm(x) * (1 + scale) + shift with (scale, shift) = linear(silu(c)) (diffusers'
    `AdaLayerNormContinuous`; note scale comes first in the projection)."""

    def __init__(self, dim: int, cond_dim: int, norm: nn.Module) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)
        self.norm = norm

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim); c: (B, cond_dim) -> (B, N, dim)."""
        scale, shift = self.linear(F.silu(c))[:, None].chunk(2, dim=-1)  # (B, 1, dim) each
        return modulate(self.norm(x), shift, scale)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt-V2 block (depthwise 3x3, RMSNorm, 4x MLP with GELU and GRN) with a residual, then
    FiLM by the conditioning: x * (1 + scale) + shift."""

    def __init__(self, cfg: UVit2DConfig, mult: int = 4) -> None:
        super().__init__()
        c = cfg.channels
        self.depthwise = nn.Conv2d(c, c, kernel_size=3, padding=1, groups=c)
        self.norm = RMSNorm(c, cfg.eps, cfg.affine)
        self.channelwise_linear_1 = nn.Linear(c, mult * c)
        self.channelwise_norm = GlobalResponseNorm(mult * c)
        self.channelwise_linear_2 = nn.Linear(mult * c, c)
        self.cond_embeds_mapper = nn.Linear(cfg.width, 2 * c)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); c: (B, width) -> (B, C, H, W)."""
        h = self.norm(self.depthwise(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        h = self.channelwise_norm(F.gelu(self.channelwise_linear_1(h)))  # (B, H, W, 4C)
        x = x + self.channelwise_linear_2(h).permute(0, 3, 1, 2)  # (B, C, H, W)
        scale, shift = self.cond_embeds_mapper(F.silu(c)).chunk(2, dim=1)  # (B, C) each
        return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class TextAttention(nn.Module):
    """Two pre-RMSNorm cross-attentions to the text, no feed-forward (diffusers'
    `SkipFFTransformerBlock`): the text states (B, T, width) are first mapped to the block's width
    by silu + Linear when the widths differ."""

    def __init__(self, cfg: UVit2DConfig) -> None:
        super().__init__()
        c, heads = cfg.channels, cfg.block_heads
        self.kv_mapper = nn.Linear(cfg.width, c) if cfg.width != c else None
        # eps 1e-6 and a weight whatever the config says: diffusers builds these two that way
        self.norm1 = RMSNorm(c, 1e-6)
        self.attn1 = Attention(c, heads, c // heads, context_dim=c, qkv_bias=True)
        self.norm2 = RMSNorm(c, 1e-6)
        self.attn2 = Attention(c, heads, c // heads, context_dim=c, qkv_bias=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C); context: (B, T, width) -> (B, N, C)."""
        if self.kv_mapper is not None:
            context = self.kv_mapper(F.silu(context))  # (B, T, C)
        x = x + self.attn1(self.norm1(x), context)
        return x + self.attn2(self.norm2(x), context)


class Resample(nn.Module):
    """RMSNorm, then a 2x2 stride-2 convolution (down: (B, C, H, W) -> (B, C, H / 2, W / 2), the
    input zero-padded by one on the right and bottom first, as diffusers does) or transposed
    convolution (up: -> (B, C, 2H, 2W))."""

    def __init__(self, cfg: UVit2DConfig, up: bool) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.channels, cfg.eps, cfg.affine)
        self.conv = (nn.ConvTranspose2d if up else nn.Conv2d)(cfg.channels, cfg.channels, kernel_size=2, stride=2)
        self.pad = (0, 0, 0, 0) if up else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(norm_channels(self.norm, x), self.pad))


class UVitBlock(nn.Module):
    """The convolutional stage before (down) or after (up) the transformer: optional resampling,
    then res_blocks pairs of a ConvNeXt block and a text cross-attention block."""

    def __init__(self, cfg: UVit2DConfig, downsample: bool, upsample: bool) -> None:
        super().__init__()
        self.downsample = Resample(cfg, up=False) if downsample else None
        self.res_blocks = nn.ModuleList(ConvNeXtBlock(cfg) for _ in range(cfg.res_blocks))
        self.attention_blocks = nn.ModuleList(TextAttention(cfg) for _ in range(cfg.res_blocks))
        self.upsample = Resample(cfg, up=True) if upsample else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); c: (B, width); context: (B, T, width) -> (B, C, H', W')."""
        if self.downsample is not None:
            x = self.downsample(x)
        for res_block, attention_block in zip(self.res_blocks, self.attention_blocks, strict=True):
            x = res_block(x, c)
            b, ch, h, w = x.shape
            tokens = attention_block(x.flatten(2).transpose(1, 2), context)  # (B, HW, C)
            x = tokens.transpose(1, 2).reshape(b, ch, h, w)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class TransformerLayer(nn.Module):
    """Self-attention, cross-attention to the text and a GEGLU feed-forward, each after an
    `AdaNorm` by the conditioning (RMSNorm, RMSNorm, LayerNorm), with residuals."""

    def __init__(self, cfg: UVit2DConfig) -> None:
        super().__init__()
        d, heads = cfg.width, cfg.heads
        self.norm1 = AdaNorm(d, d, RMSNorm(d, cfg.eps, cfg.affine))
        self.attn1 = Attention(d, heads, d // heads, qkv_bias=True)
        self.norm2 = AdaNorm(d, d, RMSNorm(d, cfg.eps, cfg.affine))
        self.attn2 = Attention(d, heads, d // heads, context_dim=d, qkv_bias=True)
        self.norm3 = AdaNorm(d, d, nn.LayerNorm(d, cfg.eps, elementwise_affine=cfg.affine))
        self.ff = nn.Sequential(GEGLU(d, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, d))

    def forward(self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, width); context: (B, T, width); c: (B, width) -> (B, N, width)."""
        x = x + self.attn1(self.norm1(x, c))
        x = x + self.attn2(self.norm2(x, c), context)
        return x + self.ff(self.norm3(x, c))


class TokenEmbed(nn.Module):
    """Token ids (B, h, w) -> embedding, RMSNorm, 1x1 conv to the block width: (B, C, h, w)."""

    def __init__(self, cfg: UVit2DConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.layer_norm = RMSNorm(cfg.embed_dim, cfg.eps, cfg.affine)
        self.conv = nn.Conv2d(cfg.embed_dim, cfg.channels, kernel_size=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layer_norm(self.embeddings(tokens)).permute(0, 3, 1, 2))


class LogitsHead(nn.Module):
    """(B, C, h, w) -> 1x1 conv to embed_dim, RMSNorm, 1x1 conv to the K codebook logits (diffusers'
    `ConvMlmLayer`)."""

    def __init__(self, cfg: UVit2DConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cfg.channels, cfg.embed_dim, kernel_size=1)
        self.layer_norm = RMSNorm(cfg.embed_dim, cfg.eps, cfg.affine)
        self.conv2 = nn.Conv2d(cfg.embed_dim, cfg.codebook_size, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(norm_channels(self.layer_norm, self.conv1(x)))  # (B, K, h, w)


def _drop_biases(module: nn.Module) -> None:
    """Remove the bias of every Linear, convolution and LayerNorm below `module` (use_bias False)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.LayerNorm)) and m.bias is not None:
            m.register_parameter("bias", None)


class UVit2DModel(nn.Module):
    """logits (B, K, h, w) of every token given the others: forward(tokens, context, pooled, micro_conds).

    tokens: (B, h, w) int64 codebook ids, mask_id where unknown (h, w even with downsample).
    context: (B, T, text_dim) text token states (aMUSEd: CLIP's penultimate layer).
    pooled: (B, pooled_dim) the text embedding (aMUSEd: CLIP's projected text_embeds).
    micro_conds: (B, 5) width, height, crop top, crop left, aesthetic score (pixels / score).
    """

    def __init__(self, cfg: UVit2DConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.encoder_proj = nn.Linear(cfg.text_dim, d)
        self.encoder_proj_layer_norm = RMSNorm(d, cfg.eps, cfg.affine)
        self.embed = TokenEmbed(cfg)
        self.micro_cond = SinusoidalEmbedding(cfg.micro_cond_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.cond_embed = TimestepEmbedding(cfg.pooled_dim + NUM_MICRO_CONDS * cfg.micro_cond_dim, d)
        self.down_block = UVitBlock(cfg, cfg.downsample, False)
        self.project_to_hidden_norm = RMSNorm(cfg.channels, cfg.eps, cfg.affine)
        self.project_to_hidden = nn.Linear(cfg.channels, d)
        self.transformer_layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.layers))
        self.project_from_hidden_norm = RMSNorm(d, cfg.eps, cfg.affine)
        self.project_from_hidden = nn.Linear(d, cfg.channels)
        self.up_block = UVitBlock(cfg, False, cfg.upsample)
        self.mlm_layer = LogitsHead(cfg)
        if not cfg.use_bias:
            _drop_biases(self)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                micro_conds: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        dtype = self.embed.embeddings.weight.dtype  # (an Embedding: int8 precision leaves it as it is)
        context = self.encoder_proj_layer_norm(self.encoder_proj(context.to(dtype)))  # (B, T, D)
        micro = self.micro_cond(micro_conds.flatten()).reshape(b, -1)  # (B, 5 * E) float32
        c = self.cond_embed(torch.cat([pooled.float(), micro], dim=1).to(dtype))  # (B, D)
        x = self.down_block(self.embed(tokens), c, context)  # (B, C, h', w')
        _, ch, h, w = x.shape
        x = self.project_to_hidden(self.project_to_hidden_norm(x.permute(0, 2, 3, 1).reshape(b, h * w, ch)))
        for layer in self.transformer_layers:
            x = layer(x, context, c)  # (B, h' w', D)
        x = self.project_from_hidden(self.project_from_hidden_norm(x))  # (B, h' w', C)
        x = self.up_block(x.reshape(b, h, w, ch).permute(0, 3, 1, 2), c, context)  # (B, C, h, w)
        return self.mlm_layer(x)  # (B, K, h, w)


UVIT2D_PRESETS: dict[str, UVit2DConfig] = {
    # diffusers' UVit2DModel defaults with aMUSEd-256's grid: 16x16 tokens of an 8192-code f=16 VQ-GAN
    "amused_256": UVit2DConfig(),
    # aMUSEd-512: 32x32 tokens, through the 2x2 down/up stage (diffusers' scripts/convert_amused.py: the
    # 512 run "with downsample", sample_size 32)
    "amused_512": UVit2DConfig(downsample=True, upsample=True, sample_size=32),
    # test-sized: 2 layers of width 32, a 2x2 down/up stage, 32 codes + the mask token
    "tiny": UVit2DConfig(width=32, layers=2, heads=2, mlp_dim=48, text_dim=32, pooled_dim=32, micro_cond_dim=8,
                         vocab_size=40, codebook_size=32, embed_dim=16, channels=24, res_blocks=1, block_heads=2,
                         downsample=True, upsample=True, sample_size=4),
}
