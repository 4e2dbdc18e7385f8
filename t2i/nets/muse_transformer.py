"""Muse's token super-resolution network (Chang et al. 2023, sec. 2.4): a bidirectional token transformer
over the high-res map cross-attending to [text states; the low-res tokens through a few self-attention
layers] (`t2i.systems.muse` is the family)."""

from __future__ import annotations

import torch
from torch import nn

from t2i.nets.token_transformer import TokenTransformer, TokenTransformerConfig
from t2i.nets.word_encoder import WordEncoder, WordEncoderConfig


class LowResEncoder(WordEncoder):
    """The low-res token map (B, n) -> states (B, n, width): Parti's bidirectional sequence encoder
    (`WordEncoder`: embedding, learned positions, self-attention blocks, LayerNorm) over the codes read
    as ids code + 1, so that its [PAD] id 0 never occurs and every position is attended to."""

    def forward(self, codes: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(codes + 1)["context"]


def low_res_config(net: TokenTransformerConfig, low_grid: int, layers: int) -> WordEncoderConfig:
    """The low-res encoder of a super-resolution network `net` reading a low_grid x low_grid map of its
    codebook: `layers` blocks of the network's own width, heads and MLP."""
    return WordEncoderConfig(vocab=net.num_codes + 1, length=low_grid * low_grid, width=net.width, layers=layers,
                             heads=net.heads, mlp_dim=net.mlp_dim)


class MuseTransformer(TokenTransformer):
    """Muse's token super-resolution transformer (this TokenTransformer: bidirectional over the high-res
    map, cross-attending to [text states; low-res states]), with its low-res encoder and, in a bundled
    model, the base network whose tokens it reads (`base`, a MaskGIT TokenTransformer; not called here).

    Args:
        cfg: the high-res network (context_dim: the text states' width).
        low_res: the low-res encoder (`low_res_config`).
        base: the base network's config (None while the super-resolution network trains alone).
    """

    def __init__(self, cfg: TokenTransformerConfig, low_res: WordEncoderConfig,
                 base: TokenTransformerConfig | None = None) -> None:
        if cfg.causal or cfg.context_dim is None:
            raise ValueError("Muse's super-resolution network is bidirectional and cross-attends to text states")
        if low_res.vocab != cfg.num_codes + 1 or (base is not None and base.num_tokens != low_res.length):
            raise ValueError("the low-res encoder reads the base's token map of the same codebook")
        super().__init__(cfg)
        self.low_res = LowResEncoder(low_res)
        self.low_res_proj = nn.Linear(low_res.width, cfg.context_dim)  # to the text states' width
        self.base = TokenTransformer(base) if base is not None else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The token transformer's scheme (N(0, 0.02), zero biases, zero image head) over the new parts."""
        super().initialize_weights()
        if getattr(self, "low_res", None) is not None:
            nn.init.normal_(self.low_res.position, std=0.02)

    def low_res_context(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res codes (B, n) -> their cross-attention states (B, n, context_dim)."""
        return self.low_res_proj(self.low_res(low_res))

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None,  # type: ignore[override]
                context_mask: torch.Tensor | None = None, low_res: torch.Tensor | None = None) -> torch.Tensor:
        """High-res logits (B, N, V) of `tokens` (B, N, [MASK] = num_codes) given the text states
        `context` (B, M, C) with `context_mask` (B, M) bool (None: all real) and the low-res codes
        `low_res` (B, n), which join the context as n more positions."""
        if low_res is None or context is None:
            raise ValueError("Muse's super-resolution network reads text states and low-res tokens")
        extra = self.low_res_context(low_res)  # (B, n, C)
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        context = torch.cat([context.to(extra.dtype), extra], dim=1)  # (B, M + n, C)
        mask = torch.cat([context_mask, context_mask.new_ones(extra.shape[:2])], dim=1)  # (B, M + n)
        return super().forward(tokens, context=context, context_mask=mask)
