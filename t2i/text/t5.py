"""T5 encoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer") and its SentencePiece Unigram tokenizer.

Imagen / DeepFloyd IF and PixArt condition on the token states of a frozen T5 v1.1 XXL encoder;
this is that encoder, equal to transformers' `T5EncoderModel` (checked on random weights in
tests/test_t5.py). What sets T5 apart from BERT/CLIP:

* no position embeddings: a learned scalar per head and *relative-position bucket* is added to
  the attention logits (sec. 2.1 of the paper; bucketing from Mesh TensorFlow). Only the first
  layer owns the table; every layer adds the same bias.
* no 1/sqrt(d_head) on the logits (Mesh TensorFlow folds it into the initialization of q).
* pre-norm with RMS layer norm: scale only, no mean subtraction and no bias (Zhang & Sennrich
  2019), statistics in fp32.
* no biases anywhere. The feed-forward is ReLU (original T5) or gated GELU, wo(gelu_tanh(wi_0 x)
  * wi_1 x) (T5 v1.1 and Flan-T5, Shazeer 2020 "GLU Variants Improve Transformer").

The tokenizer reads a `tokenizer.json`, or the `spiece.model` that IF and PixArt ship alone
(parsed here, so neither sentencepiece nor protobuf is needed), and gives transformers' ids.
Parameter names are ours; transformers' names are mapped in `t2i.checkpoints.transformers_t5`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import Unigram
from torch import nn

from t2i.nets.attention import Attention
from t2i.text.clip_tokenizer import TokenizedBatch, pack


@dataclass
class T5Config:
    """Shape of a T5 encoder (field meanings as transformers' T5Config). Defaults: T5 v1.1 XXL,
    the encoder of DeepFloyd IF and PixArt-alpha/sigma."""

    vocab_size: int = 32128
    width: int = 4096  # d_model
    head_dim: int = 64  # d_kv
    mlp_dim: int = 10240  # d_ff
    layers: int = 24
    heads: int = 64
    relative_buckets: int = 32
    relative_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    gated: bool = True  # gated-gelu (v1.1, Flan) vs a plain ReLU feed-forward (original T5)
    activation: str = "gelu_tanh"  # "gelu_tanh" (transformers' gelu_new), "gelu" (erf) or "relu"


T5_PRESETS: dict[str, T5Config] = {
    "t5-v1_1-xxl": T5Config(),  # DeepFloyd IF, PixArt
    "t5-v1_1-xl": T5Config(width=2048, mlp_dim=5120, heads=32),
    "flan-t5-xl": T5Config(width=2048, mlp_dim=5120, heads=32),
    "t5-v1_1-base": T5Config(width=768, mlp_dim=2048, layers=12, heads=12),
    "t5-base": T5Config(width=768, mlp_dim=3072, layers=12, heads=12, gated=False, activation="relu"),
    "t5-small": T5Config(width=512, mlp_dim=2048, layers=6, heads=8, gated=False, activation="relu"),
}

ACTIVATIONS = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


# ---------------------------------------------------------------------------- helpers


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of each relative position (key index - query index), int64 in
    [0, num_buckets).

    Half the buckets are for keys after the query. Within a half, distances below
    num_buckets / 4 get a bucket each, larger ones share logarithmically wider buckets up to
    max_distance, beyond which all fall in the last bucket.
    """
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    # distance 0 would give log(0); those entries take the exact branch anyway
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RMSNorm(nn.Module):
    """T5 layer norm: x / rms(x) * weight, no mean subtraction, no bias; rms in fp32."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # (..., 1)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class UnscaledAttention(Attention):
    """The shared Attention (same projections, fusing and names) with T5's unscaled logits:
    softmax(q k^T + bias) v. `bias` carries the relative positions and the padding."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x: (B, T, D); bias: (B or 1, H, T, T) float, added to the logits. Returns (B, T, D)."""
        q, k, v = self._project(x, x)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.to_out(out.transpose(1, 2).flatten(2))


# ---------------------------------------------------------------------------- blocks


class T5FeedForward(nn.Module):
    """wo(act(wi x)) or, gated, wo(act(wi_0 x) * wi_1 x); no biases."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"unknown T5 activation {cfg.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.wi = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.gate = nn.Linear(cfg.width, cfg.mlp_dim, bias=False) if cfg.gated else None
        self.wo = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi(x))  # (B, T, F)
        if self.gate is not None:
            h = h * self.gate(x)
        return self.wo(h)


class T5Layer(nn.Module):
    """Pre-norm block: x + attn(norm1(x), bias), then x + mlp(norm2(x))."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.width, cfg.layer_norm_eps)
        self.attn = UnscaledAttention(cfg.width, cfg.heads, dim_head=cfg.head_dim, out_bias=False)
        self.norm2 = RMSNorm(cfg.width, cfg.layer_norm_eps)
        self.mlp = T5FeedForward(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias)  # (B, T, D)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------- model


class T5Encoder(nn.Module):
    """T5's encoder stack: token embedding, layers sharing one relative-position bias, final norm."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.relative_bias = nn.Embedding(cfg.relative_buckets, cfg.heads)
        self.layers = nn.ModuleList(T5Layer(cfg) for _ in range(cfg.layers))
        self.final_norm = RMSNorm(cfg.width, cfg.layer_norm_eps)

    def position_bias(self, length: int) -> torch.Tensor:
        """(1, H, T, T) learned bias of each (query, key) pair from its relative-position bucket."""
        pos = torch.arange(length, device=self.relative_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_buckets,
                                           self.cfg.relative_max_distance)  # (T, T)
        return self.relative_bias(buckets).permute(2, 0, 1)[None]  # (1, H, T, T)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids: (B, T) int64; attention_mask: (B, T), 1/True on real tokens (None: all real).
        Returns last_hidden_state (B, T, D); padding positions are computed too (they attend to
        the real tokens), as transformers does, since IF's U-Net reads the whole window."""
        x = self.token_embedding(ids)  # (B, T, D)
        bias = self.position_bias(ids.shape[1]).float()  # (1, H, T, T)
        if attention_mask is not None:
            # the most negative finite value, not -inf, as transformers: the same softmax
            blocked = torch.finfo(torch.float32).min * (~attention_mask.bool()).float()  # (B, T)
            bias = bias + blocked[:, None, None, :]  # (B, H, T, T)
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_norm(x)


# ---------------------------------------------------------------------------- tokenizer

# SentencePiece piece types (sentencepiece_model.proto): control (<pad>, </s>) and unknown
# pieces are special tokens, user-defined ones plain added tokens.
PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED = 2, 3, 4


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """A protobuf varint at buf[i]: (value as a signed 64-bit int, the index after it)."""
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return (value - (1 << 64) if value >= 1 << 63 else value), i


def _protobuf_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of one protobuf message, in order: varints as int,
    fixed 32/64-bit and length-delimited fields as raw bytes. Enough to read sentencepiece's
    ModelProto without the protobuf or sentencepiece packages."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i : i + n], i + n
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"not a sentencepiece model: protobuf wire type {wire}")
        yield key >> 3, value


