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

Inpainting and outpainting are Muse's zero-shot editing, diffusers' `AmusedInpaintPipeline`: the
init image's tokens are kept where the mask is black and masked where it is white (the mask resized
to the token grid), and only the last int(steps * strength) steps run, on the linear schedule.

Layout: a diffusers AmusedPipeline folder (`t2i.checkpoints.diffusers_amused`); `write_tiny` writes one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from t2i.autoencoders.vq import VQ_CONFIGS, VQAutoencoder
from t2i.checkpoints.diffusers_amused import AmusedParts, is_amused_folder, load_amused_parts, save_amused_folder
from t2i.nets.uvit2d import UVIT2D_PRESETS, UVit2DModel
from t2i.systems.base import Capabilities, GenerationDefaults, GenerationRequest, StepReport, System
from t2i.systems.token_models import (
    DRAW_OPTIONS,
    EDIT_OPTIONS,
    TokenPipeline,
    check_edit_request,
    check_token_request,
    edit_steps,
)
from t2i.text.clip import CLIPTextConfig, CLIPTextModel
from t2i.text.clip_tokenizer import CLIPTokenizer
from t2i.text.encoders import CLIPTextEncoder
from t2i.tokens import CFGTokenModel, GuidedCond, sample_masked

NAME = "amused"
OPTIONS = DRAW_OPTIONS | EDIT_OPTIONS | {"negative_prompt", "steps", "sampler", "guidance", "width",
                                         "height"}  # what run() honours
SAMPLERS = ("maskgit",)  # parallel decoding, the only one (named so that the PNG parameters say how)
# diffusers' AmusedPipeline defaults: 12 steps, guidance 10, Gumbel scale linspace(2, 0, steps),
# micro-conditioning crop (0, 0) and aesthetic score 6
STEPS, GUIDANCE = 12, 10.0
CHOICE_TEMPERATURE = (2.0, 0.0)
CROP, AESTHETIC_SCORE = (0, 0), 6
# diffusers' AmusedInpaintPipeline sets its scheduler's masking_schedule to "linear"
EDIT_SCHEDULE = "linear"


