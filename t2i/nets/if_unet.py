"""The Imagen / DeepFloyd IF pixel U-Net (Saharia et al. 2022, appendix F; DeepFloyd IF 2023).

Imagen's text-conditional pixel U-Nets differ from the SD U-Net (`t2i.nets.unet`) in four ways,
all kept here as options of one network:

- text conditioning: the frozen T5 states are projected to the network width (`encoder_hid_proj`)
  and read by "simple" cross-attention layers that put the text keys/values in front of the
  pixels' own (one softmax over [text; pixels], the GLIDE/Imagen layout; `AddedKVAttention`), and
  an attention-pooled summary of the text is added to the timestep embedding (`TextPooling`,
  Imagen sec. 2.1 "pooled embedding vector added to the diffusion timestep embedding");
- residual blocks with FiLM time conditioning (scale-shift norm, ADM), GELU activations, and the
  resampling done inside a residual block (BigGAN-style up/down blocks, ADM);
- the super-resolution stages take the noisy low-resolution image concatenated to their input and
  the augmentation level as a second timestep-like embedding (`class_embed`, Imagen sec. 2.3
  noise conditioning augmentation; the level, a timestep of the augmentation schedule, is
  embedded with the timestep's sinusoid and MLP shape and added to the time embedding);
- Efficient U-Net's scaled skips: residual outputs divided by `resnet_out_scale` (sqrt 2 in IF's
  stage II), more blocks at low resolution (per-level `layers_per_block`).

Parameter names equal diffusers' `UNet2DConditionModel` built with `ResnetDownsampleBlock2D`,
`SimpleCrossAttnDownBlock2D`, `UNetMidBlock2DSimpleCrossAttn`, `SimpleCrossAttnUpBlock2D` and
`ResnetUpsampleBlock2D` (what diffusers' IF conversion writes), so an IF `unet/` folder loads with
`load_state_dict(strict=True)` after the config translation in `t2i.checkpoints.diffusers_if`.

Read top to bottom: config, blocks, levels, model, presets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.attention import Attention
from t2i.nets.embeddings import SinusoidalEmbedding, TimestepEmbedding
from t2i.nets.levels import DownBlock, MidBlock, UpBlock
from t2i.nets.resnet import ResBlock

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU}


@dataclass
class IFUNetConfig:
    """Shape of an IF U-Net. Per-level tuples are indexed from the highest resolution down; the up
    path mirrors them (one more ResBlock per level).

    Attributes:
        in_channels: 3 for a base model; 6 for super-resolution (noisy image + upsampled low-res image).
        out_channels: 6 with the learned variance (eps, then the variance interpolation values).
        block_channels: feature width per level.
        layers_per_block: ResBlocks per level on the down path.
        attention: whether a level has simple cross-attention after each ResBlock.
        head_dim: attention head width per level (heads = channels // head_dim).
        only_cross_attention: per level, the attention reads the text alone (no pixel keys/values).
        mid_only_cross_attention: the same for the middle block's attention.
        context_dim: width the text is projected to (keys/values of every cross-attention).
        encoder_hid_dim: width of the text encoder states (T5-XXL: 4096); None: no projection, the
            states are already context_dim wide.
        text_embed_heads: heads of the attention pooling of the text into the time embedding; None:
            no pooled text (diffusers' addition_embed_type "text" when set).
        class_embed: the super-resolution noise level is embedded like a timestep and added to the
            time embedding (diffusers' class_embed_type "timestep"); concat_class_embed: concatenated
            instead (the blocks then read a 2x wider embedding).
        act: "gelu" (IF) or "silu", in ResBlocks, time MLPs and the output.
        scale_shift: FiLM time conditioning, norm(h) * (1 + scale) + shift (ADM).
        skip_time_act: the ResBlocks project the time embedding without applying act first.
        resnet_out_scale, mid_scale: ResBlock outputs (skip + h) / scale in the levels / the middle.
        time_embed_dim: time embedding width (None: 4 * block_channels[0]).
        time_embed_act: activation applied to the summed embedding before the blocks (None: none).
        cross_attention_norm: "group_norm" normalises the projected text before the attention
            (32 groups), or None.
        efficient: Imagen's Efficient U-Net order (appendix F): every down level downsamples *first*
            and every up level upsamples *last*, so a level's blocks run at half the resolution of the
            diffusers layout's same level and the full resolution has only conv_in / conv_out (levels + 1
            resolutions; sizes must be multiples of 2 ** levels). The resampling is lossless space-to-depth
            and a linear depth-to-space (imagen-pytorch's), the skips are the levels' block outputs, and
            conv_in's features are added to the last up level's output (imagen-pytorch's init-conv residual):
            without it eps, a per-pixel target, was learned 3x slower on the tiny preset (loss 0.69 vs 0.24
            after 40 steps). Not a diffusers layout.
        skip_scale: the U-Net skip features are multiplied by this before concatenation (Efficient
            U-Net's 1/sqrt(2); 1 in IF).
        norm_groups, norm_eps: GroupNorm settings of ResBlocks, attention and output norm.
        flip_sin_to_cos, freq_shift: sinusoidal embedding layout.
        dropout: ResBlock dropout.
        sample_size: image side the model was trained at.
    """

    in_channels: int = 3
    out_channels: int = 6
    block_channels: tuple[int, ...] = (32, 64)
    layers_per_block: tuple[int, ...] = (1, 1)
    attention: tuple[bool, ...] = (False, True)
    head_dim: tuple[int, ...] = (8, 8)
    only_cross_attention: tuple[bool, ...] = (False, False)
    mid_only_cross_attention: bool = False
    context_dim: int = 32
    encoder_hid_dim: int | None = None
    text_embed_heads: int | None = None
    class_embed: bool = False
    concat_class_embed: bool = False
    act: str = "gelu"
    scale_shift: bool = True
    skip_time_act: bool = False
    resnet_out_scale: float = 1.0
    mid_scale: float = 1.0
    time_embed_dim: int | None = None
    time_embed_act: str | None = None
    cross_attention_norm: str | None = "group_norm"
    efficient: bool = False
    skip_scale: float = 1.0
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dropout: float = 0.0
    sample_size: int = 64

    def __post_init__(self) -> None:
        self.block_channels = tuple(self.block_channels)
        n = len(self.block_channels)
        for name in ("layers_per_block", "attention", "head_dim", "only_cross_attention"):
            value = tuple(getattr(self, name))
            if len(value) != n:
                raise ValueError(f"IFUNetConfig.{name} needs one entry per level ({n}), got {value}")
            setattr(self, name, value)
        if self.act not in ACTIVATIONS or (self.time_embed_act is not None and self.time_embed_act not in ACTIVATIONS):
            raise ValueError(f"IFUNetConfig: activations must be one of {sorted(ACTIVATIONS)}")
        if any(c % d for c, d in zip(self.block_channels, self.head_dim, strict=True)):
            raise ValueError(f"IFUNetConfig: head_dim {self.head_dim} must divide the widths {self.block_channels}")
        if self.cross_attention_norm not in (None, "group_norm"):
            raise ValueError(f"IFUNetConfig.cross_attention_norm must be 'group_norm' or None, not "
                             f"{self.cross_attention_norm!r}")
        if self.concat_class_embed and (not self.class_embed or self.text_embed_heads is not None):
            raise ValueError("concat_class_embed needs class_embed and no pooled text (diffusers adds the pooled "
                             "text to the un-concatenated width)")

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: 2 per resampling."""
        return 2 ** (len(self.block_channels) - (0 if self.efficient else 1))

    @property
    def transformer_depth(self) -> tuple[int, ...]:
        """One attention layer per ResBlock at an attention level (what the loaders' size checks count)."""
        return (1,) * len(self.block_channels)

    @property
    def temb_dim(self) -> int:
        """Width of the time embedding (before a class-embedding concatenation)."""
        return self.time_embed_dim or 4 * self.block_channels[0]

    @property
    def block_temb_dim(self) -> int:
        """Width of the embedding every ResBlock reads."""
        return self.temb_dim * (2 if self.concat_class_embed else 1)


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------


class IFResBlock(ResBlock):
    """`ResBlock` with IF's options (diffusers' ResnetBlock2D): a chosen activation, FiLM time
    conditioning, the time embedding projected without an activation first (skip_time_act), the
    output divided by `out_scale`, and a resampling step inside the block (resample "down": 2x2
    average pooling, "up": nearest 2x, applied to both paths after the first norm; BigGAN / ADM)."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, cfg: IFUNetConfig, out_scale: float,
                 resample: str | None = None) -> None:
        super().__init__(c_in, c_out, temb_dim, groups=cfg.norm_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                         scale_shift=cfg.scale_shift)
        self.act = ACTIVATIONS[cfg.act]()
        self.skip_time_act, self.out_scale, self.resample = cfg.skip_time_act, out_scale, resample

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C_in, H, W); temb: (B, temb_dim) -> (B, C_out, H', W') (H' = H, H / 2 or 2 H)."""
        h = self._resample(self.act(self.norm1(x)))
        x = self._resample(x)
        h = self.conv1(h)  # (B, C_out, H', W')
        t = None
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(temb if self.skip_time_act else self.act(temb))[:, :, None, None]
        if self.scale_shift:
            if t is None:
                raise ValueError("a scale-shift ResBlock needs the time embedding")
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h if t is None else h + t)
        h = self.conv2(self.dropout(self.act(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.out_scale if self.out_scale != 1.0 else skip + h


class SpaceToDepthDown(nn.Module):
    """Efficient U-Net's downsampling (imagen-pytorch's Downsample, without its projection): each 2x2 patch
    stacked into channels (pixel unshuffle), lossless, so per-pixel detail reaches the low-resolution blocks.
    (B, C, H, W) -> (B, 4C, H / 2, W / 2); no parameters; the time embedding is not read (it takes the
    ResBlock's call signature)."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return F.pixel_unshuffle(x, 2)


class DepthToSpaceUp(nn.Module):
    """Efficient U-Net's upsampling (imagen-pytorch's PixelShuffleUpsample, linear): a 1x1 conv to 4x the
    channels, then each channel quadruple spread over a 2x2 patch (pixel shuffle), the inverse of
    `SpaceToDepthDown`'s stacking. (B, C_in, H, W) -> (B, C_out, 2H, 2W). (A SiLU before the shuffle, as
    imagen-pytorch has, measurably slowed learning eps on the tiny preset.)"""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_in, 4 * c_out, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return F.pixel_shuffle(self.proj(x), 2)


class AddedKVAttention(Attention):
    """Imagen/GLIDE text attention over a feature map (diffusers' Attention with added_kv_proj_dim and
    AttnAddedKVProcessor): GroupNorm on the pixels, queries from the pixels, keys/values from the
    text (`add_k_proj`, `add_v_proj`, after an optional GroupNorm of the text) placed before the
    pixels' own keys/values (`to_k`, `to_v`; absent with only_cross_attention), one softmax over
    both, output projection, residual. Biases everywhere."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, cfg: IFUNetConfig,
                 only_cross_attention: bool) -> None:
        super().__init__(channels, channels // head_dim, head_dim, qkv_bias=True)
        self.to_out.append(nn.Dropout(0.0))  # `to_out.1`, as the reference (no parameters)
        self.only_cross_attention = only_cross_attention
        if only_cross_attention:
            self.to_k = self.to_v = None  # type: ignore[assignment]
        inner = self.heads * head_dim
        self.add_k_proj = nn.Linear(context_dim, inner)
        self.add_v_proj = nn.Linear(context_dim, inner)
        self.group_norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-5)
        self.norm_cross = (nn.GroupNorm(32, context_dim, eps=1e-5) if cfg.cross_attention_norm == "group_norm"
                           else None)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *_: object) -> torch.Tensor:  # type: ignore[override]
        """x: (B, C, H, W) feature map; context: (B, T, context_dim) projected text -> (B, C, H, W)."""
        if context is None:
            raise ValueError("IF attention needs the text context")
        b, c, hgt, wdt = x.shape
        h = self.group_norm(x.flatten(2)).transpose(1, 2)  # (B, HW, C)
        if self.norm_cross is not None:
            context = self.norm_cross(context.transpose(1, 2)).transpose(1, 2)  # (B, T, D), normed over D

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, N, Dh)

        q = heads(self.to_q(h))
        k, v = heads(self.add_k_proj(context)), heads(self.add_v_proj(context))  # (B, H, T, Dh)
        if not self.only_cross_attention:
            k = torch.cat([k, heads(self.to_k(h))], dim=2)  # (B, H, T + HW, Dh): text first
            v = torch.cat([v, heads(self.to_v(h))], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, HW, Dh)
        out = self.to_out(out.transpose(1, 2).flatten(2))  # (B, HW, C)
        return out.transpose(1, 2).reshape(b, c, hgt, wdt) + x


class TextPooling(nn.Module):
    """The text summarised into one vector added to the time embedding (diffusers' TextTimeEmbedding
    with AttentionPooling, CLIP's attention pool): LayerNorm, a query made of the mean token plus a
    learned position, multi-head attention over [query; tokens], projection, LayerNorm.
    (B, T, D) -> (B, temb_dim)."""

    def __init__(self, dim: int, temb_dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.pool = _AttentionPool(dim, heads)
        self.proj = nn.Linear(dim, temb_dim)
        self.norm2 = nn.LayerNorm(temb_dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(text))))


class _AttentionPool(nn.Module):
    """One query, (mean token + positional_embedding), attending over [itself; the tokens]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(1, dim) / dim**0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, D)."""
        query = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)  # (B, 1, D)
        tokens = torch.cat([query, x], dim=1)  # (B, T + 1, D)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, N, Dh)

        out = F.scaled_dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(tokens)),
                                             heads(self.v_proj(tokens)))  # (B, H, 1, Dh)
        return out.transpose(1, 2).flatten(1)  # (B, D), heads in order


