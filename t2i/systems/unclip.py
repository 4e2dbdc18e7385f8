"""unCLIP / DALL-E 2 (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents").

Two stages on a frozen CLIP (sec. 2):

    prompt --CLIP text--> (text embedding z_t, token states) --prior--> image embedding z_i
           --decoder(z_i, text)--> 64x64 image --super-resolution x2--> 256 / 1024 image

- the **prior** (`t2i.nets.prior_transformer`) is a diffusion model over CLIP image embeddings whose network
  predicts z_i itself (x0), sampled with classifier-free guidance by dropping the text; or the paper's
  autoregressive alternative (`t2i.nets.ar_prior`: PCA components of z_i quantized into codes, drawn one by one
  by a causal transformer after a dot-product token from the top half of its distribution, CFG on the logits);
- the **decoder** (`t2i.nets.unclip_unet`) is GLIDE's pixel U-Net conditioned on z_i (projected into the
  timestep embedding and into four extra context tokens) and the text, guided by dropping both (a learned
  null image embedding); it learns its variance (IDDPM), sampled ancestrally with it;
- the **super-resolution** U-Nets see the noisy image next to the bicubic-upsampled small one, no guidance
  (Karlo: one network for every step but the last, `super_res_last` for the last).

Every stage is ancestral DDPM over UnCLIPScheduler's spacing (round(i (T - 1) / (n - 1)), T-1 down to 0) of the
cosine schedule, through the shared samplers (`sample_ddpm`, `sample_ddpm_learned` for the learned variance);
one generator per image draws, in order, the prior's noise, the decoder's, then super-resolution's (the same
numbers diffusers' UnCLIPPipeline draws from one generator for one image).

What unCLIP is for, as methods here (sec. 3): `variations` (encode an image with CLIP's image tower, decode
with new noise), `interpolate` (slerp between two images' embeddings, fixed decoder noise), `text_diff` (rotate
an image's embedding towards the difference of two captions' embeddings), and the paper's trick of drawing
`prior_candidates` prior samples and keeping the one closest to the text (sec. 2.2, "we generate two samples of
z_i and pick the one with a higher dot product with z_t").

Through the Pipeline protocol a request with an `init_image` is a variation of it (unCLIP's img2img: `t2i generate
--init-image`, the server's img2img); `strength` rotates the image's embedding towards the prior's sample for the
prompt. Interpolation and text diffs are methods here and `t2i unclip ...` (`t2i.systems.unclip_cli`).

Layouts: diffusers' `UnCLIPPipeline` folders (Karlo) and `UnCLIPImageVariationPipeline` folders (CLIP image tower,
no prior; `t2i.checkpoints.diffusers_unclip`), and t2i's own file (one safetensors: `prior.*`, `text_proj.*`,
`decoder.*` [, `super_res_first.*`, `super_res_last.*`], the resolved `UnCLIPConfig` in its metadata) on our shapes
CLIP (`t2i.eval.shapes_clip`), what `t2i train unclip-prior` / `unclip-decoder` write.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from t2i.checkpoints.diffusers_unclip import (
    UnCLIPSchedulerConfig,
    is_diffusers_unclip,
    prior_config_from_diffusers,
    prior_state_dict_from_diffusers,
    scheduler_config_from_diffusers,
    text_proj_config_from_diffusers,
    unet_config_from_diffusers,
)
from t2i.checkpoints.io import (
    is_system_file,
    load_component_weights,
    model_name,
    read_json_object,
    save_with_config,
    system_file,
)
from t2i.checkpoints.limits import build_checked, fill, load_system_file
from t2i.checkpoints.transformers_text import load_clip_text_folder
from t2i.diffusion.guidance import CFGDenoiser
from t2i.diffusion.schedules import respaced_sigmas
from t2i.imageio import request_parameters, to_pil
from t2i.nets.ar_prior import ARPrior, ARPriorConfig
from t2i.nets.prior_transformer import PRIOR_PRESETS, PriorConfig, PriorTransformer
from t2i.nets.token_transformer import CachedDecoder
from t2i.nets.unclip_unet import UNCLIP_UNET_PRESETS, TextProj, TextProjConfig, UnCLIPUNet, UnCLIPUNetConfig
from t2i.quantize import precision_of
from t2i.samplers.diffusers_plan import SamplingPlan
from t2i.samplers.learned_variance import sample_guided
from t2i.seeds import seed_generators, seed_noise
from t2i.systems.base import (
    Capabilities,
    GenerationDefaults,
    GenerationRequest,
    GenerationResult,
    RequestMethods,
    StepReport,
    System,
    check_sampling_request,
    per_image,
    stop_polling,
)
from t2i.text.clip_tokenizer import CLIPTokenizer
from t2i.tokens import CFGTokenModel, GuidedCond, sample_autoregressive

SYSTEM_NAME = "unclip"
# what run() honours; init_image (+ strength) is unCLIP's own img2img: a variation (see `run`)
OPTIONS = frozenset({"steps", "guidance", "negative_prompt", "width", "height", "init_image", "strength"})
SAMPLERS = ("ddpm",)


# ---------------------------------------------------------------------------------------
# The frozen CLIP: text -> (embedding, token states, mask); images -> embeddings
# ---------------------------------------------------------------------------------------


@dataclass
class TextCondition:
    """CLIP's reading of a batch of texts: embeds (B, E) the text embedding z_t; states (B, T, E) the final
    token states; mask (B, T) bool, True on real tokens. warnings: prompts cut to fit."""

    embeds: torch.Tensor
    states: torch.Tensor
    mask: torch.Tensor
    warnings: list[str] = field(default_factory=list)


class KarloCLIP(nn.Module):
    """OpenAI CLIP's text tower (`CLIPTextModelWithProjection`) and its BPE tokenizer, 77 tokens; Karlo's
    CLIP embeddings are the raw projections (not unit-normalised). `vision` (a `VisionTransformer` with its
    projection) and `preprocess` (`CLIPImagePreprocess`) are optional: an UnCLIPPipeline folder has no image
    tower, an UnCLIPImageVariationPipeline folder has one."""

    def __init__(self, text: nn.Module, tokenizer: CLIPTokenizer, vision: nn.Module | None = None,
                 preprocess: Any = None) -> None:
        super().__init__()
        self.text, self.tokenizer, self.vision, self.preprocess = text, tokenizer, vision, preprocess

    def encode_text(self, texts: list[str]) -> TextCondition:
        batch = self.tokenizer.tokenize(list(texts), self.text.cfg.max_positions)
        out = self.text(batch.ids)
        warnings = [f"prompt cut to {self.text.cfg.max_positions} tokens: {t!r}"
                    for t, cut in zip(texts, batch.truncated, strict=True) if cut]
        return TextCondition(out.text_embeds, out.last_hidden_state, batch.attention_mask, warnings)

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        if self.vision is None:
            raise ValueError("this unCLIP model has no CLIP image tower (a diffusers UnCLIPPipeline folder holds "
                             "the text tower only): variations, interpolation and text diffs need one")
        pixels = self.preprocess(images).to(self.vision.patch_embedding.weight.dtype)  # (B, 3, S, S)
        return self.vision(pixels).image_embeds  # (B, E)


class ShapesCLIPEncoder(nn.Module):
    """Our shapes-world CLIP (`t2i.eval.shapes_clip.ShapesCLIP`) as unCLIP's CLIP: unit-norm embeddings (the
    space its contrastive loss trained), its word tokenizer padded to max_tokens."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def encode_text(self, texts: list[str]) -> TextCondition:
        from t2i.eval.shapes_clip import PAD

        ids = self.clip.tokenizer.encode(list(texts))  # (B, T'), T' <= max_tokens
        ids = F.pad(ids, (0, self.clip.cfg.max_tokens - ids.shape[1]), value=PAD)  # (B, T)
        out = self.clip.text(ids)
        return TextCondition(F.normalize(out.text_embeds, dim=-1), out.last_hidden_state, ids != PAD)

    @property
    def embed_dim(self) -> int:
        return self.clip.cfg.embed_dim

    @property
    def text_tokens(self) -> int:
        return self.clip.cfg.max_tokens

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.clip.embed_images(images)  # (B, E), unit norm

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] at the CLIP's image size -> (B, E) unit-norm embeddings (training)."""
        return self.clip.encode_images(pixels)


