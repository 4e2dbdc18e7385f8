"""unCLIP's decoder and super-resolution U-Nets (Ramesh et al. 2022 sec. 2.1, on GLIDE's ADM U-Net), and the
projection of the CLIP image embedding into the decoder's conditioning.

The decoder is GLIDE's pixel U-Net with the CLIP image embedding added in two places (unCLIP sec. 2.1):
projected and *added to the timestep embedding*, and projected to four *extra context tokens*
concatenated to the (projected) text tokens. Its attention is GLIDE's: the pixels attend to the context
tokens and to themselves in one softmax (keys = [context K; pixel K]: diffusers' "added KV" attention).
As in ADM, resolution changes are ResBlocks that average-pool (down) or nearest-upsample (up) inside,
the time embedding enters as a scale and shift after the second GroupNorm (FiLM), and the decoder learns
its variance (out_channels = 2 x 3). The super-resolution U-Nets are the same network without text:
the noisy high-resolution image concatenated with the upsampled low-resolution one (6 channels in).

Parameter names equal diffusers' `UNet2DConditionModel` / `UNet2DModel` (Karlo's `decoder`,
`super_res_first`, `super_res_last`) and `UnCLIPTextProjModel`, so their weights load as they are
(`t2i.checkpoints.diffusers_unclip` translates the configs). PyTorch's default init, as the reference.
The ResBlocks and the attention are DeepFloyd IF's (`t2i.nets.if_unet`, the same GLIDE/ADM lineage); this
module adds what Karlo has and IF lacks: a context mask, the image embedding added to the time embedding,
a text-free variant for super-resolution.
Read top to bottom: configs, blocks, levels, model, text projection, presets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.embeddings import SinusoidalEmbedding, TimestepEmbedding
from t2i.nets.if_unet import AddedKVAttention, IFResBlock
from t2i.nets.resnet import ResBlock
from t2i.nets.spatial_attention import SpatialSelfAttention

MASKED = -10000.0  # additive bias of a hidden context token (finite, as the reference)


@dataclass
class UnCLIPUNetConfig:
    """Shape of a Karlo-style U-Net. Per-level tuples are indexed from the highest resolution down.

    Attributes:
        in_channels, out_channels: 3 and 6 (eps + variance values) for the decoder; 6 and 3 for super-resolution.
        block_channels: width of each level; layers_per_block: ResBlocks per level (the up path has one more).
        attention: whether a level has added-KV attention after each ResBlock (needs context_dim).
        head_dim: attention head width (heads = channels // head_dim).
        context_dim: width of the context tokens (None: no text, super-resolution).
        mid_attention: the middle block's attention (added-KV with a context, else self-attention).
        scale_shift: FiLM time conditioning in the ResBlocks (Karlo: True).
        class_embedding: an extra (B, time_embed_dim) vector added to the time embedding (the decoder's
            projected CLIP image + text embeddings; diffusers' class_embed_type "identity").
        norm_groups, norm_eps: GroupNorm settings; flip_sin_to_cos, freq_shift: timestep sinusoid layout.
        sample_size: the image side the network works at.
    """

    in_channels: int = 3
    out_channels: int = 6
    block_channels: tuple[int, ...] = (320, 640, 960, 1280)
    layers_per_block: int = 3
    attention: tuple[bool, ...] = (False, False, False, False)
    head_dim: int = 64
    context_dim: int | None = None
    mid_attention: bool = True
    scale_shift: bool = True
    class_embedding: bool = True
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dropout: float = 0.0
    sample_size: int = 64

    def __post_init__(self) -> None:
        self.block_channels, self.attention = tuple(self.block_channels), tuple(self.attention)
        if len(self.attention) != len(self.block_channels):
            raise ValueError(f"attention needs one entry per level ({len(self.block_channels)}), got {self.attention}")
        if any(self.attention) and self.context_dim is None:
            raise ValueError("added-KV attention levels need context_dim")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_channels[0]

    # What IF's ResBlock and attention read beside the norms (`t2i.nets.if_unet`): Karlo's are SiLU throughout,
    # the time embedding activated before its projection, no GroupNorm on the context.
    act = "silu"
    skip_time_act = False
    cross_attention_norm = None


@dataclass
class TextProjConfig:
    """unCLIP's conditioning projection (diffusers' UnCLIPTextProjModel): CLIP embeddings of width embed_dim
    -> time_embed_dim (added to the decoder's time embedding) and extra_tokens context tokens of context_dim."""

    extra_tokens: int = 4
    embed_dim: int = 768
    time_embed_dim: int = 1280
    context_dim: int = 1536


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------


class MaskedAddedKVAttention(AddedKVAttention):
    """GLIDE's attention over a feature map (IF's `AddedKVAttention`: the GroupNorm'd pixels query the keys and
    values of the context tokens and of the pixels in one softmax; residual), with padded context tokens hidden."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, cfg: UnCLIPUNetConfig) -> None:
        super().__init__(channels, head_dim, context_dim, cfg, only_cross_attention=False)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None  # type: ignore[override]
                ) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, M, context_dim); mask: (B, M) bool, True on tokens to attend to.
        Returns (B, C, H, W)."""
        b, c, hh, ww = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q = self.to_q(tokens)  # (B, HW, inner)
        k = torch.cat([self.add_k_proj(context), self.to_k(tokens)], dim=1)  # (B, M + HW, inner)
        v = torch.cat([self.add_v_proj(context), self.to_v(tokens)], dim=1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh)
        bias = None
        if mask is not None:  # hidden context tokens get MASKED; every pixel key is seen
            bias = F.pad((~mask).to(q.dtype) * MASKED, (0, hh * ww))[:, None, None, :]  # (B, 1, 1, M + HW)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, HW, Dh)
        out = self.to_out(out.transpose(1, 2).flatten(2))  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, hh, ww)


# ---------------------------------------------------------------------------------------
# Levels
# ---------------------------------------------------------------------------------------


class Level(nn.Module):
    """One resolution level: [ResBlock (-> attention)] * n, then an optional resampling ResBlock
    (`downsamplers.0` / `upsamplers.0`). The up levels concatenate one skip before each ResBlock."""

    def __init__(self, resnets: list[ResBlock], attentions: list[nn.Module] | None, resample: ResBlock | None,
                 up: bool) -> None:
        super().__init__()
        self.up = up
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None
        samplers = nn.ModuleList([resample]) if resample is not None else None
        self.upsamplers = samplers if up else None
        self.downsamplers = None if up else samplers

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None,
                skips: list[torch.Tensor]) -> torch.Tensor:
        """h: (B, C_in, H, W). Down levels append their outputs to `skips`; up levels pop from it."""
        for i, resnet in enumerate(self.resnets):
            if self.up:
                h = torch.cat([h, skips.pop()], dim=1)
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[i](h, context, mask)
            if not self.up:
                skips.append(h)
        samplers = self.upsamplers if self.up else self.downsamplers
        if samplers is not None:
            h = samplers[0](h, emb)
            if not self.up:
                skips.append(h)
        return h