# ---------------------------------------------------------------------------------------
# Levels: the shared level blocks, with the resampling ResBlock fed the time embedding
# ---------------------------------------------------------------------------------------


class IFDownBlock(DownBlock):
    """A down level whose Downsample is a ResBlock (it reads the time embedding): after the level's blocks
    (diffusers' layout, its output one more skip) or, with `first`, before them (Efficient U-Net, no skip)."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None = None,
                 downsample: nn.Module | None = None, first: bool = False) -> None:
        super().__init__(resnets, attentions, downsample)
        self.first = first

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        if self.first and self.downsamplers is not None:
            x = self.downsamplers[0](x, temb)  # (B, C_in, H / 2, W / 2)
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None and not self.first:
            x = self.downsamplers[0](x, temb)
            skips.append(x)
        return x, skips


class IFUpBlock(UpBlock):
    """An up level whose Upsample is a ResBlock (it reads the time embedding)."""

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor] | None = None, temb: torch.Tensor | None = None,
                context: torch.Tensor | None = None, upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        return x if self.upsamplers is None else self.upsamplers[0](x, temb)


def _attention(cfg: IFUNetConfig, c: int, level: int, only_cross: bool | None = None) -> AddedKVAttention:
    return AddedKVAttention(c, cfg.head_dim[level], cfg.context_dim, cfg,
                            cfg.only_cross_attention[level] if only_cross is None else only_cross)


def _down_level(cfg: IFUNetConfig, level: int, c_in: int) -> IFDownBlock:
    c, n, temb = cfg.block_channels[level], cfg.layers_per_block[level], cfg.block_temb_dim
    s = cfg.resnet_out_scale
    if cfg.efficient:  # every level starts at half the previous resolution, its pixels stacked: 4x the width
        c_in = 4 * c_in
    resnets = [IFResBlock(c_in if j == 0 else c, c, temb, cfg, s) for j in range(n)]
    attentions = [_attention(cfg, c, level) for _ in range(n)] if cfg.attention[level] else None
    if cfg.efficient:
        return IFDownBlock(resnets, attentions, SpaceToDepthDown(), first=True)
    last = level == len(cfg.block_channels) - 1
    return IFDownBlock(resnets, attentions, None if last else IFResBlock(c, c, temb, cfg, s, "down"))


def _up_level(cfg: IFUNetConfig, i: int, c_prev: int) -> IFUpBlock:
    """Up block i (0 = lowest resolution) mirrors down level n - 1 - i, as `t2i.nets.unet._up_level`."""
    n_levels = len(cfg.block_channels)
    level = n_levels - 1 - i
    c, c_skip_last = cfg.block_channels[level], cfg.block_channels[max(level - 1, 0)]
    n, temb, s = cfg.layers_per_block[level] + 1, cfg.block_temb_dim, cfg.resnet_out_scale
    if cfg.efficient:  # one skip per down block of the level (all c wide); every level ends upsampled
        n, c_skip_last = n - 1, c
    resnets = [IFResBlock((c_prev if j == 0 else c) + (c_skip_last if j == n - 1 else c), c, temb, cfg, s)
               for j in range(n)]
    attentions = [_attention(cfg, c, level) for _ in range(n)] if cfg.attention[level] else None
    if cfg.efficient:  # every level ends at twice its resolution
        return IFUpBlock(resnets, attentions, DepthToSpaceUp(c, c))
    last = i == n_levels - 1
    return IFUpBlock(resnets, attentions, None if last else IFResBlock(c, c, temb, cfg, s, "up"))


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


class IFUNet(nn.Module):
    """eps and variance values of an IF stage: forward(x, t, context, class_labels=None) -> (B, out, H, W).

    The raw network, before any preconditioning; a super-resolution stage's caller concatenates the
    low-resolution image to x and passes the augmentation level as class_labels.
    """

    def __init__(self, cfg: IFUNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch, temb = cfg.block_channels, cfg.temb_dim
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = SinusoidalEmbedding(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = _mlp(ch[0], temb, cfg.act)
        self.class_embedding = _mlp(ch[0], temb, cfg.act) if cfg.class_embed else None
        text_dim = cfg.encoder_hid_dim or cfg.context_dim
        self.add_embedding = TextPooling(text_dim, temb, cfg.text_embed_heads) if cfg.text_embed_heads else None
        self.time_embed_act = ACTIVATIONS[cfg.time_embed_act]() if cfg.time_embed_act else None
        self.encoder_hid_proj = nn.Linear(cfg.encoder_hid_dim, cfg.context_dim) if cfg.encoder_hid_dim else None

        self.down_blocks = nn.ModuleList()
        c_in = ch[0]
        for level, c in enumerate(ch):
            self.down_blocks.append(_down_level(cfg, level, c_in))
            c_in = c
        c, bt = ch[-1], cfg.block_temb_dim
        self.mid_block = MidBlock([IFResBlock(c, c, bt, cfg, cfg.mid_scale) for _ in range(2)],
                                  [_attention(cfg, c, len(ch) - 1, cfg.mid_only_cross_attention)])
        self.up_blocks = nn.ModuleList()
        c_prev = ch[-1]
        for i in range(len(ch)):
            self.up_blocks.append(_up_level(cfg, i, c_prev))
            c_prev = ch[len(ch) - 1 - i]
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = ACTIVATIONS[cfg.act]()
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def embed(self, t: torch.Tensor, batch: int, dtype: torch.dtype, text: torch.Tensor,
              class_labels: torch.Tensor | None) -> torch.Tensor:
        """The (B, block_temb_dim) embedding every ResBlock reads: time (+ noise level) (+ pooled text)."""
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        emb = self.time_embedding(self.time_proj(t).to(dtype))  # (B, temb)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this IF U-Net is a super-resolution stage: pass class_labels (the noise level)")
            labels = class_labels.reshape(-1).expand(batch) if class_labels.numel() == 1 else class_labels
            level = self.class_embedding(self.time_proj(labels).to(dtype))  # (B, temb)
            emb = torch.cat([emb, level], dim=-1) if self.cfg.concat_class_embed else emb + level
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(text)
        return emb if self.time_embed_act is None else self.time_embed_act(emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, in_channels, H, W) (H, W multiples of cfg.size_multiple); t: (B,) timesteps;
        context: (B, T, encoder_hid_dim) text encoder states; class_labels: (B,) the super-resolution
        augmentation timesteps. Returns (B, out_channels, H, W)."""
        emb = self.embed(t, x.shape[0], x.dtype, context, class_labels)
        if self.encoder_hid_proj is not None:
            context = self.encoder_hid_proj(context)  # (B, T, context_dim)
        h = self.conv_in(x)  # (B, C0, H, W)
        skip_in = h
        skips = [] if self.cfg.efficient else [h]
        for block in self.down_blocks:
            h, level_skips = block(h, emb, context)
            skips.extend(level_skips)
        h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            if self.cfg.skip_scale != 1.0:
                level_skips = [k * self.cfg.skip_scale for k in level_skips]
            h = block(h, level_skips, emb, context)
        if self.cfg.efficient:
            h = h + skip_in  # conv_in's features: the one full-resolution path (imagen's init-conv residual)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, out_channels, H, W)


