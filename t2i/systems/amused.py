"""aMUSEd (Patil et al. 2024), the open reproduction of Muse (Chang et al. 2023): text-to-image by
masked token modelling over a VQ-GAN's codebook.

prompt ──CLIP (penultimate states, projected text_embeds)──▶ context, pooled
all-masked token grid ──MaskGIT decoding (`t2i.tokens.sample_masked`) over the U-ViT's logits,
classifier-free guided (`CFGTokenModel`)──▶ codes ──VQ decoder──▶ image in [0, 1]

Decoding is diffusers' `AmusedPipeline` + `AmusedScheduler`: `steps` model calls (default 12),
cosine mask schedule, tokens drawn at temperature 1, re-masking confidence = log p + Gumbel noise
scaled by linspace(2, 0, steps), guidance 10 against the empty (or negative) prompt, and the
micro-conditions (width, height, crop (0, 0), aesthetic score 6). Image i of seed s draws from its
own CPU generator seeded s + i: for one image, diffusers' tokens with `generator=manual_seed(s)`.

Layout: a diffusers AmusedPipeline folder (`t2i.checkpoints.diffusers_amused`); `write_tiny` writes one.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from t2i.autoencoders.vq import VQ_CONFIGS, VQAutoencoder
from t2i.checkpoints.diffusers_amused import AmusedParts, is_amused_folder, load_amused_parts, save_amused_folder
from t2i.imageio import request_parameters, to_pil
from t2i.nets.uvit2d import UVIT2D_PRESETS, UVit2DModel
from t2i.quantize import precision_of
from t2i.seeds import seed_generators
from t2i.systems.base import (
    Capabilities,
    GenerationDefaults,
    GenerationRequest,
    GenerationResult,
    RequestMethods,
    StepReport,
    System,
    per_image,
)
from t2i.systems.latent_diffusion import stop_polling
from t2i.text.clip import CLIPTextConfig, CLIPTextModel
from t2i.text.clip_tokenizer import CLIPTokenizer
from t2i.text.encoders import CLIPTextEncoder
from t2i.tokens import CFGTokenModel, GuidedCond, sample_masked

NAME = "amused"
OPTIONS = frozenset({"negative_prompt", "steps", "guidance", "width", "height"})  # what run() honours
# diffusers' AmusedPipeline defaults: 12 steps, guidance 10, Gumbel scale linspace(2, 0, steps),
# micro-conditioning crop (0, 0) and aesthetic score 6
STEPS, GUIDANCE = 12, 10.0
CHOICE_TEMPERATURE = (2.0, 0.0)
CROP, AESTHETIC_SCORE = (0, 0), 6


class UVitTokenModel:
    """The U-ViT as a masked token model (`t2i.tokens.masked`): model(tokens (B, N), cond) -> (B, N, K)
    on a (h, w) grid; cond = {"context": (B, T, D), "pooled": (B, P), "micro_conds": (B, 5)}."""

    def __init__(self, net: UVit2DModel, grid: tuple[int, int]) -> None:
        self.net, self.grid = net, grid

    def __call__(self, tokens: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.net(tokens.view(tokens.shape[0], *self.grid), cond["context"], cond["pooled"],
                          cond["micro_conds"])  # (B, K, h, w)
        return logits.flatten(2).transpose(1, 2)  # (B, N, K)


class AmusedPipeline(RequestMethods):
    """A CLIP text encoder, the U-ViT token model and the VQ tokenizer of an aMUSEd folder.

    `unet` is the token transformer under the name `t2i.load`'s int8 precision looks for.
    """

    family = NAME

    def __init__(self, parts: AmusedParts, defaults: GenerationDefaults | None = None) -> None:
        self.transformer, self.vqvae, self.text_encoder = parts.transformer, parts.vqvae, parts.text_encoder
        self.mask_id, self.schedule, self.name = parts.mask_id, parts.schedule, parts.name
        self.factor = self.vqvae.cfg.downsample_factor
        # the transformer's 2x2 down/up stage needs an even token grid
        self.size_multiple = self.factor * (2 if self.transformer.cfg.downsample else 1)
        size = self.transformer.cfg.sample_size * self.factor
        self.defaults = defaults or GenerationDefaults(sampler="maskgit", steps=STEPS, guidance=GUIDANCE, width=size,
                                                       height=size)

    @property
    def unet(self) -> UVit2DModel:
        return self.transformer

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(options=OPTIONS, size_multiple=self.size_multiple,
                            native_size=(self.defaults.width, self.defaults.height))

    def _resolve(self, request: GenerationRequest) -> GenerationRequest:
        r = request.with_defaults(self.defaults)
        for what, v in (("width", r.width), ("height", r.height)):
            if v <= 0 or v % self.size_multiple:
                raise ValueError(f"{what} must be a positive multiple of {self.size_multiple}, got {v}")
        if r.steps < 1:
            raise ValueError(f"steps must be at least 1, got {r.steps}")
        if not math.isfinite(r.guidance):
            raise ValueError(f"guidance must be a finite number, got {r.guidance}")
        return r

    def conditioning(self, prompts: list[str], width: int, height: int) -> dict[str, torch.Tensor]:
        """The transformer's conditioning of each prompt: CLIP's penultimate states (B, 77, D), its
        projected text_embeds (B, P) and the micro-conditions (B, 5) for this image size."""
        enc = self.text_encoder.encode(prompts)
        micro = torch.tensor([[width, height, *CROP, AESTHETIC_SCORE]], dtype=enc.context.dtype)
        return {"context": enc.context, "pooled": enc.pooled, "micro_conds": micro.expand(len(prompts), -1)}

    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, h, w) codes -> (N, 3, h f, w f) float32 images in [0, 1] (aMUSEd's VQ works in [0, 1])."""
        return self.vqvae.decode_codes(tokens).float().clamp(0, 1)

    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """(N, h, w) codes -> N PIL images (also the server's picture of an interrupted run)."""
        return to_pil(self.decode_pixels(tokens) * 2 - 1)

    @torch.no_grad()
    def run(self, request: GenerationRequest) -> GenerationResult:
        """Generate request.num_images images per prompt; image i of seed s draws from seed s + i."""
        with stop_polling(request.should_stop, self.transformer):
            return self._generate(request)

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        start = time.perf_counter()
        r = self._resolve(request)
        prompts, negatives, seeds = per_image(r.prompt, r.negative_prompt, r.seed, r.num_images)
        grid = (r.height // self.factor, r.width // self.factor)
        # as diffusers: guidance <= 1 runs the conditional branch alone (no mixing below 1)
        guided = r.guidance > 1.0
        texts = list(dict.fromkeys(prompts + (negatives if guided else [])))
        every = self.conditioning(texts, r.width, r.height)  # each text encoded once

        def pick(batch: list[str]) -> dict[str, torch.Tensor]:
            index = torch.tensor([texts.index(t) for t in batch])
            return {k: v[index] for k, v in every.items()}

        cond = GuidedCond(pick(prompts), pick(negatives) if guided else None)
        model = CFGTokenModel(UVitTokenModel(self.transformer, grid), r.guidance)
        n = len(prompts)
        with StepReport.of(r, r.steps) as report:
            tokens = sample_masked(
                model, cond, grid[0] * grid[1], steps=r.steps, mask_id=self.mask_id,
                generators=seed_generators(seeds), schedule=self.schedule,
                choice_temperature=torch.linspace(*CHOICE_TEMPERATURE, r.steps),
                callback=lambda d: report({"i": d["i"], "denoised": d["pred"].view(n, *grid)}))
        tokens = tokens.view(n, *grid)  # (N, h, w)
        images = self.decode(tokens)
        for im, p, neg, sd in zip(images, prompts, negatives, seeds, strict=True):
            im.info["parameters"] = request_parameters(r, p, neg, sd, self.name, precision_of(self.transformer))
        return GenerationResult(images, tokens, seeds, [], time.perf_counter() - start)


def load(path: Path, dtype: torch.dtype = torch.float32) -> AmusedPipeline:
    """An AmusedPipeline folder -> AmusedPipeline (float32 weights unless dtype says otherwise)."""
    return AmusedPipeline(load_amused_parts(path, dtype))


# A tiny aMUSEd: 16x16 images as 4x4 tokens of a 32-code f=4 VQ, the U-ViT's tiny preset, a 2-layer
# CLIP with projection on the real vocabulary (the bundled tokenizer).
TINY_TEXT = CLIPTextConfig(width=32, layers=2, heads=2, mlp_dim=64, projection_dim=32)


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """A random aMUSEd folder `folder/tiny-amused` in diffusers' layout."""
    torch.manual_seed(seed)
    net = UVit2DModel(replace(UVIT2D_PRESETS["tiny"]))
    with torch.no_grad():  # a random tiny head gives near-uniform logits: sharpen them so prompts matter
        net.mlm_layer.conv2.weight.mul_(8)
    text = CLIPTextEncoder(CLIPTokenizer.default(), CLIPTextModel(TINY_TEXT), "penultimate", "text_embeds")
    vq = VQAutoencoder(replace(VQ_CONFIGS["tiny"]))
    with torch.no_grad():
        vq.quantize.codebook.normal_()  # distinct codes: distinct pictures for distinct tokens
    parts = AmusedParts(net, vq, text, mask_id=net.cfg.vocab_size - 1, name="tiny-amused")
    folder.mkdir(parents=True, exist_ok=True)
    return save_amused_folder(parts, folder / "tiny-amused")


SYSTEM = System(
    name=NAME,
    description="aMUSEd / Muse masked token model: a diffusers AmusedPipeline folder (model_index.json)",
    detect=lambda path: is_amused_folder(Path(path)),
    load=load,
    write_tiny=write_tiny,
)
