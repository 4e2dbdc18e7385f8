"""MaskGIT (Chang et al. 2022): a bidirectional transformer writes a VQ token map in a few parallel
steps, text-conditional by cross-attention to the frozen MiniLM token states (as Muse conditions
on a frozen text encoder), with classifier-free guidance on the logits (Muse, "Classifier Free
Guidance": ``l_u + s (l_c - l_u)``).

Decoding is `t2i.tokens.sample_masked` (sec. 3.2: all tokens unknown at first; each step samples
every unknown one, keeps the most confident and re-masks the rest by the cosine schedule; the
confidence is the sampled token's log probability plus Gumbel noise annealed to 0). `steps` is the
number of decoding steps (model calls), `guidance` the CFG scale (1: conditional only), and the
negative prompt, when given, is the unconditional branch. The sampler "raster" decodes the same
network one token per call in raster order (`RasterOrder` + `sample_autoregressive`): the
autoregressive baseline MaskGIT's parallel decoding is measured against (speed and quality). The
tokens are decoded by the VQ tokenizer stored in the same file (`t2i.systems.token_models`), so a
model file needs no other. On a VQ-VAE-2 tokenizer the map is its two grids as one sequence (top grid,
then bottom; the transformer's `top_grid`), masked and decoded together, each grid's draws kept to its
own codebook (`keep_to`), decoded by the VQ-VAE-2's decoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.autoencoders.vq import VQ_CONFIGS, VQAutoencoder, VQAutoencoderConfig
from t2i.data.shapes_vocab import out_of_world_warning
from t2i.nets.token_transformer import TOKEN_TRANSFORMER_PRESETS, TokenTransformer, TokenTransformerConfig
from t2i.systems.base import GenerationDefaults, GenerationRequest, StepReport
from t2i.systems.token_models import (
    DRAW_OPTIONS,
    TokenPipeline,
    load_pipeline,
    network_configs,
    prefix_reporter,
    save_token_model,
    token_system,
)
from t2i.tokens import CFGTokenModel, GuidedCond, sample_autoregressive, sample_masked

SYSTEM_NAME = "maskgit"
OPTIONS = DRAW_OPTIONS | {"steps", "sampler", "guidance", "negative_prompt", "width", "height"}  # what run() honours
# "maskgit": parallel decoding in `steps` calls; "raster": one token per call in raster order, the
# autoregressive decoding of the same network (MaskGIT's sec. 4.4 comparison of the two orders)
SAMPLERS = ("maskgit", "raster")


@dataclass
class MaskGITConfig:
    """Everything needed to rebuild a MaskGIT model from its file (and its generation defaults).

    choice_temperature: the Gumbel noise scale of the confidences at the first step, annealed to 0
    (MaskGIT's official default 4.5); temperature: of the token draws; schedule: the mask schedule
    ("cosine", MaskGIT sec. 3.3, or "linear")."""

    net: TokenTransformerConfig = field(default_factory=lambda: replace(TOKEN_TRANSFORMER_PRESETS["shapes"]))
    vq: VQAutoencoderConfig = field(default_factory=lambda: replace(VQ_CONFIGS["f8"]))
    text_encoder: str = "minilm"
    text_length: int = 32
    steps: int = 8
    guidance: float = 3.0
    choice_temperature: float = 4.5
    temperature: float = 1.0
    schedule: str = "cosine"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskGITConfig:
        return cls(**network_configs(d, two_grids=True))


def text_conditioning(text_encoder: nn.Module, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The network's cross-attention inputs for prompts: context (B, T, 384) float32 and
    context_mask (B, T) bool, True on real tokens (left out for an encoder without a mask)."""
    enc = text_encoder.encode(prompts)
    cond = {"context": enc.context.float()}
    return cond if enc.mask is None else {**cond, "context_mask": enc.mask}  # None: every position is real


def load_text_encoder(name: str, length: int) -> nn.Module:
    """The frozen text encoder a token model's config names (MiniLM is the only one yet)."""
    if name != "minilm":
        raise ValueError(f"unknown text encoder {name!r} (expected 'minilm')")
    from t2i.text.encoders import MiniLMTextEncoder

    return MiniLMTextEncoder.load(max_length=length)


def keep_to(model: Any, allowed: torch.Tensor | None) -> Any:
    """A masked token model whose logits (B, N, V) are -inf outside `allowed` (N, V) bool (None: `model`
    itself). After guidance: CFG's difference of two -inf logits would be NaN."""
    if allowed is None:
        return model
    return lambda tokens, cond: model(tokens, cond).masked_fill(~allowed.to(tokens.device), float("-inf"))


class RasterOrder:
    """A masked token model read as an autoregressive one: ``model(prefix (B, T), cond) -> logits
    (B, T + 1, V)`` from the map with the prefix known and every position from T on masked, so
    that `sample_autoregressive` decodes the bidirectional network one token at a time in raster order."""

    def __init__(self, model: Any, num_tokens: int, mask_id: int) -> None:
        self.model, self.num_tokens, self.mask_id = model, num_tokens, mask_id

    def __call__(self, tokens: torch.Tensor, cond: Any) -> torch.Tensor:
        b, t = tokens.shape
        full = tokens.new_full((b, self.num_tokens), self.mask_id)  # (B, N)
        full[:, :t] = tokens
        return self.model(full, cond)[:, : t + 1]


class MaskGITPipeline(TokenPipeline):
    """A bidirectional token transformer, its tokenizer and the frozen text encoder.

    Args:
        net: the transformer (MaskGIT's reading: [MASK] = num_codes).
        vq: the frozen tokenizer.
        text_encoder: prompts -> TextEncoding (context, mask).
        cfg: the model config (its sampling settings are used: choice temperature, schedule).
    """

    family = SYSTEM_NAME
    options, samplers = OPTIONS, SAMPLERS

    def __init__(self, net: TokenTransformer, vq: VQAutoencoder, text_encoder: nn.Module, cfg: MaskGITConfig,
                 name: str = "maskgit", defaults: GenerationDefaults | None = None) -> None:
        if net.cfg.causal or net.cfg.context_dim is None:
            raise ValueError("MaskGIT needs a bidirectional transformer that cross-attends to text states")
        size = net.cfg.grid * vq.cfg.downsample_factor
        super().__init__(net, vq, name, defaults or GenerationDefaults(
            sampler="maskgit", steps=cfg.steps, guidance=cfg.guidance, width=size, height=size))
        self.text_encoder, self.cfg = text_encoder, cfg
        self.temperature = cfg.temperature

    def _resolve(self, request: GenerationRequest) -> GenerationRequest:
        r = super()._resolve(request)
        n = self.unet.cfg.num_tokens
        if r.sampler != "raster":
            return r
        if request.steps not in (None, n):
            raise ValueError(f"the raster sampler takes one step per token: steps must be {n} (or unset)")
        return replace(r, steps=n)

    def _check(self, r: GenerationRequest) -> None:
        if not 1 <= r.steps <= self.unet.cfg.num_tokens:
            raise ValueError(f"steps must be between 1 and the {self.unet.cfg.num_tokens} tokens, got {r.steps}")

    def prompt_warning(self, prompt: str) -> str | None:
        return out_of_world_warning(prompt)

    def conditioning(self, r: GenerationRequest, prompts: list[str], negatives: list[str]) -> GuidedCond:
        """The prompts' (and, when guided, the negatives') text conditioning, each text encoded once."""
        guided = r.guidance != 1.0
        texts = list(dict.fromkeys(prompts + (negatives if guided else [])))
        every = text_conditioning(self.text_encoder, texts)

        def pick(batch: list[str]) -> dict[str, torch.Tensor]:
            rows = torch.tensor([texts.index(t) for t in batch])
            return {k: v[rows] for k, v in every.items()}

        return GuidedCond(pick(prompts), pick(negatives) if guided else None)

    def sample_tokens(self, net: TokenTransformer, cond: GuidedCond, r: GenerationRequest,
                      generators: list[torch.Generator], report: Callable[[dict[str, Any]], None],
                      edit: dict[str, Any] | None = None) -> torch.Tensor:
        """(B, N) codes of `net`'s token map under CFG on its logits, by the request's sampler and this
        pipeline's draw settings (`net`: this pipeline's network, or another stage's, as Muse's base).
        edit: `edit_settings` of an inpainting / outpainting (parallel decoding only); report's "i"
        counts the steps run."""
        model = keep_to(CFGTokenModel(lambda tokens, c: net(tokens, **c), r.guidance), self.allowed_codes(net))
        c, n, draws = self.cfg, net.cfg.num_tokens, self.draws(r)
        if r.sampler == "raster":
            return sample_autoregressive(RasterOrder(model, n, net.cfg.mask_id), cond, n, generators=generators,
                                         **draws, callback=prefix_reporter(report, n))
        edit = {"schedule": c.schedule, **(edit or {})}
        first = edit.get("start_step", 0)
        return sample_masked(model, cond, n, steps=r.steps, mask_id=net.cfg.mask_id, generators=generators,
                             **edit, **draws, choice_temperature=c.choice_temperature,
                             callback=lambda info: report({"i": info["i"] - first, "denoised": info["pred"]}))

    def _sample(self, r: GenerationRequest, prompts: list[str], negatives: list[str],
                generators: list[torch.Generator], report: StepReport) -> torch.Tensor:
        return self.sample_tokens(self.unet, self.conditioning(r, prompts, negatives), r, generators, report)


# ---------------------------------------------------------------------------------------
# The t2i file: save, detect, load, a tiny one
# ---------------------------------------------------------------------------------------


def save_maskgit(net: TokenTransformer, vq: VQAutoencoder, cfg: MaskGITConfig, path: str | Path) -> None:
    """The transformer, the tokenizer and the resolved config in one safetensors file."""
    save_token_model(net, vq, dataclasses.asdict(cfg), path, SYSTEM_NAME)


def load(path: Path, dtype: torch.dtype = torch.float32) -> MaskGITPipeline:
    """A MaskGIT file (or a folder holding it as model.safetensors) -> MaskGITPipeline."""
    return load_pipeline(path, dtype, SYSTEM_NAME, "a t2i MaskGIT file", MaskGITConfig.from_dict,
                         lambda net, vq, cfg, name: MaskGITPipeline(
                             net, vq, load_text_encoder(cfg.text_encoder, cfg.text_length), cfg, name=name))


SYSTEM = token_system(SYSTEM_NAME, "MaskGIT: a masked token transformer reading MiniLM text states", load,
                      lambda vq: MaskGITConfig(net=replace(TOKEN_TRANSFORMER_PRESETS["tiny"]), vq=vq, steps=4))
