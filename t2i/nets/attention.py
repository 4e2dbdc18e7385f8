"""Multi-head attention, the one implementation every family shares.

Self-attention, cross-attention (U-Net spatial transformers, GLIDE/Imagen text
conditioning), causal attention (CLIP text, autoregressive token models) and padded
attention (BERT) are all this module with different arguments. Parameter names follow
the diffusers layout (`to_q`, `to_k`, `to_v`, `to_out.0`) so SD checkpoints load
without renaming; other layouts (CLIP's `q_proj`, BERT's `query`) are mapped at the edge
in `t2i.checkpoints`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Scaled dot-product attention over tokens.

    Args:
        dim: width of the query tokens (and of the output).
        heads: number of heads.
        dim_head: width of one head; defaults to dim // heads.
        context_dim: width of the key/value tokens for cross-attention; None means
            self-attention over the query tokens.
        qkv_bias: whether the q/k/v projections have a bias (CLIP, BERT: yes; SD U-Net: no).
        out_bias: whether the output projection has a bias.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int | None = None,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        dim_head = dim_head or dim // heads
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        # A Sequential so the weights are `to_out.0.*`, as in the reference layout.
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=out_bias))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """x: (B, N, dim); context: (B, M, context_dim) or None for self-attention.

        mask: optional (B, M) bool, True where a key may be attended to (padding off), or
        a float additive bias broadcastable to (B, heads, N, M). causal: each query sees
        only keys at or before its own position. Returns (B, N, dim).
        """
        if causal and mask is not None:
            raise ValueError("pass either a mask or causal=True, not both")
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh)
        if mask is not None and mask.dtype == torch.bool and mask.dim() == 2:
            mask = mask[:, None, None, :]  # (B, 1, 1, M)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, dim)