def _mlp(in_dim: int, dim: int, act: str) -> TimestepEmbedding:
    """Linear-act-Linear (diffusers' TimestepEmbedding with act_fn)."""
    mlp = TimestepEmbedding(in_dim, dim)
    mlp.act = ACTIVATIONS[act]()
    return mlp


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------

IF_UNET_PRESETS: dict[str, IFUNetConfig] = {
    # The shapes world's base stage at 32x32 on MiniLM states (384 wide, projected to 64): 32 -> 16 -> 8, text
    # attention at 8x8 (what one CPU core trains in the family budget, as DDPM's shapes_32_s), learned variance.
    "shapes_base_32": IFUNetConfig(in_channels=3, out_channels=6, block_channels=(32, 64, 64),
                                   layers_per_block=(1, 1, 1), attention=(False, False, True), head_dim=(32, 32, 32),
                                   only_cross_attention=(False,) * 3, context_dim=64, encoder_hid_dim=384,
                                   text_embed_heads=4, norm_groups=16, sample_size=32),
    # Its super-resolution stage 32 -> 64, an Efficient U-Net (Imagen appendix F): every level resamples
    # first, so the blocks run at 32, 16 and 8 px and 64 px has only the input and output convolutions;
    # more blocks at low resolution, skips and residuals scaled by 1/sqrt(2), text attention at 8x8 only.
    "shapes_sr_64": IFUNetConfig(in_channels=6, out_channels=6, block_channels=(32, 64, 64),
                                 layers_per_block=(1, 2, 2), attention=(False, False, True), head_dim=(32, 32, 32),
                                 only_cross_attention=(False,) * 3, context_dim=64, encoder_hid_dim=384,
                                 text_embed_heads=4, class_embed=True, skip_time_act=True, resnet_out_scale=2**0.5,
                                 mid_scale=2**0.5, time_embed_act="gelu", efficient=True, skip_scale=2**-0.5,
                                 norm_groups=16, sample_size=64),
    # A few-second test network (base).
    "tiny_base": IFUNetConfig(in_channels=3, out_channels=6, block_channels=(16, 32), layers_per_block=(1, 1),
                              attention=(False, True), head_dim=(8, 8), only_cross_attention=(False, False),
                              context_dim=32, encoder_hid_dim=384, text_embed_heads=2, norm_groups=8, sample_size=16),
    # A few-second test network (super-resolution 16 -> 32, Efficient U-Net order).
    "tiny_sr": IFUNetConfig(in_channels=6, out_channels=6, block_channels=(16, 32), layers_per_block=(1, 2),
                            attention=(False, True), head_dim=(8, 8), only_cross_attention=(False, True),
                            context_dim=32, encoder_hid_dim=384, text_embed_heads=2, class_embed=True,
                            skip_time_act=True, resnet_out_scale=2**0.5, mid_scale=2**0.5,
                            time_embed_act="gelu", efficient=True, skip_scale=2**-0.5, norm_groups=8, sample_size=32),
}
