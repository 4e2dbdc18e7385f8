"""unCLIP's diffusion prior: CLIP text -> CLIP image embedding (Ramesh et al. 2022, "Hierarchical
Text-Conditional Image Generation with CLIP Latents", sec. 2.2).

A decoder-only transformer over the sequence

    [encoded text tokens (T), CLIP text embedding, timestep embedding, noised image embedding z_t, query]

with a causal attention mask (each token sees those before it; padded text tokens are hidden), whose
output at the final learned query token is the prediction of the *unnoised* image embedding z_0 itself,
not of the noise: the paper's L_prior = E ||f(z_t, t, y) - z_0||^2. Classifier-free guidance drops the
text condition (the text tokens and text embedding of the empty caption). Image embeddings are handled
normalised, (z - clip_mean) / clip_std, the two statistics stored with the weights (Karlo's prior).

Parameter names follow diffusers' `PriorTransformer` except the blocks, which are t2i's pre-norm
`PreNormBlock`s (`t2i.checkpoints.diffusers_unclip` maps `transformer_blocks.*`).
Read top to bottom: config, block, model, presets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.embeddings import SinusoidalEmbedding, TimestepEmbedding
from t2i.nets.transformer import PreNormBlock

MASKED = -10000.0  # the additive bias of a hidden key: finite, so a row never has every key at -inf


@dataclass
class PriorConfig:
    """Shape of a diffusion prior. Defaults: Karlo's (diffusers' PriorTransformer defaults).

    Attributes:
        heads, head_dim: attention shape; width = heads * head_dim.
        layers: transformer blocks.
        embed_dim: CLIP embedding width (image embedding in and out; the text token states must have it too).
        text_tokens: length T of the encoded text (the positional table covers T + 4 tokens).
        text_embed_dim: width of the CLIP text embedding (None: embed_dim).
        norm_in: a LayerNorm on the token sequence before the blocks (Kandinsky's "layer"; Karlo: none).
        text_embed_norm: a LayerNorm on the text embedding before its projection.
    """

    heads: int = 32
    head_dim: int = 64
    layers: int = 20
    embed_dim: int = 768
    text_tokens: int = 77
    text_embed_dim: int | None = None
    norm_in: bool = False
    text_embed_norm: bool = False

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


# The four tokens after the text: text embedding, timestep, noised image embedding, learned query.
EXTRA_TOKENS = 4


class MaskedBlock(PreNormBlock):
    """A pre-norm block whose self-attention takes an additive bias (the causal + padding mask)."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """x: (B, L, D); bias: (B, 1, L, L) float, added to the attention logits."""
        x = x + self.attn(self.norm1(x), mask=bias)  # (B, L, D)
        return x + self.mlp(self.norm2(x))


def causal_bias(text_mask: torch.Tensor, extra: int, dtype: torch.dtype) -> torch.Tensor:
    """The prior's attention bias (B, 1, L, L), L = T + extra: MASKED above the diagonal (a token sees
    itself and earlier ones) and on padded text keys. text_mask: (B, T) bool, True on real tokens."""
    b, t = text_mask.shape
    length = t + extra
    keys = F.pad((~text_mask).to(dtype) * MASKED, (0, extra))  # (B, L): the four extra tokens always seen
    causal = torch.full((length, length), MASKED, dtype=dtype, device=text_mask.device).triu_(1)  # (L, L)
    return (keys[:, None, :] + causal)[:, None]  # (B, 1, L, L)


class PriorTransformer(nn.Module):
    """f(z_t, t, text) -> z_0 on normalised CLIP image embeddings.

    forward(x (B, E) noised normalised image embeddings, t (B,) timesteps, text_embeds (B, E_t) CLIP text
    embeddings, text_states (B, T, E) CLIP text token states, text_mask (B, T) bool) -> (B, E).
    """

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, e = cfg.width, cfg.embed_dim
        te = cfg.text_embed_dim or e
        self.time_proj = SinusoidalEmbedding(d, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        self.time_embedding = TimestepEmbedding(d, d)
        self.proj_in = nn.Linear(e, d)  # the noised image embedding
        self.embedding_proj_norm = nn.LayerNorm(te) if cfg.text_embed_norm else None
        self.embedding_proj = nn.Linear(te, d)  # the CLIP text embedding
        self.encoder_hidden_states_proj = nn.Linear(e, d)  # the text token states
        # Learned (zero-initialised, as the reference) positions and final query token.
        self.positional_embedding = nn.Parameter(torch.zeros(1, cfg.text_tokens + EXTRA_TOKENS, d))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.norm_in = nn.LayerNorm(d) if cfg.norm_in else None
        self.blocks = nn.ModuleList(MaskedBlock(d, cfg.heads, 4 * d, "gelu", 1e-5) for _ in range(cfg.layers))
        self.norm_out = nn.LayerNorm(d)
        self.proj_to_clip_embeddings = nn.Linear(d, e)
        # The image-embedding statistics: z = z_normalised * clip_std + clip_mean (`denormalize`).
        self.clip_mean = nn.Parameter(torch.zeros(1, e))
        self.clip_std = nn.Parameter(torch.ones(1, e))

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor, text_states: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        dtype = self.proj_in.weight.dtype
        time = self.time_embedding(self.time_proj(t).to(dtype))  # (B, D)
        if self.embedding_proj_norm is not None:
            text_embeds = self.embedding_proj_norm(text_embeds)
        tokens = torch.cat([
            self.encoder_hidden_states_proj(text_states.to(dtype)),  # (B, T, D)
            self.embedding_proj(text_embeds.to(dtype))[:, None],  # (B, 1, D)
            time[:, None],  # (B, 1, D)
            self.proj_in(x.to(dtype))[:, None],  # (B, 1, D)
            self.prd_embedding.to(dtype).expand(b, -1, -1),  # (B, 1, D)
        ], dim=1)  # (B, L, D), L = T + 4
        if tokens.shape[1] != self.positional_embedding.shape[1]:
            raise ValueError(f"the prior was built for {self.cfg.text_tokens} text tokens, got {text_states.shape[1]}")
        h = tokens + self.positional_embedding.to(dtype)
        if text_mask is None:
            text_mask = torch.ones(b, text_states.shape[1], dtype=torch.bool, device=x.device)
        bias = causal_bias(text_mask.bool(), EXTRA_TOKENS, dtype)  # (B, 1, L, L)
        if self.norm_in is not None:
            h = self.norm_in(h)
        for block in self.blocks:
            h = block(h, bias)
        return self.proj_to_clip_embeddings(self.norm_out(h[:, -1]))  # (B, E): the query token's output

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings (B, E) -> CLIP's scale: z * clip_std + clip_mean."""
        return z * self.clip_std.to(z.dtype) + self.clip_mean.to(z.dtype)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (B, E) -> the prior's normalised space (training targets)."""
        return (z - self.clip_mean.to(z.dtype)) / self.clip_std.to(z.dtype)


PRIOR_PRESETS: dict[str, PriorConfig] = {
    "karlo": PriorConfig(),  # kakaobrain/karlo-v1-alpha: ViT-L/14 CLIP, 20 layers of width 2048
    # the shapes world: our shapes CLIP (128-wide embeddings and token states, 32 tokens)
    "shapes_s": PriorConfig(heads=4, head_dim=32, layers=6, embed_dim=128, text_tokens=32),
    "tiny": PriorConfig(heads=2, head_dim=8, layers=2, embed_dim=16, text_tokens=8),
}