def read_sentencepiece_model(path: str | Path) -> tuple[list[tuple[str, float, int]], int, bytes]:
    """A SentencePiece `spiece.model` -> (pieces as (text, score, type), unk_id, precompiled
    normalization charsmap). Fields used (sentencepiece_model.proto): ModelProto.pieces = 1,
    trainer_spec = 2 (model_type = 3, unk_id = 40), normalizer_spec = 3 (precompiled_charsmap = 2);
    SentencePiece.piece = 1, score = 2 (float), type = 3 (NORMAL = 1 when absent)."""
    pieces, unk_id, charsmap, model_type = [], 0, b"", 1
    for field, value in _protobuf_fields(Path(path).read_bytes()):
        if field == 1:
            piece = {1: b"", 2: b"\0\0\0\0", 3: 1} | dict(_protobuf_fields(value))  # type: ignore[arg-type]
            pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece[2])[0], piece[3]))
        elif field == 2:
            spec = dict(_protobuf_fields(value))  # type: ignore[arg-type]
            model_type, unk_id = spec.get(3, 1), spec.get(40, 0)
        elif field == 3:
            charsmap = dict(_protobuf_fields(value)).get(2, b"")  # type: ignore[arg-type, assignment]
    if model_type != 1:
        raise ValueError(f"{path}: a SentencePiece model of type {model_type}, T5 uses Unigram (1)")
    return pieces, unk_id, charsmap  # type: ignore[return-value]


