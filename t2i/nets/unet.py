"""The Stable Diffusion U-Net (SD 1.x, SD 2.x, SDXL), an eps/v-predicting latent denoiser.

Rombach et al. 2022 (LDM) Sec. 3.3 and Fig. 3: a U-Net of ResBlocks with the timestep
embedding added to every block, and spatial transformers that cross-attend to the text
encoder's hidden states. SDXL (Podell et al. 2023) adds more transformer blocks on the
deeper levels, drops attention on the first level and adds "micro-conditioning": the
original size, crop offset and target size (`time_ids`) are embedded sinusoidally,
concatenated with the pooled text embedding and added to the time embedding (Sec. 2.2).
A latent consistency model (LCM, Luo et al. 2023 sec. 4.2) distilled with guidance takes the
guidance scale w as one more input: its Fourier embedding is projected onto the sinusoidal
timestep features (`time_cond_proj_dim`), and no classifier-free guidance batch is run.

Parameter names equal diffusers' `UNet2DConditionModel` for the same configuration, so
a diffusers `unet/` folder loads with `load_state_dict(strict=True)`; configs are
translated in `t2i.checkpoints.diffusers_nets`. Weights use PyTorch's default init, as the
reference does; nothing is zero-initialised.

Read top to bottom: config, helpers and level builders, model, presets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2i.nets.attention import Attention
from t2i.nets.embeddings import SinusoidalEmbedding, TimestepEmbedding
from t2i.nets.levels import DownBlock, MidBlock, UpBlock
from t2i.nets.resample import Downsample, Upsample
from t2i.nets.resnet import ResBlock
from t2i.nets.spatial_attention import SpatialTransformer


@dataclass
class UNetConfig:
    """Shape of a U-Net. Per-level tuples are indexed from the highest resolution down;
    the up path mirrors them.

    Attributes:
        in_channels: input channels (4 latents; 9 for inpainting: latents + mask + masked latents).
        out_channels: output channels.
        block_channels: feature width of each level.
        layers_per_block: ResBlocks per level on the down path (the up path has one more).
        attention: whether a level has spatial transformers after its ResBlocks.
        num_heads: attention heads per level (head width = channels // heads).
        transformer_depth: TransformerBlocks per spatial transformer, per level (SDXL: 1, 2, 10);
            the mid block uses the last level's.
        context_dim: width of the text tokens the transformers cross-attend to.
        linear_projection: proj_in/proj_out are Linear on tokens (SD2, SDXL) instead of 1x1 convs.
        only_cross_attention: per level, the first attention also reads the context.
        mid_block: whether there is a bottleneck block; mid_attention: whether it has a
            spatial transformer (False: a single ResBlock, diffusers' `UNetMidBlock2D`).
        norm_groups, norm_eps: GroupNorm settings of the ResBlocks and output norm.
        flip_sin_to_cos, freq_shift: sinusoidal timestep embedding layout.
        time_embed_dim: width of the time embedding (None: 4 * block_channels[0]).
        addition_time_embed_dim: SDXL micro-conditioning; width of each time id's sinusoidal
            embedding (256), None when the model has no `text_time` embedding.
        projection_class_embeddings_input_dim: input width of that embedding's MLP, pooled
            text width + number of time ids * addition_time_embed_dim (SDXL 1280 + 6 * 256; a
            model conditioned on the time ids alone: 6 * addition_time_embed_dim).
        time_cond_proj_dim: width of an extra condition added to the timestep features through a
            bias-free projection (LCM's guidance-scale embedding, 256); None: no such input.
        num_class_embeds: a learned embedding per integer class label, added to the time embedding
            (diffusers' `num_class_embeds` with `class_embed_type=None`: the SD x4 upscaler gives the
            noise level of its low-res input this way, 1000 labels); None: no class input.
        dropout: ResBlock and feed-forward dropout.
        sample_size: default latent size the model was trained at (64 for SD1 at 512 px).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    attention: tuple[bool, ...] = (True, True, True, False)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)
    context_dim: int = 768
    linear_projection: bool = False
    only_cross_attention: tuple[bool, ...] = (False, False, False, False)
    mid_block: bool = True
    mid_attention: bool = True
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embed_dim: int | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_cond_proj_dim: int | None = None
    dropout: float = 0.0
    sample_size: int = 64
    num_class_embeds: int | None = None

    def __post_init__(self) -> None:
        # JSON round-trips give lists; the dataclass holds tuples so configs compare equal.
        self.block_channels = tuple(self.block_channels)
        n = len(self.block_channels)
        for name in _PER_LEVEL:
            value = tuple(getattr(self, name))
            if len(value) != n:
                raise ValueError(f"UNetConfig.{name} needs one entry per level ({n}), got {value}")
            setattr(self, name, value)
        if (self.addition_time_embed_dim is None) != (self.projection_class_embeddings_input_dim is None):
            raise ValueError(
                "addition_time_embed_dim and projection_class_embeddings_input_dim go together "
                "(SDXL text_time embedding)"
            )


_PER_LEVEL = ("layers_per_block", "attention", "num_heads", "transformer_depth", "only_cross_attention")


# ---------------------------------------------------------------------------------------
# Helpers and level builders
# ---------------------------------------------------------------------------------------


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Fourier embedding of guidance scales, (B,) -> (B, dim) float32: [sin | cos] of 1000 w times
    the frequencies 10000^(-i / (dim/2 - 1)), zero-padded if dim is odd.

    LCM feeds the guidance scale w of its augmented PF-ODE to the student this way (Luo et al. 2023
    sec. 4.2; the embedding is VDM's, Kingma et al. 2021, as in diffusers'
    `get_guidance_scale_embedding`). w is the paper's CFG weight, i.e. a pipeline's
    guidance_scale - 1. The arithmetic follows the reference step by step (float32 log, divide,
    then exp) because at 1000 w ~ 10^4 one ulp of a frequency moves the phase by ~1e-3.
    """
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)  # (dim // 2,)
    args = (w.to(torch.float32) * 1000.0)[:, None] * freqs.to(w.device)[None, :]  # (B, dim // 2)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * (dim // 2))
    return nn.functional.pad(emb, (0, dim % 2))


class ConditionedTimestepEmbedding(TimestepEmbedding):
    """The timestep MLP with an extra condition c (B, cond_dim) added to its input through a
    bias-free projection: Linear-SiLU-Linear(emb + cond_proj(c)). diffusers' `TimestepEmbedding`
    with `cond_proj_dim`, so the weights load under `time_embedding.cond_proj.weight`."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int) -> None:
        super().__init__(in_dim, dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)

    def forward(self, emb: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            emb = emb + self.cond_proj(condition.to(emb.dtype))  # (B, in_dim)
        return super().forward(emb)


def _transformer(
    cfg: UNetConfig, channels: int, level: int, depth: int, only_cross: bool | None = None
) -> SpatialTransformer:
    heads = cfg.num_heads[level]
    return SpatialTransformer(
        channels,
        heads,
        channels // heads,
        cfg.context_dim,
        depth=depth,
        linear_projection=cfg.linear_projection,
        only_cross_attention=cfg.only_cross_attention[level] if only_cross is None else only_cross,
        groups=cfg.norm_groups,
        dropout=cfg.dropout,
    )


def _resblock(cfg: UNetConfig, c_in: int, c_out: int, temb_dim: int) -> ResBlock:
    return ResBlock(c_in, c_out, temb_dim, groups=cfg.norm_groups, eps=cfg.norm_eps, dropout=cfg.dropout)


def _down_level(cfg: UNetConfig, level: int, c_in: int, temb_dim: int) -> DownBlock:
    """Level `level` of the down path: layers_per_block ResBlocks (+ transformers), Downsample
    unless it is the last level."""
    c = cfg.block_channels[level]
    n = cfg.layers_per_block[level]
    resnets = [_resblock(cfg, c_in if j == 0 else c, c, temb_dim) for j in range(n)]
    attentions = None
    if cfg.attention[level]:
        attentions = [_transformer(cfg, c, level, cfg.transformer_depth[level]) for _ in range(n)]
    last = level == len(cfg.block_channels) - 1
    return DownBlock(resnets, attentions, None if last else Downsample(c, padding=1))


def _up_level(cfg: UNetConfig, i: int, c_prev: int, temb_dim: int) -> UpBlock:
    """Up block i (0 = lowest resolution) mirrors down level L = n - 1 - i. Its ResBlocks take
    the previous output concatenated with one skip each; the last skip comes from the level
    below L (the output of its Downsample path, or of conv_in for L = 0)."""
    n_levels = len(cfg.block_channels)
    level = n_levels - 1 - i
    c = cfg.block_channels[level]
    c_skip_last = cfg.block_channels[max(level - 1, 0)]
    n = cfg.layers_per_block[level] + 1
    resnets = []
    for j in range(n):
        c_in = c_prev if j == 0 else c
        c_skip = c_skip_last if j == n - 1 else c
        resnets.append(_resblock(cfg, c_in + c_skip, c, temb_dim))
    attentions = None
    if cfg.attention[level]:
        attentions = [_transformer(cfg, c, level, cfg.transformer_depth[level]) for _ in range(n)]
    last = i == n_levels - 1
    return UpBlock(resnets, attentions, None if last else Upsample(c))


def _mid(cfg: UNetConfig, temb_dim: int) -> MidBlock:
    c = cfg.block_channels[-1]
    if not cfg.mid_attention:
        return MidBlock([_resblock(cfg, c, c, temb_dim)])
    # The reference mid block has no only_cross_attention option: always self + cross.
    attn = _transformer(cfg, c, len(cfg.block_channels) - 1, cfg.transformer_depth[-1], only_cross=False)
    return MidBlock([_resblock(cfg, c, c, temb_dim), _resblock(cfg, c, c, temb_dim)], [attn])


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


class UNetEncoder(nn.Module):
    """The encoder half of the U-Net: conv_in, the time (and SDXL added) embeddings, the down levels
    and the mid block. The U-Net adds its up path to it; a ControlNet (`t2i.nets.controlnet`) is a
    trainable copy of it. Parameter names are the U-Net's (and diffusers')."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_channels
        temb_dim = cfg.time_embed_dim or 4 * ch[0]

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = SinusoidalEmbedding(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = (TimestepEmbedding(ch[0], temb_dim) if cfg.time_cond_proj_dim is None
                               else ConditionedTimestepEmbedding(ch[0], temb_dim, cfg.time_cond_proj_dim))
        self.add_time_proj: SinusoidalEmbedding | None = None
        self.add_embedding: TimestepEmbedding | None = None
        if cfg.addition_time_embed_dim is not None and cfg.projection_class_embeddings_input_dim is not None:
            self.add_time_proj = SinusoidalEmbedding(
                cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
            )
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_dim)
        self.class_embedding: nn.Embedding | None = None
        if cfg.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(cfg.num_class_embeds, temb_dim)

        self.down_blocks = nn.ModuleList()
        c_in = ch[0]
        for level, c in enumerate(ch):
            self.down_blocks.append(_down_level(cfg, level, c_in, temb_dim))
            c_in = c
        self.mid_block = _mid(cfg, temb_dim) if cfg.mid_block else None

    @property
    def temb_dim(self) -> int:
        return self.cfg.time_embed_dim or 4 * self.cfg.block_channels[0]

    def skip_channels(self) -> list[int]:
        """Channels of each skip `encode` returns, in order: conv_in's, then per level one per ResBlock
        and one after its Downsample (all levels but the last)."""
        ch = self.cfg.block_channels
        out = [ch[0]]
        for level, c in enumerate(ch):
            out += [c] * self.cfg.layers_per_block[level] + ([c] if level < len(ch) - 1 else [])
        return out

    def encode(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
               input_features: torch.Tensor | None = None,
               levels: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, C_in, h, w); emb: (B, temb_dim) from `embed_time`; context: (B, T, context_dim);
        input_features: (B, C0, h, w) added to conv_in's output; levels: run only the first `levels`
        down levels (None: all). Returns (the last level's output, the skips: conv_in's output and
        every down level's, as `skip_channels` lists them). The mid block is not run here."""
        h = self.conv_in(x)  # (B, C0, h, w)
        if input_features is not None:
            h = h + input_features
        skips = [h]
        for block in self.down_blocks[:levels]:
            h, level_skips = block(h, emb, context)
            skips.extend(level_skips)
        return h, skips

    def embed_time(
        self,
        t: torch.Tensor,
        batch: int,
        dtype: torch.dtype,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The (B, temb_dim) embedding every ResBlock receives.

        t: (B,) or scalar timesteps (fractional allowed); text_embeds: (B, P) pooled text
        embedding and time_ids: (B, K) micro-conditioning (SDXL: original h, w, crop top,
        left, target h, w), both required iff the model has the `text_time` embedding;
        timestep_cond: (B, time_cond_proj_dim) LCM's `guidance_scale_embedding`, only for a model
        with that input (optional there, as in diffusers: without it the projection is skipped);
        class_labels: (B,) integer labels, required iff the model has `num_class_embeds` (the SD x4
        upscaler's noise level), their embedding added after the time embedding's, as in diffusers.
        """
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        features = self.time_proj(t).to(dtype)  # (B, C0)
        if timestep_cond is None:
            emb = self.time_embedding(features)  # (B, temb_dim)
        elif isinstance(self.time_embedding, ConditionedTimestepEmbedding):
            emb = self.time_embedding(features, timestep_cond)
        else:
            raise ValueError("timestep_cond given to a U-Net without time_cond_proj_dim")
        if (class_labels is None) != (self.class_embedding is None):
            raise ValueError("class_labels go with a U-Net that has num_class_embeds, and only with one")
        if self.class_embedding is not None and class_labels is not None:
            labels = class_labels.reshape(-1).expand(batch) if class_labels.numel() == 1 else class_labels
            emb = emb + self.class_embedding(labels.long()).to(emb.dtype)  # (B, temb_dim)
        if self.add_embedding is not None and self.add_time_proj is not None:
            if time_ids is None:
                raise ValueError("this U-Net has SDXL micro-conditioning: pass text_embeds and time_ids")
            ids = self.add_time_proj(time_ids.flatten()).reshape(batch, -1)  # (B, K * add_dim)
            # A model whose added embedding reads the time ids alone (projection input K * add_dim:
            # no pooled text, the shapes LDM's MiniLM has none) takes text_embeds=None.
            if text_embeds is None and ids.shape[1] != self.cfg.projection_class_embeddings_input_dim:
                raise ValueError("this U-Net has SDXL micro-conditioning: pass text_embeds and time_ids")
            features = ids if text_embeds is None else torch.cat([text_embeds, ids], dim=-1)
            emb = emb + self.add_embedding(features.to(dtype))
        return emb


class UNet(UNetEncoder):
    """Conditional U-Net eps(x_t, t, text): the raw network, before any preconditioning.

    forward(x, t, context, text_embeds=None, time_ids=None) -> (B, out_channels, h, w).
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__(cfg)
        ch = cfg.block_channels
        self.up_blocks = nn.ModuleList()
        c_prev = ch[-1]
        for i in range(len(ch)):
            self.up_blocks.append(_up_level(cfg, i, c_prev, self.temb_dim))
            c_prev = ch[len(ch) - 1 - i]

        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def fuse_projections(self, cache_context: bool = True) -> UNet:
        """Inference option: every attention's input projections as one GEMM (q/k/v for
        self-attention, k/v for cross-attention) and, with cache_context, the text tokens' K/V
        kept between calls that pass the same context (every step of one sampling run). The state
        dict keeps the reference names. Measured on SD 1.5 at 256 px, fp32, AVX2: no gain beyond
        noise (the projections are a small share of the U-Net), so the pipeline does not turn
        it on. Returns self."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_projections()
                module.cache_context = cache_context
        return self

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        feature_cache: DeepFeatureCache | None = None,
        input_features: torch.Tensor | None = None,
        down_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C_in, h, w) noisy latents; t: (B,) float timesteps in [0, 1000);
        context: (B, T, context_dim) text hidden states; text_embeds: (B, P) and time_ids:
        (B, 6) for SDXL; timestep_cond: (B, time_cond_proj_dim) for an LCM (see `embed_time`).
        Returns (B, C_out, h, w), the eps (or v) prediction.

        feature_cache (DeepCache): when given, the input of the last up block is stored in it on a
        full pass, and with `feature_cache.reuse` set only the first level runs (conv_in, its
        ResBlocks, the last up block) on top of the stored deep features.

        h and w need not be divisible by 2 ** (levels - 1): the up path resizes to the skips.

        input_features: (B, C0, h, w) added to conv_in's output (a layout U-Net's spatial conditioning).

        down_residuals, mid_residual: a ControlNet's outputs (Zhang et al. 2023 sec. 3.2), one per skip
        (as `skip_channels` lists them) added to the skips, and one added to the mid block's output.

        class_labels: (B,) integer labels for a U-Net with `num_class_embeds` (see `embed_time`).
        """
        emb = self.embed_time(t, x.shape[0], x.dtype, text_embeds, time_ids, timestep_cond, class_labels)
        reuse = feature_cache is not None and feature_cache.reuse
        if reuse and (down_residuals is not None or mid_residual is not None):
            raise ValueError("DeepCache's cheap steps skip the levels a ControlNet's residuals go to")
        h, skips = self.encode(x, emb, context, input_features, 1 if reuse else None)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down residuals for the U-Net's {len(skips)} skips")
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        up_blocks = list(self.up_blocks)
        if reuse:
            assert feature_cache is not None and feature_cache.features is not None
            skips = skips[: len(up_blocks[-1].resnets)]  # conv_in + level-0 ResBlocks (not its Downsample)
            h, up_blocks = feature_cache.features, up_blocks[-1:]
        elif self.mid_block is not None:
            h = self.mid_block(h, emb, context)
        if mid_residual is not None and not reuse:
            h = h + mid_residual  # diffusers adds it after the mid block, or to the encoder output without one
        for block in up_blocks:
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[-2:]) if skips else None
            if feature_cache is not None and not reuse and not skips:
                feature_cache.features = h  # the deep features the next cheap steps reuse
            h = block(h, level_skips, emb, context, size)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, C_out, h, w)


@dataclass
class DeepFeatureCache:
    """DeepCache (Ma et al. 2023): between neighbouring sampler steps the U-Net's deep features
    change little, so a full pass stores the input of the last (highest-resolution) up block and
    the next steps recompute only the first level around it. `reuse` is set by the caller."""

    features: torch.Tensor | None = None
    reuse: bool = False


class DeepCacheUNet(nn.Module):
    """A U-Net that runs in full every `interval`-th call and on cached deep features between
    (uniform DeepCache). Calls are counted from construction: make one per sampling run. The
    call pattern must repeat its batch (conditional and unconditional halves in one batch)."""

    def __init__(self, unet: UNet, interval: int) -> None:
        super().__init__()
        if interval < 1:
            raise ValueError(f"DeepCache interval must be at least 1, got {interval}")
        if len(unet.down_blocks) < 2:
            raise ValueError("DeepCache needs a U-Net with at least two levels")
        self.unet, self.interval = unet, interval
        self.cache, self.calls = DeepFeatureCache(), 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        self.cache.reuse = self.calls % self.interval != 0
        if self.cache.reuse and (self.cache.features is None or self.cache.features.shape[0] != x.shape[0]):
            self.cache.reuse = False  # a batch the cache was not built for (e.g. guidance switched off)
        self.calls += 1
        return self.unet(x, t, context, feature_cache=self.cache, **kwargs)


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------

UNET_CONFIGS: dict[str, UNetConfig] = {
    # SD 1.x (CompVis/runwayml v1-5): 8 heads everywhere, 1x1 conv projections, CLIP ViT-L/14 text.
    "sd15": UNetConfig(),
    # SD 1.5 inpainting: the same network on latents + mask + masked-image latents.
    "sd15_inpaint": UNetConfig(in_channels=9),
    # SD 2.x (768-v and 512-base): 64-wide heads, linear projections, OpenCLIP ViT-H/14 text.
    "sd2": UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, linear_projection=True, sample_size=96),
    # SDXL base 1.0: three levels, no attention at the first, 1/2/10 transformer blocks,
    # both text encoders' hidden states (768 + 1280) and pooled text + 6 time ids.
    "sdxl": UNetConfig(
        block_channels=(320, 640, 1280),
        layers_per_block=(2, 2, 2),
        attention=(False, True, True),
        num_heads=(5, 10, 20),
        transformer_depth=(1, 2, 10),
        context_dim=2048,
        linear_projection=True,
        only_cross_attention=(False, False, False),
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        sample_size=128,
    ),
    # A few-second test network: two levels, one with attention.
    "tiny": UNetConfig(
        block_channels=(32, 64),
        layers_per_block=(1, 1),
        attention=(True, False),
        num_heads=(2, 2),
        transformer_depth=(1, 1),
        context_dim=32,
        only_cross_attention=(False, False),
        norm_groups=8,
        sample_size=8,
    ),
}
