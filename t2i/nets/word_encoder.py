"""A small bidirectional transformer over a sequence of ids: the caption encoder that Parti and DALL-E mini
train with their decoder (BART's encoder, small), and the reader of Muse's low-res token map."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2i.nets.token_transformer import TokenBlock
from t2i.text.words import PAD, SPECIALS


@dataclass
class WordEncoderConfig:
    """Shape of the caption encoder trained with the decoder (BART's / Parti's encoder, small).

    vocab: word ids (specials + words); length: caption tokens ([BOS] words [PAD] ...)."""

    vocab: int = len(SPECIALS) + 1
    length: int = 20
    width: int = 192
    layers: int = 2
    heads: int = 4
    mlp_dim: int = 768


class WordEncoder(nn.Module):
    """Caption ids (B, L) -> states (B, L, width): word embeddings plus learned positions, pre-norm
    blocks of bidirectional self-attention over the real words ([PAD] is never attended to), a final
    LayerNorm. The blocks are the decoder's (`TokenBlock`) without cross-attention."""

    def __init__(self, cfg: WordEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab, cfg.width)
        self.position = nn.Parameter(torch.zeros(1, cfg.length, cfg.width))
        self.blocks = nn.ModuleList(TokenBlock(cfg.width, cfg.heads, cfg.mlp_dim, None) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """ids (B, L) -> {"context": (B, L, width), "context_mask": (B, L) bool, True on real tokens}."""
        mask = ids != PAD  # (B, L); [BOS] is always real, so no row attends to nothing
        x = self.embedding(ids) + self.position[:, : ids.shape[1]]  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)
        return {"context": self.norm(x), "context_mask": mask}
