"""Parti (Yu et al. 2022) and DALL-E mini (Dayma et al. 2021): an encoder-decoder transformer writes
VQ image tokens one at a time, the caption read by cross-attention.

Parti (seed 000, 5.1.6) turns DALL-E's decoder-only stream into a text encoder and an image-token
decoder: the encoder reads the caption, the decoder is causal over the image tokens and takes the
encoder's states as keys and values in a cross-attention sublayer of every block. DALL-E mini
(5.1.10) is the same shape, "BART" (a bidirectional encoder trained with the decoder) over VQGAN
tokens, with "super-conditioning" (classifier-free guidance on logits against the empty caption)
and CLIP reranking. Here both are one family with two presets (`PRESETS`), never two copies:

- the decoder is `t2i.nets.token_transformer.TokenTransformer` with ``causal=True`` and
  cross-attention (``context_dim``); its stream starts with a one-token "text" of a one-word
  vocabulary, which is Parti's [BOS] (the learned state that predicts image token 0), so that
  the causal contract and `CachedDecoder`'s KV cache are DALL-E's, unchanged;
- the text encoder is either `WordEncoder`, a small bidirectional transformer over the caption's
  words trained with the decoder (its weights live inside the model, `PartiTransformer`), or the
  frozen MiniLM token states (as MaskGIT and the diffusion models read them);
- sampling is DALL-E's: `t2i.tokens.sample_autoregressive` through the KV cache, temperature,
  top-k, top-p (request fields), "greedy"; guidance is `CFGTokenModel` on the logits, the
  unconditional branch the empty caption (or the negative prompt); Parti's and DALL-E mini's
  reranking is `--rerank K` with the shapes CLIP (`t2i.eval.rerank`, any pipeline).

What the presets set (the rest is shared): see `PRESETS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.autoencoders.vq import VQ_CONFIGS, VQAutoencoder, VQAutoencoderConfig
from t2i.checkpoints.limits import check_config
from t2i.data.shapes_vocab import vocabulary
from t2i.nets.parti_transformer import PartiTransformer
from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS, TokenTransformerConfig
from t2i.nets.word_encoder import WordEncoderConfig
from t2i.systems.base import GenerationDefaults
from t2i.systems.dalle import DallePipeline
from t2i.systems.maskgit import load_text_encoder, text_conditioning
from t2i.systems.token_models import TokenPipeline, load_pipeline, network_configs, save_token_model, token_system
from t2i.text.words import SPECIALS, WordTokenizer

SYSTEM_NAME = "parti"
TEXT_ENCODERS = ("words", "minilm")
MINILM_WIDTH = 384


def start_tokens(batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 1) the decoder's [BOS]: the only word of its one-word "text" vocabulary."""
    return torch.zeros(batch, 1, dtype=torch.long, device=device)


def decoder_config(preset: TokenTransformerConfig, context_dim: int, attention: str = "full") -> TokenTransformerConfig:
    """A token transformer preset as Parti's decoder: causal, [BOS] first, cross-attention to context_dim."""
    return replace(preset, causal=True, context_dim=context_dim, text_vocab=1, text_length=1, attention=attention)


# ---------------------------------------------------------------------------------------
# The model config and the presets
# ---------------------------------------------------------------------------------------