class UVitTokenModel:
    """The U-ViT as a masked token model (`t2i.tokens.masked`): model(tokens (B, N), cond) -> (B, N, K)
    on a (h, w) grid; cond = {"context": (B, T, D), "pooled": (B, P), "micro_conds": (B, 5)}."""

    def __init__(self, net: UVit2DModel, grid: tuple[int, int]) -> None:
        self.net, self.grid = net, grid

    def __call__(self, tokens: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.net(tokens.view(tokens.shape[0], *self.grid), cond["context"], cond["pooled"],
                          cond["micro_conds"])  # (B, K, h, w)
        return logits.flatten(2).transpose(1, 2)  # (B, N, K)


class AmusedPipeline(TokenPipeline):
    """A CLIP text encoder, the U-ViT token model (`unet`, the name int8 precision looks for) and
    the VQ tokenizer of an aMUSEd folder. Codes are (N, h, w): any size the VQ factor (times 2 with
    the U-ViT's down/up stage) divides, the token grid of `sample_size` being the native one."""

    family = NAME

    def __init__(self, parts: AmusedParts, defaults: GenerationDefaults | None = None) -> None:
        factor = parts.vqvae.cfg.downsample_factor
        size = parts.transformer.cfg.sample_size * factor
        super().__init__(parts.transformer, parts.vqvae, parts.name, defaults or GenerationDefaults(
            sampler=SAMPLERS[0], steps=STEPS, guidance=GUIDANCE, width=size, height=size))
        self.text_encoder, self.mask_id, self.schedule = parts.text_encoder, parts.mask_id, parts.schedule
        self.factor = factor
        # the transformer's 2x2 down/up stage needs an even token grid
        self.size_multiple = factor * (2 if self.unet.cfg.downsample else 1)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(options=OPTIONS, samplers=SAMPLERS, size_multiple=self.size_multiple,
                            native_size=(self.defaults.width, self.defaults.height))

    def _resolve(self, request: GenerationRequest) -> GenerationRequest:
        r = request.with_defaults(self.defaults)
        check_token_request(r, SAMPLERS)
        for what, v in (("width", r.width), ("height", r.height)):
            if v <= 0 or v % self.size_multiple:
                raise ValueError(f"{what} must be a positive multiple of {self.size_multiple}, got {v}")
        if r.steps < 1:
            raise ValueError(f"steps must be at least 1, got {r.steps}")
        return check_edit_request(r)

    def total_steps(self, r: GenerationRequest) -> int:
        """Model calls: the last int(steps * strength) of the steps when editing, as diffusers."""
        return edit_steps(r)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> codes (1, h w): aMUSEd's VQ reads [0, 1]."""
        return super().encode_image((image + 1) / 2)

    def prompt_warning(self, prompt: str) -> str | None:
        """A prompt longer than CLIP's window is cut (as diffusers cuts it): say so."""
        window = self.text_encoder.max_length
        if self.text_encoder.tokenizer.tokenize([prompt], window).truncated[0]:
            return f"prompt {prompt[:40]!r} was cut to the text encoder's {window} tokens"
        return None

    def conditioning(self, prompts: list[str], width: int, height: int) -> dict[str, torch.Tensor]:
        """The transformer's conditioning of each prompt: CLIP's penultimate states (B, 77, D), its
        projected text_embeds (B, P) and the micro-conditions (B, 5) for this image size."""
        enc = self.text_encoder.encode(prompts)
        micro = torch.tensor([[width, height, *CROP, AESTHETIC_SCORE]], dtype=enc.context.dtype)
        return {"context": enc.context, "pooled": enc.pooled, "micro_conds": micro.expand(len(prompts), -1)}

    @torch.no_grad()
    def decode_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, h, w) codes -> (N, 3, h f, w f) images in [-1, 1]: aMUSEd's VQ decodes to [0, 1],
        clipped there as diffusers clips it, then mapped."""
        dtype = next(self.vq.parameters()).dtype
        return self.vq.decode(self.vq.quantize.lookup(codes).to(dtype)).float().clamp(0, 1) * 2 - 1

    def _sample(self, r: GenerationRequest, prompts: list[str], negatives: list[str],
                generators: list[torch.Generator], report: StepReport) -> torch.Tensor:
        grid = (r.height // self.factor, r.width // self.factor)
        # as diffusers: guidance <= 1 runs the conditional branch alone (no mixing below 1)
        guided = r.guidance > 1.0
        texts = list(dict.fromkeys(prompts + (negatives if guided else [])))
        every = self.conditioning(texts, r.width, r.height)  # each text encoded once

        def pick(batch: list[str]) -> dict[str, torch.Tensor]:
            index = torch.tensor([texts.index(t) for t in batch])
            return {k: v[index] for k, v in every.items()}

        cond = GuidedCond(pick(prompts), pick(negatives) if guided else None)
        model = CFGTokenModel(UVitTokenModel(self.unet, grid), r.guidance)
        n = len(prompts)
        edit = self.edit_settings(r, grid, n, EDIT_SCHEDULE)  # the masked tokens only, over the last steps
        first = edit.get("start_step", 0)
        settings = {"schedule": self.schedule, **edit, **self.draws(r)}  # diffusers: temperature 1, no cut
        tokens = sample_masked(
            model, cond, grid[0] * grid[1], steps=r.steps, mask_id=self.mask_id, generators=generators,
            choice_temperature=torch.linspace(*CHOICE_TEMPERATURE, r.steps), **settings,
            callback=lambda d: report({"i": d["i"] - first, "denoised": d["pred"].view(n, *grid)}))
        return tokens.view(n, *grid)  # (N, h, w)


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
