"""Parti's network (Yu et al. 2022): the causal image-token decoder with cross-attention and, when the model
trains its own, the caption encoder it reads, in one module (`t2i.systems.parti` is the family)."""

from __future__ import annotations

import torch
from torch import nn

from t2i.nets.token_transformer import TokenTransformer, TokenTransformerConfig
from t2i.nets.word_encoder import WordEncoder, WordEncoderConfig


class PartiTransformer(TokenTransformer):
    """The decoder (this TokenTransformer: causal, [BOS] then image tokens, cross-attention) with the
    caption encoder it reads, when the model trains its own (`text_encoder`, None for MiniLM). One
    module, so that one optimizer, one EMA copy and the token families' file hold both."""

    def __init__(self, cfg: TokenTransformerConfig, encoder: WordEncoderConfig | None = None) -> None:
        super().__init__(cfg)
        self.text_encoder = WordEncoder(encoder) if encoder is not None else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The decoder's scheme (N(0, 0.02), zero biases, zero image head) over the encoder too."""
        super().initialize_weights()
        if getattr(self, "text_encoder", None) is not None:
            nn.init.normal_(self.text_encoder.position, std=0.02)

    def encode(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Caption ids (B, L) -> the decoder's cross-attention inputs (`WordEncoder.forward`)."""
        if self.text_encoder is None:
            raise ValueError("this Parti model reads frozen MiniLM states, not word ids")
        return self.text_encoder(ids)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor | None = None,  # type: ignore[override]
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                words: torch.Tensor | None = None) -> torch.Tensor:
        """Image logits (B, T + 1, V) of the tokens (B, T) after [BOS] (`text`, (B, 1)), reading either
        `words` (B, L) through the encoder (in the same call, so that a training step and DDP see one
        forward) or given states `context` (B, M, C) with `context_mask` (B, M)."""
        if words is not None:
            return super().forward(tokens, text, **self.encode(words))
        return super().forward(tokens, text, context, context_mask)