class MidLevel(nn.Module):
    """ResBlock, attention (added-KV with a context, self-attention without), ResBlock."""

    def __init__(self, cfg: UnCLIPUNetConfig, temb: int) -> None:
        super().__init__()
        c = cfg.block_channels[-1]
        self.resnets = nn.ModuleList(_resblock(cfg, c, c, temb) for _ in range(2))
        self.attentions: nn.ModuleList | None = None
        if cfg.mid_attention and cfg.context_dim is not None:
            self.attentions = nn.ModuleList([MaskedAddedKVAttention(c, cfg.head_dim, cfg.context_dim, cfg)])
        elif cfg.mid_attention:
            if cfg.scale_shift:  # diffusers then drops the attention's GroupNorm; no Karlo model has this
                raise ValueError("a text-free mid attention with scale_shift ResBlocks is not supported")
            self.attentions = nn.ModuleList([SpatialSelfAttention(c, c // cfg.head_dim, cfg.norm_groups,
                                                                  cfg.norm_eps)])

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        h = self.resnets[0](h, emb)
        if self.attentions is not None:
            attn = self.attentions[0]
            h = attn(h, context, mask) if isinstance(attn, MaskedAddedKVAttention) else attn(h)
        return self.resnets[1](h, emb)


def _resblock(cfg: UnCLIPUNetConfig, c_in: int, c_out: int, temb: int, resample: str | None = None) -> ResBlock:
    """IF's ResBlock (ADM's: FiLM time conditioning, resampling inside the residual) with Karlo's SiLU."""
    return IFResBlock(c_in, c_out, temb, cfg, 1.0, resample)  # type: ignore[arg-type]


def _attentions(cfg: UnCLIPUNetConfig, level: int, count: int) -> list[nn.Module] | None:
    if not cfg.attention[level]:
        return None
    assert cfg.context_dim is not None
    c = cfg.block_channels[level]
    return [MaskedAddedKVAttention(c, cfg.head_dim, cfg.context_dim, cfg) for _ in range(count)]


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


