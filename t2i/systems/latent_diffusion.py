"""Latent diffusion text-to-image (Stable Diffusion 1/2/XL and t2i's own shapes model).

The one data path of DESIGN.md: prompt -> text encoder -> context; seed noise -> sampler over
the guided denoiser -> latents -> autoencoder decode -> image. Everything model-specific lives
in the components; this file only wires them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from t2i.autoencoders.kl import AutoencoderKL
from t2i.diffusion.guidance import CFGDenoiser
from t2i.diffusion.schedules import ScheduleConfig
from t2i.imageio import format_parameters, to_pil
from t2i.nets.unet import UNet
from t2i.samplers.plan import prepare_sampling
from t2i.samplers.sampling import SAMPLERS
from t2i.text.encoders import TextEncoder, TextEncoding


@dataclass
class GenerationDefaults:
    """What a request gets for the settings it leaves out; stored with each model."""

    sampler: str = "euler"
    schedule: str = "default"  # or "karras"
    steps: int = 20
    guidance: float = 7.5
    width: int = 512
    height: int = 512


@dataclass
class GenerationResult:
    """images: one PIL image per output, each with its A1111 `parameters` in `image.info`.
    latents: (N, C, h, w) final latents (diffusion scale, before the VAE scaling is undone).
    seeds: the seed each image started from. warnings: e.g. prompts cut to fit the encoder."""

    images: list[Image.Image]
    latents: torch.Tensor
    seeds: list[int]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def seed_noise(seed: int, n: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """(n, C, h, w) starting noise: image i from its own CPU generator seeded with seed + i, so an
    image never depends on the batch it is in, and image 0 matches diffusers' CPU-generator draw."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed + i))
                      for i in range(n)])