# ---------------------------------------------------------------------------------------
# Sampling one stage
# ---------------------------------------------------------------------------------------


def unclip_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """UnCLIPScheduler's spacing: round(i (T - 1) / (n - 1)) for i < n, from T - 1 down to 0 (Karlo's)."""
    if steps < 2:
        raise ValueError(f"unCLIP stages take at least 2 steps, got {steps}")
    ratio = (num_train_timesteps - 1) / (steps - 1)
    return [int(t) for t in (np.arange(0, steps) * ratio).round()[::-1]]


def stage_plan(schedule: UnCLIPSchedulerConfig, steps: int) -> SamplingPlan:
    """Ancestral DDPM over the stage's respaced cosine schedule, x0 clipped as its config says."""
    acp = schedule.alphas_cumprod()
    sigmas, timesteps = respaced_sigmas(acp, unclip_timesteps(schedule.num_train_timesteps, steps))
    limit = ("clip", schedule.clip_sample_range) if schedule.clip_sample else None
    return SamplingPlan("ddpm", sigmas, timesteps, float((sigmas[0] ** 2 + 1) ** 0.5), acp, schedule.prediction_type,
                        {}, limit, steps)


class SuperResolution(nn.Module):
    """Karlo's two super-resolution networks as one: `last` for the final step (t = 0), `first` before it;
    the noisy image is concatenated with the upsampled low-resolution one (low_res (B, 3, H, W))."""

    def __init__(self, first: UnCLIPUNet, last: UnCLIPUNet) -> None:
        super().__init__()
        self.first, self.last = first, last

    def forward(self, x: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        net = self.last if bool((t == 0).all()) else self.first
        return net(torch.cat([x, low_res.to(x.dtype)], dim=1), t)  # (B, 3, H, W) eps


class StageReport(StepReport):
    """One progress count over the stages: steps numbered after the earlier stages' (`offset`); the prior's
    x0 is an embedding, not an image, so live previews (on_sample) are given for image stages only."""

    offset = 0
    images = True

    def __call__(self, info: dict) -> None:
        on_sample = self.on_sample
        self.on_sample = on_sample if self.images else None
        try:
            super().__call__({**info, "i": info["i"] + self.offset})
        finally:
            self.on_sample = on_sample

    def stage(self, offset: int, images: bool) -> StageReport:
        self.offset, self.images = offset, images
        return self


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the directions of a and b (B, E) at t in [0, 1], the norms interpolated
    linearly (unCLIP sec. 3.2: z_{i_theta} = slerp(z_i1, z_i2, theta))."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))  # (B, 1)
    so = torch.sin(omega)
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / so
    return direction * ((1 - t) * na + t * nb)


# ---------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------


@dataclass
class StageSettings:
    """The settings of the stages a GenerationRequest has no field for (its steps and guidance are the
    decoder's). prior_candidates: prior samples drawn per image, the one closest to the text kept (paper: 2).
    embedding_guidance: the decoder's guidance when it decodes image embeddings without a caption (variations,
    interpolations, text diffs), where the embedding is the only condition to guide towards."""

    prior_steps: int = 25
    prior_guidance: float = 4.0
    super_res_steps: int = 7
    prior_candidates: int = 1
    # Karlo's variation pipeline default; on the shapes unCLIP (session 21, 25 held-out scenes x 2) variations
    # kept their source's verdict 4% at 3 (the text-to-image default), 16% at 8, 10% at 15
    embedding_guidance: float = 8.0


class UnCLIPPipeline(RequestMethods):
    """unCLIP: CLIP + prior + decoder (+ super-resolution). See the module docstring.

    Args:
        clip: `KarloCLIP` or `ShapesCLIPEncoder` (encode_text, encode_images).
        prior, prior_schedule: the prior network and its UnCLIPScheduler settings: the diffusion prior (x0
            prediction) or the autoregressive one (`ARPrior`, no schedule); no prior (an image-variation model):
            requests need an init image.
        text_proj, decoder, decoder_schedule: the decoder's conditioning projection, its U-Net and schedule.
        super_res, super_res_schedule: (first, last) super-resolution U-Nets and their schedule, or None.
    """

    family = SYSTEM_NAME

    def __init__(self, clip: nn.Module, prior: PriorTransformer | ARPrior | None, prior_schedule: UnCLIPSchedulerConfig,
                 text_proj: TextProj, decoder: UnCLIPUNet, decoder_schedule: UnCLIPSchedulerConfig,
                 super_res: tuple[UnCLIPUNet, UnCLIPUNet] | None = None,
                 super_res_schedule: UnCLIPSchedulerConfig | None = None, *, name: str = SYSTEM_NAME,
                 defaults: GenerationDefaults | None = None, settings: StageSettings | None = None) -> None:
        # the decoder is `unet`: t2i.load's int8 precision quantizes pipe.unet
        self.clip, self.prior, self.text_proj, self.unet = clip, prior, text_proj, decoder
        self.prior_schedule, self.decoder_schedule = prior_schedule, decoder_schedule
        self.super_res = SuperResolution(*super_res) if super_res is not None else None
        self.super_res_schedule = super_res_schedule or UnCLIPSchedulerConfig()
        self.name = name
        size = self.output_size
        self.defaults = defaults or GenerationDefaults(sampler="ddpm", steps=25, guidance=8.0, width=size, height=size)
        self.settings = settings or StageSettings()

    # ------------------------------------------------------------------ what it can do
    @property
    def output_size(self) -> int:
        return self.super_res.first.cfg.sample_size if self.super_res is not None else self.unet.cfg.sample_size

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.unet.cfg.block_channels) - 1)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(options=OPTIONS, samplers=SAMPLERS, size_multiple=self.size_multiple,
                            native_size=(self.output_size, self.output_size),
                            max_steps=self.decoder_schedule.num_train_timesteps)

    def with_settings(self, **settings: Any) -> UnCLIPPipeline:
        """Change the prior / super-resolution settings (`StageSettings` fields) of later calls. Returns self."""
        self.settings = replace(self.settings, **settings)
        return self

    def _decoder_size(self, r: GenerationRequest) -> int:
        """The decoder's side for a resolved request: any square multiple of size_multiple without
        super-resolution; with it, the native size only (its stages are trained for their sizes)."""
        if r.width != r.height or r.width <= 0 or r.width % self.size_multiple:
            raise ValueError(f"unCLIP makes square images with a side that is a multiple of {self.size_multiple}; "
                             f"got {r.width}x{r.height}")
        if self.super_res is not None:
            if r.width != self.output_size:
                raise ValueError(f"this unCLIP model's super-resolution makes {self.output_size}x{self.output_size} "
                                 f"images only, got {r.width}x{r.height}")
            return self.unet.cfg.sample_size
        return r.width

    # ------------------------------------------------------------------ stages
    def encode_text(self, texts: list[str]) -> TextCondition:
        return self.clip.encode_text(list(texts))

    @property
    def prior_steps(self) -> int:
        """Steps of one prior sample: the diffusion prior's sampling steps, or the autoregressive prior's codes."""
        return self.prior.cfg.components if isinstance(self.prior, ARPrior) else self.settings.prior_steps

    def sample_prior(self, cond: TextCondition, uncond: TextCondition, generators: list[torch.Generator],
                     steps: int | None = None, guidance: float | None = None, callback: Any = None) -> torch.Tensor:
        """(B, E) CLIP image embeddings for the texts, drawn from the prior (CLIP's scale, denormalised).
        steps: the diffusion prior's (the autoregressive prior draws one code per component)."""
        if self.prior is None:
            raise ValueError(f"{self.name} has no prior (an image-variation model): give an init image, whose "
                             "variations it makes (strength 0)")
        s = self.settings
        guide = s.prior_guidance if guidance is None else guidance
        if isinstance(self.prior, ARPrior):
            return self._sample_ar_prior(self.prior, cond, uncond, generators, guide, callback)
        plan = stage_plan(self.prior_schedule, steps or s.prior_steps)
        dtype = self.prior.proj_in.weight.dtype

        def args(c: TextCondition) -> dict[str, torch.Tensor]:
            return {"text_embeds": c.embeds.to(dtype), "text_states": c.states.to(dtype), "text_mask": c.mask}

        x = plan.start(seed_noise(generators, (self.prior.cfg.embed_dim,)))  # (B, E)
        denoiser = plan.limit_x0(CFGDenoiser(plan.denoiser(self.prior), guide))
        z = plan.finish(plan.run(denoiser, x, {"cond": args(cond), "uncond": args(uncond)}, callback, generators))
        z = z * self.prior_schedule.final_scale()
        return self.prior.denormalize(z.to(dtype)).float()

    @staticmethod
    def _sample_ar_prior(prior: ARPrior, cond: TextCondition, uncond: TextCondition,
                         generators: list[torch.Generator], guidance: float, callback: Any) -> torch.Tensor:
        """(B, E) image embeddings drawn code by code from the autoregressive prior (sec. 2.2): each image's
        generator draws its dot-product token (the top half of the training distribution), then its codes;
        guided on the logits against the empty caption with the null dot token."""
        dots = prior.quantizer.sample_dot_tokens(generators)  # (B,)
        null = torch.full_like(dots, prior.cfg.null_dot)
        guided = GuidedCond(prior.condition(dots, cond.embeds, cond.states, cond.mask),
                            prior.condition(null, uncond.embeds, uncond.states, uncond.mask))
        model = CFGTokenModel(CachedDecoder(prior.transformer), guidance)  # one new position per call
        codes = sample_autoregressive(model, guided, prior.cfg.components, generators=generators, callback=callback)
        return prior.quantizer.decode(codes)  # (B, E) float32

    def sample_decoder(self, image_embeds: torch.Tensor, cond: TextCondition, uncond: TextCondition,
                       generators: list[torch.Generator], steps: int, guidance: float, size: int | None = None,
                       callback: Any = None) -> torch.Tensor:
        """(B, 3, S, S) images in [-1, 1] decoded from image embeddings (B, E) and the texts; guided by
        dropping both (the learned null image embedding, the uncond texts)."""
        dtype = self.text_proj.embedding_proj.weight.dtype
        n = image_embeds.shape[0]

        def args(image: torch.Tensor, c: TextCondition) -> dict[str, torch.Tensor]:
            return self.text_proj(image.to(dtype), c.embeds.to(dtype), c.states.to(dtype), c.mask)

        plan = stage_plan(self.decoder_schedule, steps)
        size = size or self.unet.cfg.sample_size
        x = plan.start(seed_noise(generators, (3, size, size)))  # (B, 3, S, S)
        learned = self.unet.cfg.out_channels == 2 * 3 and self.decoder_schedule.variance_type == "learned_range"
        x = sample_guided(plan, self.unet, x, args(image_embeds, cond), args(self.text_proj.null_image(n), uncond),
                          guidance, generators, callback, learned_variance=learned)
        return (x * self.decoder_schedule.final_scale()).clamp(-1, 1)

    def super_resolve(self, small: torch.Tensor, generators: list[torch.Generator], steps: int | None = None,
                      callback: Any = None) -> torch.Tensor:
        """(B, 3, s, s) -> (B, 3, S, S) in [-1, 1] (unguided), or `small` itself without super-resolution."""
        if self.super_res is None:
            return small
        size = self.super_res.first.cfg.sample_size
        low = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        plan = stage_plan(self.super_res_schedule, steps or self.settings.super_res_steps)
        x = plan.start(seed_noise(generators, (3, size, size)))
        denoiser = plan.limit_x0(plan.denoiser(self.super_res))
        x = plan.finish(plan.run(denoiser, x, {"low_res": low}, callback, generators))
        return (x * self.super_res_schedule.final_scale()).clamp(-1, 1)

    def pick_closest(self, candidates: list[torch.Tensor], text_embeds: torch.Tensor) -> torch.Tensor:
        """Per row, the candidate image embedding with the highest dot product with the text embedding
        (unCLIP sec. 2.2). candidates: k tensors (B, E); text_embeds: (B, E) -> (B, E)."""
        stack = torch.stack(candidates)  # (k, B, E)
        scores = (stack * text_embeds.float()[None]).sum(-1)  # (k, B)
        return stack[scores.argmax(0), torch.arange(stack.shape[1])]

    # ------------------------------------------------------------------ Pipeline protocol
    def _resolve(self, request: GenerationRequest, from_embeddings: bool = False) -> GenerationRequest:
        """The request with the model's defaults. Decoding image embeddings without a caption (from_embeddings,
        or a variation of an init image) guides by `StageSettings.embedding_guidance` unless told otherwise."""
        captionless = not any([request.prompt] if isinstance(request.prompt, str) else request.prompt)
        if (from_embeddings or request.init_image is not None) and captionless and request.guidance is None:
            request = replace(request, guidance=self.settings.embedding_guidance)
        r = request.with_defaults(self.defaults)
        check_sampling_request(r, SAMPLERS)  # the size: `_decoder_size` (square, the decoder's)
        if r.strength is not None and not 0.0 <= r.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {r.strength}")
        return r

    @torch.no_grad()
    def run(self, request: GenerationRequest) -> GenerationResult:
        """Generate request.num_images images per prompt; image i of seed s draws all its noise from seed s + i.

        With an init_image the request is a variation of it (unCLIP's img2img): the decoder decodes the image's
        CLIP embedding, read with the prompt as its text; strength s > 0 first rotates that embedding towards the
        prior's sample for the prompt, slerp(z_image, z_prior, s) (0 or unset: the image's own embedding, no prior
        run, exactly `variations`; 1: plain text-to-image)."""
        nets = [net for net in (self.prior, self.unet, self.super_res) if net is not None]
        with stop_polling(request.should_stop, *nets):
            start = time.perf_counter()
            r = self._resolve(request)
            size = self._decoder_size(r)
            prompts, negatives, seeds = per_image(r.prompt, r.negative_prompt, r.seed, r.num_images)
            cond, uncond = self.encode_text(prompts), self.encode_text(negatives)
            generators = seed_generators(seeds)
            s = self.settings
            sr_steps = s.super_res_steps if self.super_res is not None else 0
            total = self.prior_steps * s.prior_candidates + r.steps + sr_steps
            use_prior = r.init_image is None or bool(r.strength)
            if not use_prior:
                total -= self.prior_steps * s.prior_candidates
            with StageReport.of(r, total) as report:
                embeds = self.embed_images([r.init_image]).expand(len(prompts), -1) if r.init_image else None
                offset = 0
                if use_prior:
                    candidates = [self.sample_prior(cond, uncond, generators,
                                                    callback=report.stage(k * self.prior_steps, False))
                                  for k in range(s.prior_candidates)]
                    drawn = self.pick_closest(candidates, cond.embeds) if len(candidates) > 1 else candidates[0]
                    embeds = drawn if embeds is None else slerp(embeds, drawn, float(r.strength))
                    offset = self.prior_steps * s.prior_candidates
                small = self.sample_decoder(embeds, cond, uncond, generators, r.steps, r.guidance, size,
                                            report.stage(offset, True))
                images = self.super_resolve(small, generators, callback=report.stage(offset + r.steps, True))
            return self._result(images, r, prompts, negatives, seeds, cond.warnings, start)

    def _result(self, images: torch.Tensor, r: GenerationRequest, prompts: list[str], negatives: list[str],
                seeds: list[int], warnings: list[str], start: float, note: str = "") -> GenerationResult:
        pictures = to_pil(images)
        for im, p, neg, sd in zip(pictures, prompts, negatives, seeds, strict=True):
            im.info["parameters"] = request_parameters(r, p, neg, sd, self.name, precision_of(self.unet)) + note
        return GenerationResult(pictures, images, seeds, list(dict.fromkeys(warnings)), time.perf_counter() - start)

    # ------------------------------------------------------------------ what unCLIP is for (sec. 3)
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, E) CLIP image embeddings, in the scale the prior produces."""
        return self.clip.encode_images(list(images)).float()

    @torch.no_grad()
    def decode(self, image_embeds: torch.Tensor, prompt: str = "", seed: int | list[int] | None = None,
               note: str = "", **settings: Any) -> GenerationResult:
        """Images from given CLIP image embeddings (N, E): image i from seed s + i (or seed[i]); the decoder
        reads `prompt` as its text (the empty caption by default, as image variations do). settings: steps,
        guidance (the decoder's; unset without a prompt: `StageSettings.embedding_guidance`), width/height,
        progress, callback."""
        start = time.perf_counter()
        n = image_embeds.shape[0]
        seeds = seed if isinstance(seed, list) else per_image("", "", seed, n)[2]
        if len(seeds) != n:
            raise ValueError(f"{n} embeddings but {len(seeds)} seeds")
        r = self._resolve(GenerationRequest(prompt, seed=seeds[0], num_images=n, **settings), from_embeddings=True)
        size = self._decoder_size(r)
        cond = self.encode_text([prompt] * n)
        uncond = self.encode_text([""] * n)
        generators = seed_generators(seeds)
        sr_steps = self.settings.super_res_steps if self.super_res is not None else 0
        with StageReport.of(r, r.steps + sr_steps) as report:
            small = self.sample_decoder(image_embeds, cond, uncond, generators, r.steps, r.guidance, size,
                                        report.stage(0, True))
            images = self.super_resolve(small, generators, callback=report.stage(r.steps, True))
        return self._result(images, r, [prompt] * n, [""] * n, seeds, cond.warnings, start, note)

    def variations(self, image: Image.Image, num_images: int = 4, seed: int | None = None,
                   **settings: Any) -> GenerationResult:
        """Variations of an image (unCLIP sec. 3.1, Fig. 3): its CLIP image embedding decoded with new noise."""
        z = self.embed_images([image]).expand(num_images, -1)  # (N, E)
        return self.decode(z, seed=seed, note=", unCLIP: variation", **settings)

    def interpolate(self, image_a: Image.Image, image_b: Image.Image, num_images: int = 5, seed: int | None = None,
                    **settings: Any) -> GenerationResult:
        """Images along the slerp from image_a's CLIP embedding to image_b's (unCLIP sec. 3.2, Fig. 4), all
        decoded from the same seed (the paper fixes the decoder noise along the path)."""
        za, zb = self.embed_images([image_a, image_b]).chunk(2)
        path = torch.cat([slerp(za, zb, float(t)) for t in torch.linspace(0, 1, num_images)])  # (N, E)
        s = per_image("", "", seed, 1)[2][0]
        return self.decode(path, seed=[s] * num_images, note=", unCLIP: interpolation", **settings)

    def text_diff(self, image: Image.Image, caption: str, target: str, num_images: int = 5, max_amount: float = 0.5,
                  seed: int | None = None, **settings: Any) -> GenerationResult:
        """Move an image towards a caption change (unCLIP sec. 3.3, Fig. 5): z_d = normalise(z_t(target) -
        z_t(caption)), decoded at slerp(z_i, z_d, theta) for theta from 0 to max_amount, one seed."""
        zi = self.embed_images([image])  # (1, E)
        zt = self.encode_text([caption, target]).embeds.float()  # (2, E)
        zd = F.normalize(zt[1:] - zt[:1], dim=-1) * zi.norm(dim=-1, keepdim=True)  # (1, E) at the image's norm
        path = torch.cat([slerp(zi, zd, float(t)) for t in torch.linspace(0, max_amount, num_images)])
        s = per_image("", "", seed, 1)[2][0]
        return self.decode(path, seed=[s] * num_images, note=f", unCLIP: text diff {caption!r} -> {target!r}",
                           **settings)


# ---------------------------------------------------------------------------------------
# t2i's own file: the shapes-world unCLIP on our shapes CLIP
# ---------------------------------------------------------------------------------------


def _prior_schedule() -> UnCLIPSchedulerConfig:
    return UnCLIPSchedulerConfig(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0)


def _decoder_schedule() -> UnCLIPSchedulerConfig:
    return UnCLIPSchedulerConfig(variance_type="learned_range", prediction_type="epsilon")


@dataclass
class UnCLIPConfig:
    """Everything needed to rebuild a t2i unCLIP model from its weight file (CLIP: the shipped shapes CLIP)."""

    # the diffusion prior; None where the file holds the autoregressive one (`ar_prior`)
    prior: PriorConfig | None = field(default_factory=lambda: replace(PRIOR_PRESETS["shapes_s"]))
    text_proj: TextProjConfig = field(default_factory=lambda: TextProjConfig(embed_dim=128, time_embed_dim=128,
                                                                             context_dim=64))
    decoder: UnCLIPUNetConfig = field(default_factory=lambda: replace(UNCLIP_UNET_PRESETS["shapes_decoder_32"]))
    super_res: UnCLIPUNetConfig | None = None
    prior_schedule: UnCLIPSchedulerConfig = field(default_factory=_prior_schedule)
    decoder_schedule: UnCLIPSchedulerConfig = field(default_factory=_decoder_schedule)
    super_res_schedule: UnCLIPSchedulerConfig = field(default_factory=UnCLIPSchedulerConfig)
    clip: str = "shapes"
    settings: StageSettings = field(default_factory=StageSettings)
    steps: int = 25
    guidance: float = 3.0
    ar_prior: ARPriorConfig | None = None  # the autoregressive prior (sec. 2.2), in place of `prior`

    @property
    def prior_config(self) -> PriorConfig | ARPriorConfig:
        """The config of the one prior the file holds."""
        if (self.prior is None) == (self.ar_prior is None):
            raise ValueError("an unCLIP config holds one prior: a diffusion `prior` or an `ar_prior`")
        return self.ar_prior if self.ar_prior is not None else self.prior  # type: ignore[return-value]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnCLIPConfig:
        d = dict(d)
        sr = d.pop("super_res", None)
        ar = d.pop("ar_prior", None)  # files written before the autoregressive prior have none
        if ar:
            ar = {k: v for k, v in ar.items() if k != "text_tokens"}  # session-22 files: a width nothing read
        prior = d.pop("prior")
        return cls(prior=PriorConfig(**prior) if prior else None, text_proj=TextProjConfig(**d.pop("text_proj")),
                   decoder=UnCLIPUNetConfig(**d.pop("decoder")), super_res=UnCLIPUNetConfig(**sr) if sr else None,
                   prior_schedule=UnCLIPSchedulerConfig(**d.pop("prior_schedule")),
                   decoder_schedule=UnCLIPSchedulerConfig(**d.pop("decoder_schedule")),
                   super_res_schedule=UnCLIPSchedulerConfig(**d.pop("super_res_schedule")),
                   settings=StageSettings(**d.pop("settings")), ar_prior=ARPriorConfig(**ar) if ar else None, **d)


class UnCLIPNets(nn.Module):
    """The trained parts of a t2i unCLIP file, under the names its weights carry."""

    def __init__(self, cfg: UnCLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        prior = cfg.prior_config
        self.prior = ARPrior(prior) if isinstance(prior, ARPriorConfig) else PriorTransformer(prior)
        self.text_proj = TextProj(cfg.text_proj)
        self.decoder = UnCLIPUNet(cfg.decoder)
        self.super_res_first = UnCLIPUNet(cfg.super_res) if cfg.super_res is not None else None
        self.super_res_last = UnCLIPUNet(cfg.super_res) if cfg.super_res is not None else None


def save_unclip(nets: UnCLIPNets, path: str | Path) -> None:
    """One safetensors file: the nets' weights in float32, the resolved config in the metadata."""
    state = {k: v.detach().float().contiguous() for k, v in nets.state_dict().items()}
    save_with_config(state, path, dataclasses.asdict(nets.cfg), SYSTEM_NAME)


def _check(cfg: UnCLIPConfig) -> None:
    e = cfg.prior_config.embed_dim
    if cfg.text_proj.embed_dim != e or cfg.text_proj.context_dim != cfg.decoder.context_dim \
            or cfg.text_proj.time_embed_dim != cfg.decoder.time_embed_dim:
        raise ValueError("unCLIP config: the prior, text projection and decoder widths do not fit together")


def pipeline_from_nets(nets: UnCLIPNets, clip: nn.Module, name: str) -> UnCLIPPipeline:
    """The pipeline of a t2i unCLIP model (its nets and the CLIP they were trained on)."""
    cfg = nets.cfg
    sr = (nets.super_res_first, nets.super_res_last) if nets.super_res_first is not None else None
    size = cfg.super_res.sample_size if cfg.super_res is not None else cfg.decoder.sample_size
    defaults = GenerationDefaults(sampler="ddpm", steps=cfg.steps, guidance=cfg.guidance, width=size, height=size)
    return UnCLIPPipeline(clip, nets.prior, cfg.prior_schedule, nets.text_proj, nets.decoder, cfg.decoder_schedule,
                          sr, cfg.super_res_schedule, name=name, defaults=defaults, settings=cfg.settings)


def load_clip(name: str) -> nn.Module:
    """The CLIP a t2i unCLIP file names: "shapes" (the shipped shapes CLIP)."""
    if name != "shapes":
        raise ValueError(f"unknown CLIP {name!r} for a t2i unCLIP file (t2i has 'shapes')")
    from t2i.eval.shapes_clip import ShapesCLIP

    return ShapesCLIPEncoder(ShapesCLIP.load())


def load_t2i_unclip(path: Path) -> UnCLIPPipeline:
    file = system_file(path)

    def parts(cfg: UnCLIPConfig) -> dict[str, Any]:
        out: dict[str, Any] = {"prior": cfg.prior_config, "decoder": cfg.decoder}
        return out | ({"super_res": cfg.super_res} if cfg.super_res is not None else {})

    nets = load_system_file(file, SYSTEM_NAME, "a t2i unCLIP file", UnCLIPConfig.from_dict, UnCLIPNets, parts, _check)
    name = model_name(file)
    return pipeline_from_nets(nets, load_clip(nets.cfg.clip).eval().requires_grad_(False), name)


# ---------------------------------------------------------------------------------------
# diffusers' UnCLIPPipeline folder (Karlo)
# ---------------------------------------------------------------------------------------


def _component(folder: Path, config_of: Any, build: Any, keys: Any = dict, stem: str = "diffusion_pytorch_model"
               ) -> nn.Module:
    """One diffusers component: config translated, built on the meta device, checked against the weights'
    names and shapes, then filled (float32, frozen)."""
    cfg = config_of(read_json_object(folder / "config.json", f"{folder.name}/config.json"))
    state = keys(load_component_weights(folder, stem))
    module = build_checked(lambda: build(cfg), {folder.name: cfg}, {k: v.to("meta") for k, v in state.items()},
                           str(folder))
    return fill(module, state, torch.float32)


def _scheduler(folder: Path) -> UnCLIPSchedulerConfig:
    return scheduler_config_from_diffusers(read_json_object(folder / "scheduler_config.json",
                                                            f"{folder.name}/scheduler_config.json"))


def _image_tower(path: Path) -> tuple[nn.Module, Any]:
    """A variation folder's CLIP image tower (`image_encoder/`, CLIPVisionModelWithProjection) and its
    preprocessing (`feature_extractor/preprocessor_config.json`)."""
    from t2i.eval.clip_score import (
        CLIPImagePreprocess,
        vision_config_from_transformers,
        vision_state_dict_from_transformers,
    )
    from t2i.nets.vit import VisionTransformer

    folder = path / "image_encoder"
    cfg = vision_config_from_transformers(read_json_object(folder / "config.json", "image_encoder/config.json"))
    state = vision_state_dict_from_transformers(load_component_weights(folder, "model"))
    vision = build_checked(lambda: VisionTransformer(cfg), {"image_encoder": cfg},
                           {k: v.to("meta") for k, v in state.items()}, str(folder))
    pre = path / "feature_extractor" / "preprocessor_config.json"
    preprocess = (CLIPImagePreprocess.from_config(read_json_object(pre, "preprocessor_config.json"), cfg.image_size)
                  if pre.is_file() else CLIPImagePreprocess(cfg.image_size, cfg.image_size))
    return fill(vision, state, torch.float32), preprocess


def load_diffusers_unclip(path: Path) -> UnCLIPPipeline:
    """A diffusers UnCLIPPipeline or UnCLIPImageVariationPipeline folder (Karlo), offline: every component read
    from the folder."""
    text = load_clip_text_folder(path / "text_encoder").eval().requires_grad_(False)
    if text.text_projection is None:
        raise ValueError(f"{path}/text_encoder: unCLIP needs CLIPTextModelWithProjection (a text_projection)")
    vision, preprocess = _image_tower(path) if (path / "image_encoder").is_dir() else (None, None)
    clip = KarloCLIP(text, CLIPTokenizer.from_folder(path / "tokenizer"), vision, preprocess)
    prior = None
    if (path / "prior").is_dir():
        prior = _component(path / "prior", prior_config_from_diffusers, PriorTransformer,
                           prior_state_dict_from_diffusers)
    text_proj = _component(path / "text_proj", text_proj_config_from_diffusers, TextProj)
    decoder = _component(path / "decoder", unet_config_from_diffusers, UnCLIPUNet)
    super_res = None
    if (path / "super_res_first").is_dir():
        super_res = (_component(path / "super_res_first", unet_config_from_diffusers, UnCLIPUNet),
                     _component(path / "super_res_last", unet_config_from_diffusers, UnCLIPUNet))
    prior_schedule = _scheduler(path / "prior_scheduler") if prior is not None else UnCLIPSchedulerConfig()
    return UnCLIPPipeline(clip, prior, prior_schedule, text_proj, decoder,
                          _scheduler(path / "decoder_scheduler"), super_res,
                          _scheduler(path / "super_res_scheduler") if super_res else None, name=path.name)


# ---------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------


def is_t2i_unclip(path: Path) -> bool:
    return is_system_file(path, SYSTEM_NAME)


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> UnCLIPPipeline:
    path = Path(path)
    pipe = load_diffusers_unclip(path) if is_diffusers_unclip(path) else load_t2i_unclip(path)
    if dtype != torch.float32:
        for net in (pipe.prior, pipe.text_proj, pipe.unet, pipe.super_res):
            if net is not None:
                net.to(dtype)
    return pipe


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """A random t2i unCLIP on the shipped shapes CLIP, 16x16 images, as folder/model.safetensors."""
    torch.manual_seed(seed)
    decoder = replace(UNCLIP_UNET_PRESETS["tiny_decoder"], sample_size=16)
    cfg = UnCLIPConfig(prior=PriorConfig(heads=2, head_dim=16, layers=2, embed_dim=128, text_tokens=32),
                       text_proj=TextProjConfig(extra_tokens=4, embed_dim=128, time_embed_dim=decoder.time_embed_dim,
                                                context_dim=decoder.context_dim or 16),
                       decoder=decoder, settings=StageSettings(prior_steps=2, super_res_steps=2))
    folder.mkdir(parents=True, exist_ok=True)
    save_unclip(UnCLIPNets(cfg), folder / "model.safetensors")
    return folder / "model.safetensors"


def _detect(path: Path) -> bool:
    path = Path(path)
    return is_diffusers_unclip(path) or is_t2i_unclip(path)


SYSTEM = System(
    name=SYSTEM_NAME,
    description="unCLIP / DALL-E 2 (CLIP prior + decoder + super-resolution): a diffusers UnCLIPPipeline or "
                "UnCLIPImageVariationPipeline folder (Karlo), or a t2i unCLIP .safetensors on the shapes CLIP",
    detect=_detect,
    load=load,
    write_tiny=write_tiny,
)