class UnCLIPUNet(nn.Module):
    """forward(x (B, C_in, H, W), t (B,), context (B, M, context_dim) | None, context_mask (B, M) bool | None,
    class_emb (B, time_embed_dim) | None) -> (B, C_out, H, W). H, W multiples of 2^(levels - 1)."""

    def __init__(self, cfg: UnCLIPUNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch, n, temb = cfg.block_channels, len(cfg.block_channels), cfg.time_embed_dim
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = SinusoidalEmbedding(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList()
        c_in = ch[0]
        for level, c in enumerate(ch):
            resnets = [_resblock(cfg, c_in if j == 0 else c, c, temb) for j in range(cfg.layers_per_block)]
            resample = _resblock(cfg, c, c, temb, "down") if level < n - 1 else None
            self.down_blocks.append(Level(resnets, _attentions(cfg, level, len(resnets)), resample, up=False))
            c_in = c
        self.mid_block = MidLevel(cfg, temb)
        self.up_blocks = nn.ModuleList()
        c_prev = ch[-1]
        for i in range(n):
            level = n - 1 - i
            c, c_skip_last = ch[level], ch[max(level - 1, 0)]
            k = cfg.layers_per_block + 1
            resnets = [_resblock(cfg, (c_prev if j == 0 else c) + (c_skip_last if j == k - 1 else c), c, temb)
                       for j in range(k)]
            resample = _resblock(cfg, c, c, temb, "up") if level > 0 else None
            self.up_blocks.append(Level(resnets, _attentions(cfg, level, k), resample, up=True))
            c_prev = c
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, class_emb: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        dtype = self.conv_in.weight.dtype
        emb = self.time_embedding(self.time_proj(t).to(dtype))  # (B, temb)
        if self.cfg.class_embedding:
            if class_emb is None:
                raise ValueError("this U-Net adds a class embedding to its time embedding: pass class_emb")
            emb = emb + class_emb.to(dtype)
        if context is not None:
            context = context.to(dtype)
        h = self.conv_in(x.to(dtype))  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, emb, context, context_mask, skips)
        h = self.mid_block(h, emb, context, context_mask)
        for block in self.up_blocks:
            h = block(h, emb, context, context_mask, skips)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C_out, H, W)


# ---------------------------------------------------------------------------------------
# The CLIP-embedding projection of the decoder
# ---------------------------------------------------------------------------------------


class TextProj(nn.Module):
    """The decoder's conditioning from CLIP (unCLIP sec. 2.1; diffusers' UnCLIPTextProjModel names):

        class_emb = W_t text_embed + W_i image_embed                      (added to the time embedding)
        context   = [W_x image_embed as `extra_tokens` tokens; LayerNorm(W_s text_states)]

    Classifier-free guidance replaces the image embedding by a learned null embedding
    (`learned_classifier_free_guidance_embeddings`) and the text by the empty caption's.
    """

    def __init__(self, cfg: TextProjConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(e))
        self.embedding_proj = nn.Linear(e, cfg.time_embed_dim)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(e, cfg.time_embed_dim)
        self.clip_extra_context_tokens_proj = nn.Linear(e, cfg.extra_tokens * cfg.context_dim)
        self.encoder_hidden_states_proj = nn.Linear(e, cfg.context_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cfg.context_dim)

    def null_image(self, batch: int) -> torch.Tensor:
        """(batch, E) the learned unconditional image embedding."""
        return self.learned_classifier_free_guidance_embeddings[None].expand(batch, -1)

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_states: torch.Tensor,
                text_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """image_embeds, text_embeds: (B, E); text_states: (B, T, E); text_mask: (B, T) bool.
        Returns the U-Net's keyword arguments: class_emb (B, time_embed_dim), context (B, K + T, context_dim),
        context_mask (B, K + T) bool (the K image tokens always seen)."""
        b = image_embeds.shape[0]
        class_emb = self.embedding_proj(text_embeds) + self.clip_image_embeddings_project_to_time_embeddings(
            image_embeds)  # (B, temb)
        # the projection's output is read channel-major: (B, D * K) -> (B, D, K) -> (B, K, D), as the reference
        extra = self.clip_extra_context_tokens_proj(image_embeds).reshape(b, -1, self.cfg.extra_tokens).permute(0, 2, 1)
        states = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_states))  # (B, T, D)
        mask = F.pad(text_mask.bool(), (self.cfg.extra_tokens, 0), value=True)  # (B, K + T)
        return {"class_emb": class_emb, "context": torch.cat([extra, states], dim=1), "context_mask": mask}


UNCLIP_UNET_PRESETS: dict[str, UnCLIPUNetConfig] = {
    # shapes world: a 32x32 decoder on our shapes CLIP (64-wide embeddings), learned variance
    # kakaobrain/karlo-v1-alpha's 64x64 decoder (its config.json)
    "karlo_decoder": UnCLIPUNetConfig(attention=(False, True, True, True), context_dim=1536),
    "shapes_decoder_32": UnCLIPUNetConfig(block_channels=(32, 64, 96), layers_per_block=1,
                                          attention=(False, True, True), head_dim=32, context_dim=64,
                                          norm_groups=16, sample_size=32),
    # what one shared CPU core trains in hours: attention at 8x8 only
    "shapes_decoder_32_s": UnCLIPUNetConfig(block_channels=(32, 64, 64), layers_per_block=1,
                                            attention=(False, False, True), head_dim=32, context_dim=64,
                                            norm_groups=16, sample_size=32),
    "tiny_decoder": UnCLIPUNetConfig(block_channels=(16, 32), layers_per_block=1, attention=(False, True),
                                     head_dim=8, context_dim=16, norm_groups=8, sample_size=8),
    "tiny_super_res": UnCLIPUNetConfig(in_channels=6, out_channels=3, block_channels=(16, 32), layers_per_block=1,
                                       attention=(False, False), head_dim=8, context_dim=None, mid_attention=False,
                                       class_embedding=False, norm_groups=8, sample_size=16),
}
