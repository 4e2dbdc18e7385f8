"""Attention over the pixels of a feature map: the LDM "spatial transformer" (self-attention,
cross-attention to the text tokens, GEGLU feed-forward; Rombach et al. 2022, Sec. 3.3) of the
U-Nets, and the plain single-head self-attention of the SD VAE's middle.

Both flatten (B, C, H, W) to (B, HW, C) tokens, run `Attention`, and fold back with a residual.
Attribute names follow diffusers (`proj_in`, `transformer_blocks`, `ff.net.0.proj`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.attention import Attention


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2 * dim_out, value * gelu(gate)."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim_out)."""
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, dim -> mult * dim -> dim. `net` is a ModuleList so the weights are
    `net.0.proj.*` and `net.2.*` (net.1 is the parameter-free dropout), as in the reference."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, GEGLU FF.

    Args:
        dim: token width. heads, head_dim: attention shape (heads * head_dim may differ from dim).
        context_dim: width of the context tokens (text encoder hidden states).
        only_cross_attention: the first attention also attends to the context instead of
            the pixels (a diffusers option; no SD checkpoint uses it).
        eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        only_cross_attention: bool = False,
        dropout: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        # attn1 is self-attention unless only_cross_attention, when it too reads the context.
        self.attn1 = Attention(dim, heads, head_dim, context_dim if only_cross_attention else None)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim); context: (B, T, context_dim) -> (B, N, dim)."""
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on context tokens (LDM Sec. 3.3).

    GroupNorm, proj_in (1x1 conv in SD1, a Linear on tokens in SD2/SDXL), `depth`
    TransformerBlocks, proj_out, plus a residual around the whole thing.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,
        linear_projection: bool = False,
        only_cross_attention: bool = False,
        groups: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, only_cross_attention, dropout)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, T, context_dim) -> (B, C, H, W)."""
        if context is None:
            raise ValueError("SpatialTransformer needs context tokens (B, T, context_dim)")
        b, _, h, w = x.shape
        y = self.norm(x)
        if self.linear_projection:
            y = self.proj_in(y.flatten(2).transpose(1, 2))  # (B, HW, inner)
        else:
            y = self.proj_in(y).flatten(2).transpose(1, 2)  # (B, HW, inner)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_projection:
            y = self.proj_out(y).transpose(1, 2).reshape(b, -1, h, w)  # (B, C, H, W)
        else:
            y = self.proj_out(y.transpose(1, 2).reshape(b, -1, h, w))  # (B, C, H, W)
        return x + y


class SpatialSelfAttention(Attention):
    """Single-head-by-default self-attention over the pixels of a feature map, with a
    GroupNorm in front and a residual around it (the SD VAE mid-block attention).

    Subclasses `Attention` so the parameters sit flat next to the projections
    (`group_norm.*`, `to_q.*`, ..., `to_out.0.*`), as in the reference layout.
    """

    def __init__(self, channels: int, heads: int = 1, groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__(channels, heads, channels // heads, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W). `context` is accepted (and must be None) so level
        blocks can call every spatial attention the same way."""
        if context is not None:
            raise ValueError("SpatialSelfAttention is self-attention only")
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        out = super().forward(tokens)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)

