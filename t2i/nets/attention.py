"""Multi-head attention, the one implementation every family shares.

Self-attention, cross-attention (U-Net spatial transformers, GLIDE/Imagen text
conditioning), causal attention (CLIP text, autoregressive token models) and padded
attention (BERT) are all this module with different arguments. Parameter names follow
the diffusers layout (`to_q`, `to_k`, `to_v`, `to_out.0`) so SD checkpoints load
without renaming; other layouts (CLIP's `q_proj`, BERT's `query`) are mapped at the edge
in `t2i.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Callable

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
        self.is_cross = context_dim is not None
        # Inference-only speed-ups, off until `fuse_projections()` / `cache_context = True`:
        # fused: [to_q; to_k; to_v] (self-attention) or [to_k; to_v] (cross-attention) stacked
        # into one weight so one GEMM reads the input once; kept out of the state dict so
        # checkpoints keep the reference names.
        self.fused_weight: torch.Tensor | None = None
        self.fused_bias: torch.Tensor | None = None
        # cache_context: cross-attention keeps the K/V of the last context it saw; sampling
        # passes the same text tokens at every step, so they are projected once per image.
        self.cache_context = False
        self._kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # logit_bias: set while sampling by a guidance trick that edits the attention map (paint-with-words,
        # t2i.diffusion.paint_with_words): logits (B, H, N, M) -> an additive bias of that shape. None (the
        # default) keeps the fused scaled_dot_product_attention path untouched.
        self.logit_bias: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module.unfuse_projections())

    def fuse_projections(self) -> None:
        """Stack the input projections into one inference weight (call after loading weights;
        loading a state dict again undoes it). Used only when autograd is off, so training
        always runs the separate, trainable projections."""
        parts = [self.to_k, self.to_v] if self.is_cross else [self.to_q, self.to_k, self.to_v]
        self.fused_weight = torch.cat([p.weight.detach() for p in parts])  # (n * inner, in)
        has_bias = parts[0].bias is not None
        self.fused_bias = torch.cat([p.bias.detach() for p in parts]) if has_bias else None  # type: ignore[misc]

    def unfuse_projections(self) -> None:
        """Drop the fused weight and any cached K/V (weights changed, or to save memory)."""
        self.fused_weight = self.fused_bias = None
        self._kv_cache = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # `.to(dtype)` / `.to(device)` must move the fused copy with the parameters.
        super()._apply(fn, recurse)
        if self.fused_weight is not None:
            self.fused_weight = fn(self.fused_weight)
            self.fused_bias = None if self.fused_bias is None else fn(self.fused_bias)
        self._kv_cache = None
        return self

    def _project(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q, k, v), each (B, N or M, inner), through the fused weight when there is one."""
        fused = self.fused_weight is not None and not torch.is_grad_enabled()
        if not self.is_cross and context is x:
            if fused:
                return F.linear(x, self.fused_weight, self.fused_bias).chunk(3, dim=-1)
            return self.to_q(x), self.to_k(x), self.to_v(x)
        q = self.to_q(x)
        if not self.is_cross:  # a self-attention module given separate tokens: no fused K/V for them
            return q, self.to_k(context), self.to_v(context)
        cache = self.cache_context and not torch.is_grad_enabled()
        if cache and self._kv_cache is not None:
            ctx, k, v = self._kv_cache
            if ctx.shape == context.shape and ctx.dtype == context.dtype and torch.equal(ctx, context):
                return q, k, v
        if fused:
            k, v = F.linear(context, self.fused_weight, self.fused_bias).chunk(2, dim=-1)
        else:
            k, v = self.to_k(context), self.to_v(context)
        if cache:
            self._kv_cache = (context.clone(), k, v)
        return q, k, v

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
        q, k, v = self._project(x, context)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh)
        if mask is not None and mask.dtype == torch.bool and mask.dim() == 2:
            mask = mask[:, None, None, :]  # (B, 1, 1, M)
        if self.logit_bias is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        else:
            out = self._biased_attention(q, k, v, mask, causal)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, dim)

    def _biased_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          causal: bool) -> torch.Tensor:
        """softmax(L + mask + logit_bias(L)) V with L = Q K^T / sqrt(d), in float32: the explicit form,
        since the bias reads the logits themselves (eDiff-I's max). q: (B, H, N, Dh), k, v: (B, H, M, Dh)
        -> (B, H, N, Dh) in v's dtype."""
        if causal:
            raise ValueError("a logit bias is for cross-attention, not causal attention")
        assert self.logit_bias is not None
        logits = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, N, M)
        bias = self.logit_bias(logits)  # from the logits before any mask (a -inf would be the max)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
        return ((logits + bias).softmax(dim=-1) @ v.float()).to(v.dtype)