def t5_tokenizer_from_spiece(path: str | Path, extra_ids: int = 100) -> Tokenizer:
    """The tokenizers-library equivalent of a T5 `spiece.model`, built as transformers builds it:
    Unigram over the pieces and scores, the model's precompiled normalization, whitespace split then
    Metaspace ("\u2581" before every word), control pieces and the `extra_ids` sentinels
    `<extra_id_N>` as special tokens (appended in reverse, so <extra_id_0> has the last id, as in
    the original T5 vocabulary)."""
    pieces, unk_id, charsmap = read_sentencepiece_model(path)
    tok = Tokenizer(Unigram([(text, score) for text, score, _ in pieces], unk_id=unk_id, byte_fallback=False))
    if charsmap:
        tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
    ])
    tok.add_special_tokens([t for t, _, kind in pieces if kind in (PIECE_UNKNOWN, PIECE_CONTROL)])
    tok.add_tokens([AddedToken(t, normalized=False) for t, _, kind in pieces if kind == PIECE_USER_DEFINED])
    tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(extra_ids))])
    return tok


class T5Tokenizer:
    """A T5 SentencePiece Unigram tokenizer (tokenizers library) producing TokenizedBatch.

    text `</s>` padded with `<pad>`: no start token. As transformers' T5 tokenizer with
    `truncation=True`, a prompt keeps max_length - 1 tokens before `</s>`; the cut is reported.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: we change its padding settings
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        ids = [tok.token_to_id(t) for t in ("</s>", "<pad>")]
        if None in ids:
            raise ValueError("a T5 tokenizer needs the tokens </s> and <pad>")
        self.eos_id, self.pad_id = ids

    @classmethod
    def from_file(cls, path: str | Path) -> T5Tokenizer:
        """A `tokenizer.json`."""
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_folder(cls, folder: str | Path) -> T5Tokenizer:
        """A transformers tokenizer folder (IF's / PixArt's `tokenizer/`): its `tokenizer.json`, or
        else its `spiece.model` with the sentinel count of `tokenizer_config.json` (default 100)."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls.from_file(folder / "tokenizer.json")
        if not (folder / "spiece.model").is_file():
            raise FileNotFoundError(f"{folder}: neither tokenizer.json nor spiece.model (not a T5 tokenizer folder)")
        config = folder / "tokenizer_config.json"
        extra = json.loads(config.read_text(encoding="utf-8")).get("extra_ids", 100) if config.is_file() else 100
        return cls(t5_tokenizer_from_spiece(folder / "spiece.model", extra))

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Untruncated ids of each text, without `</s>`."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def tokenize(self, texts: list[str], max_length: int = 77) -> TokenizedBatch:
        """ids (B, max_length): up to max_length - 1 tokens + `</s>`, then `<pad>`."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of strings")
        # `pack` puts a start token first; T5 has none, so pack one column wider with a
        # placeholder start and drop that column: the cut, eos and padding are then T5's.
        wide = pack(self.token_ids(texts), self.pad_id, self.eos_id, self.pad_id, max_length + 1)
        return TokenizedBatch(wide.ids[:, 1:], wide.lengths - 1, wide.truncated)
