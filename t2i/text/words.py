"""A word-level tokenizer over a fixed word list: the caption encoders that token models (DALL-E, Parti)
and GLIDE train from scratch read captions through it (the shapes world's words; `[UNK]` for the rest)."""

from __future__ import annotations

import re

import torch

SPECIALS = ("[PAD]", "[BOS]", "[UNK]")  # ids 0, 1, 2; the words follow
PAD, BOS, UNK = range(3)


class WordTokenizer:
    """Captions -> (B, length) ids over a word list: ``[BOS]`` then one id per word (lower case,
    letters only; a word outside the list is ``[UNK]``), cut to fit, then ``[PAD]``."""

    def __init__(self, words: list[str], length: int) -> None:
        self.words, self.length = list(words), length
        self.ids = {w: i + len(SPECIALS) for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.words)

    def split(self, text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def unknown(self, text: str) -> list[str]:
        """The words of text outside the vocabulary, each once."""
        return list(dict.fromkeys(w for w in self.split(text) if w not in self.ids))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(B, length) int64 ids."""
        out = torch.full((len(texts), self.length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [BOS, *(self.ids.get(w, UNK) for w in self.split(text))][: self.length]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
