"""DALL-E (Ramesh et al. 2021): a decoder-only transformer over one stream of text tokens then VQ
image tokens, written one token at a time.

The text is the caption in the model's own word vocabulary (DALL-E's BPE text tokens; here the
words of the shapes world's caption language, `t2i.data.shapes_vocab`, stored in the model's
config so that a file keeps the vocabulary it was trained with): ``[BOS] w1 .. wk [PAD] ..``,
``text_length`` tokens. Every image token sees every text token; among the image tokens the
self-attention mask is causal, optionally DALL-E's sparse row / column / convolutional masks by
layer (`t2i.tokens.masks`, the config's ``net.attention``). Sampling is
`t2i.tokens.sample_autoregressive` with the model's temperature, top-k and top-p (sampler
"multinomial"; "greedy" takes the most likely token), classifier-free guidance on the logits
against the empty caption or the negative prompt (not in DALL-E, which reranked instead; guidance
1 turns it off), and DALL-E's sample-and-rank is `--rerank K` with the shapes CLIP
(`t2i.eval.rerank`, which works on any pipeline). The tokenizer is stored in the same file
(`t2i.systems.token_models`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from t2i.autoencoders.vq import VQ_CONFIGS, VQAutoencoder, VQAutoencoderConfig
from t2i.data.shapes_vocab import out_of_world_warning, vocabulary
from t2i.nets.token_transformer import (
    TOKEN_TRANSFORMER_PRESETS,
    CachedDecoder,
    TokenTransformer,
    TokenTransformerConfig,
)
from t2i.systems.base import GenerationDefaults, GenerationRequest, ShippedModel, StepReport
from t2i.systems.token_models import (
    DRAW_OPTIONS,
    TokenPipeline,
    load_pipeline,
    network_configs,
    prefix_reporter,
    save_token_model,
    token_system,
)
from t2i.text.words import SPECIALS, WordTokenizer
from t2i.tokens import CFGTokenModel, GuidedCond, sample_autoregressive

SYSTEM_NAME = "dalle"
SMALL_DIR = Path(__file__).resolve().parent.parent / "assets" / "dalle_small"
SHIPPED = (ShippedModel("t2i-dalle-small", SMALL_DIR / "model.safetensors", "DALL-E small enough to ship: a 1.35 M-"
                        "parameter transformer over caption words and the 8x8 codes of a 0.99 M-parameter VQ-VAE "
                        "(fp16, 4.7 MB)", card=SMALL_DIR / "MODEL_CARD.md"),)
OPTIONS = DRAW_OPTIONS | {"sampler", "guidance", "negative_prompt", "width", "height"}  # what run() honours
SAMPLERS = ("multinomial", "greedy")
@dataclass
class DalleConfig:
    """Everything needed to rebuild a DALL-E model from its file (and its generation defaults).

    words: the text vocabulary after SPECIALS (the network's text_vocab = len(SPECIALS) + len(words)).
    temperature, top_k, top_p: the token draws (t2i.tokens.sample_logits; None: no cut)."""

    net: TokenTransformerConfig = field(default_factory=lambda: replace(TOKEN_TRANSFORMER_PRESETS["shapes"]))
    vq: VQAutoencoderConfig = field(default_factory=lambda: replace(VQ_CONFIGS["f8"]))
    words: list[str] = field(default_factory=lambda: sorted(vocabulary()))
    guidance: float = 3.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DalleConfig:
        return cls(**network_configs(d))

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer(self.words, self.net.text_length)


def dalle_net_config(preset: TokenTransformerConfig, words: list[str], text_length: int,
                     attention: str = "full") -> TokenTransformerConfig:
    """A preset's shape as DALL-E's causal stream: text tokens first, no cross-attention."""
    return replace(preset, causal=True, context_dim=None, text_vocab=len(SPECIALS) + len(words),
                   text_length=text_length, attention=attention)


class DallePipeline(TokenPipeline):
    """A causal [text; image] transformer, its tokenizer and its word vocabulary.

    The draws take `temperature`, `top_k` and `top_p` from the request, else from the model config
    (or the pipeline: `pipe.temperature = 0.8`).
    """

    family = SYSTEM_NAME
    options, samplers = OPTIONS, SAMPLERS

    def __init__(self, net: TokenTransformer, vq: VQAutoencoder, cfg: DalleConfig, name: str = "dalle",
                 defaults: GenerationDefaults | None = None) -> None:
        if not net.cfg.causal or not net.cfg.text_vocab:
            raise ValueError("DALL-E needs a causal transformer that reads text tokens first")
        if net.cfg.text_vocab != len(SPECIALS) + len(cfg.words):
            raise ValueError(f"{len(cfg.words)} words (+ {len(SPECIALS)} special tokens) for a text vocabulary of "
                             f"{net.cfg.text_vocab}")
        size = net.cfg.grid * vq.cfg.downsample_factor
        super().__init__(net, vq, name, defaults or GenerationDefaults(
            sampler="multinomial", steps=net.cfg.num_tokens, guidance=cfg.guidance, width=size, height=size))
        self.cfg, self.tokenize = cfg, cfg.tokenizer()
        self.temperature, self.top_k, self.top_p = cfg.temperature, cfg.top_k, cfg.top_p

    def _check(self, r: GenerationRequest) -> None:
        if r.sampler == "greedy":  # argmax draws nothing: a cut or temperature would be silently dropped
            given = [n for n in ("temperature", "top_k", "top_p") if getattr(r, n) is not None]
            if given:
                raise ValueError(f"the greedy sampler takes the most likely token; {', '.join(given)} apply to "
                                 "the multinomial sampler")

    def total_steps(self, r: GenerationRequest) -> int:
        return self.unet.cfg.num_tokens  # one model call per image token

    def prompt_warning(self, prompt: str) -> str | None:
        unknown = self.tokenize.unknown(prompt)
        return out_of_world_warning(prompt) or (f"{self.name} does not know {', '.join(map(repr, unknown))}: "
                                                "read as [UNK]" if unknown else None)

    def _sample(self, r: GenerationRequest, prompts: list[str], negatives: list[str],
                generators: list[torch.Generator], report: StepReport) -> torch.Tensor:
        guided = r.guidance != 1.0
        cond = GuidedCond(self.tokenize(prompts), self.tokenize(negatives) if guided else None)
        model = CFGTokenModel(CachedDecoder(self.unet), r.guidance)  # one new position per call
        n = self.unet.cfg.num_tokens
        draws = self.draws(r) | ({"temperature": 0.0} if r.sampler == "greedy" else {})  # 0: argmax, no draw
        return sample_autoregressive(model, cond, n, generators=generators, **draws,
                                     callback=prefix_reporter(report, n))

    def extra_parameters(self, r: GenerationRequest) -> dict[str, Any]:
        return {} if r.sampler == "greedy" else super().extra_parameters(r)


# ---------------------------------------------------------------------------------------
# The t2i file: save, detect, load, a tiny one
# ---------------------------------------------------------------------------------------


def save_dalle(net: TokenTransformer, vq: VQAutoencoder, cfg: DalleConfig, path: str | Path) -> None:
    """The transformer, the tokenizer and the resolved config (vocabulary included) in one file."""
    save_token_model(net, vq, dataclasses.asdict(cfg), path, SYSTEM_NAME)


def load(path: Path, dtype: torch.dtype = torch.float32) -> DallePipeline:
    """A DALL-E file (or a folder holding it as model.safetensors) -> DallePipeline."""
    return load_pipeline(path, dtype, SYSTEM_NAME, "a t2i DALL-E file", DalleConfig.from_dict, DallePipeline)


def tiny_config(vq: VQAutoencoderConfig) -> DalleConfig:
    """The tiny preset as DALL-E (12 text tokens over the shapes vocabulary) on a tokenizer config."""
    words = sorted(vocabulary())
    return DalleConfig(net=dalle_net_config(TOKEN_TRANSFORMER_PRESETS["tiny"], words, 12), vq=vq, words=words)


SYSTEM = token_system(SYSTEM_NAME, "DALL-E: an autoregressive [caption words; image tokens] transformer", load,
                      tiny_config, SHIPPED)
