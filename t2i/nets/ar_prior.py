"""unCLIP's autoregressive prior: CLIP text -> CLIP image embedding as a sequence of discrete codes
(Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents", sec. 2.2, the
alternative to the diffusion prior of `t2i.nets.prior_transformer` that the paper compares).

The paper's recipe, here:

- the image embedding z_i is reduced by **PCA** to its leading principal components, ordered by decreasing
  eigenvalue (the paper keeps 319 of 1,024; our shapes CLIP's 128-wide embeddings keep 99.7% of their variance
  in 16 components), and each component is **quantized into buckets** (the paper: 1,024; here uniform buckets
  over +-`range_sigmas` standard deviations of the component), giving `components` tokens;
- a **causal transformer** predicts those tokens one after the other, conditioned on the caption and the CLIP
  text embedding, with a first token giving the **quantized dot product** z_i . z_t (of the unit embeddings,
  the cosine), so that sampling can ask for a high one: "we find it beneficial to sample the dot product from
  the top half of the distribution" (`sample_dot_tokens`);
- classifier-free guidance drops the text condition: the empty caption and a null dot-product token.

The network is the token families' causal transformer (`t2i.nets.token_transformer`, with its KV cache for
sampling) composed as Parti's decoder is: the dot-product token is the in-stream prefix (its "text", one
token of a vocabulary of `dot_buckets` + 1, the last the null token) and the caption reaches the blocks by
cross-attention to [CLIP text embedding; CLIP token states]. The paper puts the caption in the stream as a
prefix instead; cross-attention lets the one causal network (and its cache) serve unchanged.

Read top to bottom: config, quantizer, model, presets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.token_transformer import TokenTransformer, TokenTransformerConfig


@dataclass
class ARPriorConfig:
    """Shape of an autoregressive prior.

    Attributes:
        embed_dim: CLIP embedding width (the image embedding, the text embedding, the token states).
        components: principal components kept, one token each (a square: the token network's map side).
        buckets: quantization buckets per component (the tokens' vocabulary).
        range_sigmas: the buckets cover +- this many standard deviations of each component.
        dot_buckets: quantization buckets of the text-image dot product (the first token).
        width, layers, heads, mlp_dim: the causal transformer.
    """

    embed_dim: int = 128
    components: int = 16
    buckets: int = 128
    range_sigmas: float = 4.0
    dot_buckets: int = 32
    width: int = 128
    layers: int = 6
    heads: int = 4
    mlp_dim: int = 512

    def __post_init__(self) -> None:
        side = math.isqrt(self.components)
        if side * side != self.components or self.components > self.embed_dim:
            raise ValueError(f"components must be a square no larger than embed_dim ({self.embed_dim}), "
                             f"got {self.components}")

    @property
    def null_dot(self) -> int:
        """The dot-product token of the unconditional branch (text dropped)."""
        return self.dot_buckets


def uniform_bucket(x: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float, n: int) -> torch.Tensor:
    """Values -> int64 indices of n equal buckets over [lo, hi] (values outside go to the end buckets)."""
    return ((x - lo) / max(float(hi - lo), 1e-6) * n).floor().clamp(0, n - 1).long()


class EmbeddingQuantizer(nn.Module):
    """PCA then uniform buckets per component: CLIP image embeddings (B, E) <-> codes (B, K), and the
    text-image dot product (B,) <-> its bucket. Its statistics are buffers (saved with the weights),
    measured once on training embeddings by `fit`. It computes in float32 whatever the weights' precision."""

    def __init__(self, cfg: ARPriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, k = cfg.embed_dim, cfg.components
        self.register_buffer("mean", torch.zeros(1, e))
        self.register_buffer("basis", torch.eye(k, e))  # (K, E) principal directions, by decreasing variance
        self.register_buffer("scales", torch.ones(k))  # (K,) standard deviation of each component
        self.register_buffer("dot_range", torch.tensor([-1.0, 1.0]))  # the dot buckets span [lo, hi]
        self.register_buffer("dot_counts", torch.ones(cfg.dot_buckets))  # the training dot tokens' histogram

    @torch.no_grad()
    def fit(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
        """The statistics of N (>= components) training pairs: image_embeds, text_embeds (N, E)."""
        mean = image_embeds.mean(0, keepdim=True)
        _, s, v = torch.linalg.svd(image_embeds - mean, full_matrices=False)  # v: (min(N, E), E)
        k = self.cfg.components
        self.mean.copy_(mean)
        self.basis.copy_(v[:k])
        self.scales.copy_((s[:k] / max(image_embeds.shape[0] - 1, 1) ** 0.5).clamp(min=1e-6))
        dots = cosine(image_embeds, text_embeds)
        self.dot_range.copy_(torch.stack([dots.min(), dots.max()]))
        self.dot_counts.copy_(torch.bincount(self.dot_tokens(dots), minlength=self.cfg.dot_buckets).float())

    def encode(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, E) -> (B, K) int64 codes in [0, buckets)."""
        r, n = self.cfg.range_sigmas, self.cfg.buckets
        y = (image_embeds.float() - self.mean.float()) @ self.basis.float().T / self.scales.float()  # (B, K), in sigmas
        return uniform_bucket(y, -r, r, n)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K) codes -> (B, E) embeddings at the buckets' centres (the discarded components at their mean)."""
        r, n = self.cfg.range_sigmas, self.cfg.buckets
        y = -r + (codes.float() + 0.5) * (2 * r / n)  # (B, K)
        return (y * self.scales.float()) @ self.basis.float() + self.mean.float()

    def dot_tokens(self, dots: torch.Tensor) -> torch.Tensor:
        """(B,) cosines -> (B,) int64 buckets in [0, dot_buckets) over the training range."""
        lo, hi = self.dot_range.float()
        return uniform_bucket(dots.float(), lo, hi, self.cfg.dot_buckets)

    def sample_dot_tokens(self, generators: list[torch.Generator]) -> torch.Tensor:
        """(B,) dot tokens drawn from the top half of the training distribution (unCLIP sec. 2.2), one per
        generator: the histogram restricted to the buckets at and above its median, renormalised."""
        p = self.dot_counts.float() / self.dot_counts.float().sum()
        above = p.flip(0).cumsum(0).flip(0)  # mass at or above each bucket
        top = p * (above - p < 0.5)  # the highest buckets holding half the mass (the median's included)
        return torch.stack([torch.multinomial(top, 1, generator=g) for g in generators]).reshape(-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, E), (B, E) -> (B,) the dot products of the unit vectors."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


class ARPrior(nn.Module):
    """Logits of the next code of a CLIP image embedding, given the codes so far, the dot token and the text.

    forward(codes (B, T) int64 with T < components, cond {"text": (B, 1) dot tokens, "context": (B, 1 + L, E)
    [text embedding; token states], "context_mask": (B, 1 + L) bool}) -> (B, T + 1, buckets) float32: row t the
    distribution of code t (the contract of `t2i.tokens.autoregressive`).
    """

    def __init__(self, cfg: ARPriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.quantizer = EmbeddingQuantizer(cfg)
        self.transformer = TokenTransformer(TokenTransformerConfig(
            num_codes=cfg.buckets, grid=math.isqrt(cfg.components), width=cfg.width, layers=cfg.layers,
            heads=cfg.heads, mlp_dim=cfg.mlp_dim, causal=True, context_dim=cfg.embed_dim,
            text_vocab=cfg.dot_buckets + 1, text_length=1))

    def condition(self, dot_tokens: torch.Tensor, text_embeds: torch.Tensor, text_states: torch.Tensor,
                  text_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The transformer's cond: dot_tokens (B,), text_embeds (B, E), text_states (B, L, E), text_mask (B, L)."""
        dtype = self.transformer.position.dtype
        context = torch.cat([text_embeds[:, None], text_states], dim=1).to(dtype)  # (B, 1 + L, E)
        mask = torch.cat([torch.ones_like(text_mask[:, :1], dtype=torch.bool), text_mask.bool()], dim=1)
        return {"text": dot_tokens.reshape(-1, 1), "context": context, "context_mask": mask}

    def forward(self, codes: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.transformer(codes, **cond)  # type: ignore[return-value]


AR_PRIOR_PRESETS: dict[str, ARPriorConfig] = {
    # the shapes world on our shapes CLIP: 16 components x 128 buckets keep an embedding at cosine 0.9985 of itself
    # and its own image first among 500 in 99% of cases (2,048 training images, session 22); 1.63 M parameters
    "shapes_s": ARPriorConfig(),
    "tiny": ARPriorConfig(embed_dim=16, components=4, buckets=16, dot_buckets=4, width=32, layers=2,
                          heads=2, mlp_dim=64),
}