@dataclass
class PartiConfig:
    """Everything needed to rebuild a Parti / DALL-E mini model from its file (and its defaults).

    preset: which branch member it was made as ("parti", "dalle-mini"; a name, for the parameters).
    text_encoder: "words" (`encoder`, trained with the decoder, over `words`) or "minilm" (frozen).
    text_length: caption tokens ([BOS] + words + [PAD]; MiniLM's window for "minilm").
    guidance: CFG scale on logits (DALL-E mini's "condition scale"); temperature, top_k, top_p:
    the token draws (None: no cut)."""

    net: TokenTransformerConfig = field(default_factory=lambda: decoder_config(TOKEN_TRANSFORMER_PRESETS["shapes"],
                                                                                 192))
    vq: VQAutoencoderConfig = field(default_factory=lambda: replace(VQ_CONFIGS["f8"]))
    preset: str = "parti"
    text_encoder: str = "words"
    encoder: WordEncoderConfig | None = field(default_factory=WordEncoderConfig)
    words: list[str] = field(default_factory=lambda: sorted(vocabulary()))
    text_length: int = 20
    guidance: float = 3.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"unknown text encoder {self.text_encoder!r}; choose one of {', '.join(TEXT_ENCODERS)}")
        if (self.encoder is not None) != (self.text_encoder == "words"):
            raise ValueError("a word encoder config goes with text_encoder 'words' only")
        width = self.encoder.width if self.encoder is not None else MINILM_WIDTH
        if self.net.context_dim != width or not self.net.causal or self.net.text_length != 1:
            raise ValueError(f"Parti's decoder is causal, starts with one [BOS] and cross-attends to {width}-wide "
                             "text states")
        if self.encoder is not None and self.encoder.vocab != len(SPECIALS) + len(self.words):
            raise ValueError(f"{len(self.words)} words for an encoder vocabulary of {self.encoder.vocab}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PartiConfig:
        d = network_configs(d)
        if d.get("encoder") is not None:
            d["encoder"] = WordEncoderConfig(**d["encoder"])
            check_config(d["encoder"], "Parti's text encoder")  # bounds before the meta build
        return cls(**d)

    def network(self) -> PartiTransformer:
        """The encoder-decoder this config describes (`t2i.systems.token_models.build_network`)."""
        return PartiTransformer(self.net, self.encoder)

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer(self.words, self.text_length)


@dataclass(frozen=True)
class Preset:
    """What a branch member sets: its text encoder, the word encoder's depth against the decoder's (when
    it has one), its guidance scale, and the decoder's shape when a run names none."""

    text_encoder: str
    encoder_layers: int | None  # None: as many as the decoder (BART's balanced encoder-decoder)
    guidance: float
    about: str
    decoder: str = "shapes"  # a TOKEN_TRANSFORMER_PRESETS name (`t2i train parti --net-preset` overrides it)


PRESETS: dict[str, Preset] = {
    # Parti: a pretrained text encoder (Parti's is pretrained, then trained on; here the frozen MiniLM, which
    # trained better than a 2-layer word encoder from scratch at equal steps on the shapes world, f8 codes, a
    # 3-layer width-96 decoder, batch 16: held-out loss 3.79 vs 3.91 after 300 steps, 3.32 vs 3.42 after 600;
    # caption-vs-empty gap 0.10 vs 0.05) in front of a deep decoder; with --text-encoder words, a 2-layer word
    # encoder (Parti-20B: 16 encoder and 64 decoder layers).
    "parti": Preset("minilm", 2, 3.0, "Parti: pretrained (frozen MiniLM) text states read by a deep causal "
                    "decoder, CFG on logits"),
    # DALL-E mini: BART, an encoder as deep as the decoder trained from scratch over the caption's words;
    # "super-conditioning" (CFG against the empty caption).
    "dalle-mini": Preset("words", None, 3.0, "DALL-E mini: a BART-like encoder-decoder (the encoder as deep as "
                         "the decoder, trained from scratch over words), super-conditioning"),
    # Parti small enough to ship: frozen MiniLM states (not in the file) read by a 3-layer width-96 decoder (the
    # shape of the encoder comparison above), 0.72 M parameters; with the ViT-VQGAN f8 tokenizer (1.66 M) the
    # model file is 4.78 MB in fp16 (the VQ-VAE f8 tokenizer alone is 7.8 MB).
    "parti-small": Preset("minilm", 2, 3.0, "Parti, small enough to ship (<= 5 MB in fp16 with a ViT-VQGAN f8 "
                          "tokenizer): frozen MiniLM states read by a 3-layer width-96 causal decoder",
                          decoder="small"),
}


def model_config(preset: str, decoder: TokenTransformerConfig, vq: VQAutoencoderConfig, *,
                 text_encoder: str | None = None, text_length: int = 20, attention: str = "full") -> PartiConfig:
    """A new model's config: `decoder`'s shape (a TOKEN_TRANSFORMER_PRESETS entry, on the tokenizer's
    codebook and map) as Parti's decoder, the preset's text encoder (or `text_encoder`) at the
    decoder's width, over the shapes vocabulary."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Parti preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    kind = text_encoder or p.text_encoder
    words = sorted(vocabulary())
    encoder = None
    if kind == "words":
        encoder = WordEncoderConfig(vocab=len(SPECIALS) + len(words), length=text_length, width=decoder.width,
                                    layers=p.encoder_layers or decoder.layers, heads=decoder.heads,
                                    mlp_dim=decoder.mlp_dim)
    net = decoder_config(replace(decoder, num_codes=vq.num_codes, grid=vq.sample_size // vq.downsample_factor),
                         encoder.width if encoder else MINILM_WIDTH, attention)
    return PartiConfig(net=net, vq=vq, preset=preset, text_encoder=kind, encoder=encoder, words=words,
                       text_length=text_length if kind == "words" else 32, guidance=p.guidance)


# ---------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------


class Conditioner:
    """Prompts -> the decoder's cond ``{"text": [BOS] (B, 1), "context", "context_mask"}`` through the
    model's word encoder, or the frozen MiniLM (a fixed window, so two batches' states concatenate)."""

    def __init__(self, net: PartiTransformer, cfg: PartiConfig, minilm: nn.Module | None = None) -> None:
        self.net, self.words = net, cfg.tokenizer() if cfg.text_encoder == "words" else None
        if minilm is None and self.words is None:
            minilm = load_text_encoder("minilm", cfg.text_length)
        self.minilm = minilm

    def unknown(self, text: str) -> list[str]:
        """The words of text outside the vocabulary, each once (none for MiniLM, which reads any)."""
        return self.words.unknown(text) if self.words is not None else []

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.words is not None:
            cond = self.net.encode(self.words(texts).to(self.net.position.device))
        else:
            cond = text_conditioning(self.minilm, texts)
        dtype = self.net.position.dtype
        return {"text": start_tokens(len(texts), self.net.position.device),
                **{k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}}


class PartiPipeline(DallePipeline):
    """Parti's encoder-decoder, its tokenizer and its text encoder.

    DALL-E's pipeline with another conditioning: the prompt reaches the decoder through the encoder's
    states (`Conditioner`, as `self.tokenize`) instead of a text prefix in the stream; sampling,
    guidance, the KV cache, the token draws and the PNG parameters are DALL-E's.
    """

    family = SYSTEM_NAME

    def __init__(self, net: PartiTransformer, vq: VQAutoencoder, cfg: PartiConfig, name: str = "parti",
                 defaults: GenerationDefaults | None = None, minilm: nn.Module | None = None) -> None:
        if not net.cfg.causal or net.cfg.context_dim is None:
            raise ValueError("Parti needs a causal decoder that cross-attends to text states")
        size = net.cfg.grid * vq.cfg.downsample_factor
        # not DallePipeline.__init__, which checks DALL-E's text stream (Parti's holds only [BOS])
        TokenPipeline.__init__(self, net, vq, name, defaults or GenerationDefaults(
            sampler="multinomial", steps=net.cfg.num_tokens, guidance=cfg.guidance, width=size, height=size))
        self.cfg, self.tokenize = cfg, Conditioner(net, cfg, minilm)
        self.temperature, self.top_k, self.top_p = cfg.temperature, cfg.top_k, cfg.top_p


# ---------------------------------------------------------------------------------------
# The t2i file: save, detect, load, a tiny one
# ---------------------------------------------------------------------------------------


def save_parti(net: PartiTransformer, vq: VQAutoencoder, cfg: PartiConfig, path: str | Path) -> None:
    """The encoder-decoder, the tokenizer and the resolved config (vocabulary included) in one file."""
    save_token_model(net, vq, dataclasses.asdict(cfg), path, SYSTEM_NAME)


def load(path: Path, dtype: torch.dtype = torch.float32) -> PartiPipeline:
    """A Parti / DALL-E mini file (or a folder holding it as model.safetensors) -> PartiPipeline."""
    return load_pipeline(path, dtype, SYSTEM_NAME, "a t2i Parti file", PartiConfig.from_dict,
                         lambda net, vq, cfg, name: PartiPipeline(net, vq, cfg, name=name))


def tiny_config(vq: VQAutoencoderConfig, preset: str = "parti", text_encoder: str | None = None) -> PartiConfig:
    """The tiny decoder preset as Parti (a 12-token word encoder by default) on a tokenizer config."""
    return model_config(preset, TOKEN_TRANSFORMER_PRESETS["tiny"], vq, text_encoder=text_encoder, text_length=12)


SYSTEM = token_system(SYSTEM_NAME, "Parti / DALL-E mini: a text encoder and a causal image-token decoder reading "
                      "it by cross-attention", load, tiny_config)