class LatentDiffusionPipeline:
    """A text encoder, a U-Net and a KL autoencoder with the schedule the U-Net was trained on.

    Args:
        unet: the denoising network, eps/v/x0 by `schedule.prediction_type`.
        vae: the autoencoder whose (scaled) latent space the U-Net works in.
        text_encoder: prompts -> TextEncoding (context, pooled for SDXL, padding mask).
        schedule: the training noise schedule and the diffusers inference settings.
        name: shown in the PNG parameters (`Model:`).
        defaults: settings a request does not give.
        micro_conditioning: SDXL's size/crop time ids (needs `pooled` from the text encoder).
        zero_empty_negative: SDXL's `force_zeros_for_empty_prompt`: an empty negative prompt is
            all-zero conditioning rather than the encoding of "".
    """

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder, schedule: ScheduleConfig, *,
                 name: str = "model", defaults: GenerationDefaults | None = None,
                 micro_conditioning: bool = False, zero_empty_negative: bool = False) -> None:
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.schedule = schedule
        self.name = name
        self.defaults = defaults or GenerationDefaults()
        self.micro_conditioning = micro_conditioning
        self.zero_empty_negative = zero_empty_negative
        self.vae_scale = vae.cfg.downsample_factor
        self.latent_channels = unet.cfg.in_channels

    # ------------------------------------------------------------------ conditioning

    def _cond(self, enc: TextEncoding, height: int, width: int) -> dict[str, torch.Tensor]:
        """Network keyword arguments for a batch of encoded prompts."""
        cond = {"context": enc.context}
        if self.micro_conditioning:
            if enc.pooled is None:
                raise ValueError("micro-conditioning needs a text encoder with a pooled output")
            b = enc.context.shape[0]
            # original size, crop top-left, target size, as (h, w) pairs (SDXL paper, sec. 2.2)
            ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
            cond["text_embeds"] = enc.pooled
            cond["time_ids"] = ids.expand(b, 6)
        return cond

    def encode_prompts(self, prompt: str, negative_prompt: str, n: int, height: int, width: int,
                       guided: bool) -> tuple[dict, dict | None, list[str]]:
        """(cond, uncond or None, warnings), each tensor batched to n images."""
        texts = [prompt, negative_prompt] if guided else [prompt]
        enc = self.text_encoder.encode(texts)
        warnings = [f"{which} was cut to the text encoder's {self.text_encoder.max_length} tokens"
                    for which, cut in zip(("prompt", "negative prompt"), enc.truncated, strict=False) if cut]

        def pick(i: int) -> TextEncoding:
            pooled = None if enc.pooled is None else enc.pooled[i: i + 1].expand(n, -1)
            mask = None if enc.mask is None else enc.mask[i: i + 1].expand(n, -1)
            return TextEncoding(enc.context[i: i + 1].expand(n, -1, -1), pooled, mask, [])

        cond = self._cond(pick(0), height, width)
        if not guided:
            return cond, None, warnings
        neg = pick(1)
        if self.zero_empty_negative and not negative_prompt:
            neg = replace(neg, context=torch.zeros_like(neg.context),
                          pooled=None if neg.pooled is None else torch.zeros_like(neg.pooled))
        return cond, self._cond(neg, height, width), warnings

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str = "", *, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, guidance_rescale: float = 0.0, sampler: str | None = None,
                 schedule: str | None = None, eta: float | None = None, width: int | None = None,
                 height: int | None = None, num_images: int = 1, progress: bool = False,
                 callback: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate num_images images for one prompt. Unset settings take `self.defaults`.

        callback(step, total) is called after each sampler step (for progress reporting).
        """
        d = self.defaults
        steps = steps or d.steps
        guidance = d.guidance if guidance is None else guidance
        sampler = sampler or d.sampler
        schedule = schedule or d.schedule
        width, height = width or d.width, height or d.height
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if schedule not in ("default", "karras"):
            raise ValueError(f"unknown schedule {schedule!r}; choose 'default' or 'karras'")
        for what, v in (("width", width), ("height", height)):
            if v <= 0 or v % self.vae_scale:
                raise ValueError(f"{what} must be a positive multiple of {self.vae_scale}, got {v}")
        if not torch.isfinite(torch.tensor(guidance)):
            raise ValueError(f"guidance must be a finite number, got {guidance}")
        start = time.perf_counter()

        guided = guidance > 1.0
        cond, uncond, warnings = self.encode_prompts(prompt, negative_prompt, num_images, height, width, guided)
        karras = True if schedule == "karras" else (None if sampler in ("euler", "euler_a", "heun", "dpmpp_2m")
                                                       else False)
        plan = prepare_sampling(self.schedule, sampler, steps, karras=karras, eta=eta or 0.0)
        denoiser = CFGDenoiser(plan.denoiser(self.unet), guidance, guidance_rescale)
        denoiser = plan.limit_x0(denoiser)

        h, w = height // self.vae_scale, width // self.vae_scale
        noise = seed_noise(seed, num_images, (self.latent_channels, h, w))
        x = plan.start(noise)
        bar = _progress(plan.steps, progress)

        def on_step(info: dict) -> None:
            bar.update(1) if bar is not None else None
            if callback is not None:
                callback(info["i"] + 1, plan.steps)

        # The ancestral samplers draw their step noise from the request's seed.
        generator = torch.Generator("cpu").manual_seed(seed)
        x = plan.run(denoiser, x, {"cond": cond, "uncond": uncond}, on_step, generator)
        if bar is not None:
            bar.close()
        latents = plan.finish(x)
        images = self.decode(latents)
        params = format_parameters(prompt, negative_prompt, steps=steps, sampler=sampler, schedule=schedule,
                                   guidance=guidance, seed=seed, width=width, height=height, model=self.name)
        for i, im in enumerate(images):
            im.info["parameters"] = params if i == 0 else params.replace(f"Seed: {seed},", f"Seed: {seed + i},")
        return GenerationResult(images, latents, [seed + i for i in range(num_images)], warnings,
                                time.perf_counter() - start)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """(N, C, h, w) diffusion latents -> N PIL images."""
        return to_pil(self.vae.decode(self.vae.unscale(latents.to(torch.float32))))

    def __call__(self, prompt: str, negative_prompt: str = "", **settings) -> list[Image.Image]:
        """The images only; see `generate` for the settings."""
        return self.generate(prompt, negative_prompt, **settings).images


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="sampling", unit="step", leave=False)
