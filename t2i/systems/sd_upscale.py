"""Latent super-resolution: the Stable Diffusion x4 upscaler (diffusers `StableDiffusionUpscalePipeline`)
and t2i's own latent SR models, which share its layout.

The model (Rombach et al. 2022, the LDM-SR recipe of sec. 4.4 as Stability released it for SD 2): a
text-conditioned U-Net denoises latents *at the low-res image's size* while reading the low-res image
itself, concatenated to its input channels (4 latents + 3 RGB = 7). The low-res image is first noised
to a chosen level by a second, DDPM schedule (`low_res_scheduler`), and that level goes to the U-Net as
a class label (`num_class_embeds`): noise conditioning augmentation (Ho et al. 2021, "Cascaded
Diffusion Models", sec. 4.1; Imagen sec. 2.4): trained on many levels, sampled at a small fixed one
(diffusers' default 20 of at most 350), so the model does not copy the input's artefacts. The VAE
(f = 4 for the real model, scaling 0.08333) decodes the result to the output size, 4x the input.

The family's facts: its layout (a diffusers folder with `low_res_scheduler/` and
`max_noise_level` in `model_index.json`), generation defaults (diffusers': 75 steps, guidance 9,
noise level 20), and a pipeline that subclasses the latent-diffusion one for everything it shares
(prompt encoding, sampling plans, decoding) and owns only what differs: where the latents' size
comes from and the two extra network inputs.

A t2i-only file may sit next to the diffusers files: `t2i_upscale.json`, {"base": MODEL, "noise_level":
N, "defaults": {...}}. MODEL (a path relative to the folder, or a model name) is a text-to-image model
this upscaler finishes when a request has no low-res image: the pair is a cascade (base at 1/f of
the asked size -> this model), which is what `t2i eval shapes` and a plain `t2i generate --model
UPSCALER "prompt"` then run. `pipe.with_base(other)` makes the same pair from any loaded model.

Random draws follow diffusers for one image: each image's generator (seed + i) first draws the
low-res noise, (1, 3, h, w), then the starting latents, (1, 4, h, w), then what the sampler needs. (diffusers
draws the low-res noise once per call and shares it between the images of a prompt; here every image has its
own, so an image does not depend on its batch.) The low-res image is resized with Lanczos when a request
asks for an output size other than f times its own (diffusers' processor: bicubic, to a multiple of f).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from t2i.autoencoders.kl import AutoencoderKL, AutoencoderKLConfig
from t2i.checkpoints.diffusers_folder import (
    check_text_encoder,
    is_diffusers_folder,
    load_unet,
    load_vae,
    read_config_file,
    read_schedule,
)
from t2i.checkpoints.diffusers_scheduler import scheduler_config_from_dict, write_scheduler_config
from t2i.checkpoints.export import save_diffusers_folder
from t2i.checkpoints.io import CheckpointError, read_json_object
from t2i.checkpoints.limits import check_schedule
from t2i.checkpoints.parts import LatentDiffusionParts, text_layout
from t2i.diffusion.guidance import CFGDenoiser
from t2i.diffusion.schedules import ScheduleConfig
from t2i.imageio import from_pil, request_parameters
from t2i.nets.unet import UNet, UNetConfig
from t2i.samplers.sampling import SAMPLERS
from t2i.seeds import seed_generators, seed_noise
from t2i.systems.base import (
    Capabilities,
    GenerationRequest,
    GenerationResult,
    Pipeline,
    System,
    per_image,
    stop_polling,
)
from t2i.systems.latent_diffusion import LatentDiffusionPipeline
from t2i.systems.stable_diffusion import generation_defaults
from t2i.systems.stable_diffusion import write_tiny as write_tiny_sd
from t2i.text.clip import CLIPTextConfig, CLIPTextModel
from t2i.text.clip_tokenizer import CLIPTokenizer
from t2i.text.encoders import CLIPTextEncoder, load_diffusers_text_encoder

NAME = "sd_upscale"
PIPELINE_CLASS = "StableDiffusionUpscalePipeline"
EXTRA_FILE = "t2i_upscale.json"
# diffusers' StableDiffusionUpscalePipeline defaults
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_NOISE_LEVEL, MAX_NOISE_LEVEL = 75, 9.0, 20, 350
# The DDPM schedule the x4 upscaler's low_res_scheduler states (diffusers' DDPMScheduler otherwise).
LOW_RES_SCHEDULE = ScheduleConfig(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")

# What run() honours besides prompt / seed / num_images (noise_level: None takes `pipe.noise_level`).
OPTIONS = frozenset({"negative_prompt", "steps", "guidance", "guidance_rescale", "sampler", "schedule", "eta",
                     "width", "height", "init_image", "noise_level"})


def noise_low_res(image: torch.Tensor, noise: torch.Tensor, level: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The low-res image at noise level `level` of its DDPM schedule (diffusers' `DDPMScheduler.add_noise`):
    sqrt(acp_l) image + sqrt(1 - acp_l) noise (DDPM eq. 4). image, noise: (B, 3, h, w) in [-1, 1] and
    N(0, 1); level: (B,) integers; alphas_cumprod: (T,) float32."""
    acp = alphas_cumprod.to(image.device, image.dtype)[level.long()].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return acp**0.5 * image + (1 - acp) ** 0.5 * noise


class LowResConditioned(nn.Module):
    """The upscaler's U-Net behind the usual `net(x, t, **cond)` call: cond carries `low_res` (B, 3, h, w),
    the noised low-res image, appended to the (already scaled) latents' channels as diffusers does
    after `scale_model_input`, and `noise_level` (B,), its level, given as the class label."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor, noise_level: torch.Tensor,
                **cond: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, low_res.to(x.dtype)], dim=1)  # (B, 4 + 3, h, w)
        return self.net(x, t, class_labels=noise_level, **cond)


@dataclass
class UpscaleSettings:
    """What the folder says beyond diffusers' files: max_noise_level (model_index.json), and from
    `t2i_upscale.json` the default noise level, a base model (path relative to the folder, or a name)
    and generation defaults."""

    max_noise_level: int = MAX_NOISE_LEVEL
    noise_level: int = DEFAULT_NOISE_LEVEL
    base: str | None = None
    defaults: dict[str, Any] | None = None


class SDUpscalePipeline(LatentDiffusionPipeline):
    """A latent upscaler: `run(request)` upscales `request.init_image` (f x: the VAE's factor), or, with
    no init image, the image `self.base` draws from the prompt at 1/f of the asked size.

    Args (beyond LatentDiffusionPipeline's): low_res_schedule: the DDPM schedule that noises the low-res
    input; settings: noise levels and defaults; base: a text-to-image Pipeline (or None).
    """

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder, schedule: ScheduleConfig,
                 low_res_schedule: ScheduleConfig, settings: UpscaleSettings, *, base: Pipeline | None = None,
                 **kwargs: Any) -> None:
        super().__init__(unet, vae, text_encoder, schedule, family=NAME, **kwargs)
        self.low_res_schedule, self.settings, self.base = low_res_schedule, settings, base
        self.noise_level = settings.noise_level  # what a request without its own takes

    def with_base(self, base: Pipeline | None) -> SDUpscalePipeline:
        """This upscaler (sharing its networks) finishing `base`'s images: a two-stage cascade."""
        other = copy.copy(self)
        other.base = base
        return other

    @property
    def capabilities(self) -> Capabilities:
        f = self.vae_scale
        if self.base is None:
            native, multiple = (self.defaults.width, self.defaults.height), f
        else:
            caps = self.base.capabilities
            native = (caps.native_size[0] * f, caps.native_size[1] * f)
            multiple = caps.size_multiple * f
        # alone, it upscales the request's image and nothing else: a request without one is refused before
        # any work (a 4xx from the server, one line from the CLI), not failed in the sampler
        return Capabilities(options=OPTIONS, samplers=tuple(SAMPLERS), schedules=("default", "karras"),
                            size_multiple=multiple, native_size=native,
                            required=frozenset({"init_image"}) if self.base is None else frozenset())

    @torch.no_grad()
    def run(self, request: GenerationRequest) -> GenerationResult:
        return self.upscale_request(request, request.noise_level)

    def upscale(self, image: Image.Image | None, prompt: str | list[str] = "", negative_prompt: str = "",
                noise_level: int | None = None, **settings: Any) -> GenerationResult:
        """Upscale `image` (None: the base's image of the prompt) guided by `prompt`; settings are
        GenerationRequest's (steps, guidance, sampler, seed, width, height...)."""
        request = GenerationRequest(prompt, negative_prompt, init_image=image, **settings)
        return self.upscale_request(request, noise_level)

    @torch.no_grad()
    def upscale_request(self, request: GenerationRequest, noise_level: int | None = None) -> GenerationResult:
        with stop_polling(request.should_stop, self.unet, self.vae):
            return self._upscale(request, self.noise_level if noise_level is None else noise_level)

    def _upscale(self, r: GenerationRequest, level: int) -> GenerationResult:
        if not (isinstance(level, int) and 0 <= level <= self.settings.max_noise_level):
            raise ValueError(f"noise_level must be an integer in 0..{self.settings.max_noise_level}, got {level!r}")
        if r.init_image is None and self.base is None:
            raise ValueError(f"{self.name} is an upscaler: give it a low-res image (init_image, --init-image) "
                             "or a base model to finish (with_base, --upscaler)")
        f = self.vae_scale
        width, height = r.width, r.height
        if r.init_image is not None:  # the output is f times the input unless a size is asked for
            width, height = width or r.init_image.width * f, height or r.init_image.height * f
        elif self.base is not None and (width is None or height is None):
            native = self.capabilities.native_size
            width, height = width or native[0], height or native[1]
        steps, guidance, sampler, schedule, width, height = self._resolve(
            r.steps, r.guidance, r.sampler, r.schedule, width, height, None)
        start = time.perf_counter()
        h, w = height // f, width // f  # the latents have the low-res image's size
        prompts, negatives, seeds = per_image(r.prompt, r.negative_prompt, r.seed, r.num_images)
        n = len(prompts)
        low, warnings = self._low_res(r, prompts, negatives, seeds, w, h)  # (1 or n, 3, h, w) in [-1, 1]

        guided = guidance > 1.0
        cond, uncond, more = self.encode_prompts(prompts, negatives, height, width, guided)
        warnings += more
        generators = seed_generators(seeds)
        low_noise = seed_noise(generators, (3, h, w))  # drawn first, as diffusers does
        labels = torch.full((n,), level, dtype=torch.long)
        low = noise_low_res(low.expand(n, -1, -1, -1), low_noise, labels, self.low_res_schedule.alphas_cumprod())
        extra = {"low_res": low, "noise_level": labels}
        cond = {**cond, **extra}
        uncond = None if uncond is None else {**uncond, **extra}

        plan = self.plan(sampler, steps, schedule, r.eta)
        x = plan.start(seed_noise(generators, (self.latent_channels, h, w)))
        net = LowResConditioned(self._sampling_net())
        denoiser = plan.limit_x0(CFGDenoiser(plan.denoiser(net), guidance, r.guidance_rescale))
        latents = plan.finish(self._run(plan, denoiser, x, cond, uncond, generators, r.progress, r.callback,
                                        r.on_sample))
        images = self.decode(latents)
        resolved = replace(r, steps=steps, guidance=guidance, sampler=sampler, schedule=schedule, width=width,
                           height=height)
        base = "" if r.init_image is not None or self.base is None else f", Base model: {self.base.name}"
        for im, p, neg, sd in zip(images, prompts, negatives, seeds, strict=True):
            text = request_parameters(resolved, p, neg, sd, self.name, self.precision)
            im.info["parameters"] = f"{text}, Noise level: {level}{base}"
        return GenerationResult(images, latents, seeds, warnings, time.perf_counter() - start)

    def _low_res(self, r: GenerationRequest, prompts: list[str], negatives: list[str], seeds: list[int],
                 w: int, h: int) -> tuple[torch.Tensor, list[str]]:
        """The low-res input in [-1, 1]: the request's image resized to (w, h) if it is not that size
        (Lanczos; diffusers resizes with bicubic), (1, 3, h, w); or the base's images of the prompts
        with the same seeds, (n, 3, h, w)."""
        if r.init_image is not None:
            return from_pil(r.init_image, (w, h)), []
        assert self.base is not None
        accepts = self.base.capabilities.accepts
        settings: dict[str, Any] = {"width": w, "height": h, "should_stop": r.should_stop, "progress": r.progress}
        if any(negatives) and accepts("negative_prompt"):
            settings["negative_prompt"] = negatives
        result = self.base.run(GenerationRequest(prompts, seed=seeds, **settings))
        return torch.cat([from_pil(im, (w, h)) for im in result.images]), result.warnings


# ------------------------------------------------------------------ the folder layout


def detect(path: Path) -> bool:
    """A diffusers folder whose model_index.json names StableDiffusionUpscalePipeline."""
    if not is_diffusers_folder(path):
        return False
    try:
        return read_json_object(path / "model_index.json", "model_index.json").get("_class_name") == PIPELINE_CLASS
    except ValueError:
        return False


def read_settings(root: Path, index: dict[str, Any]) -> UpscaleSettings:
    """max_noise_level from model_index.json and `t2i_upscale.json`'s entries (all optional)."""
    extra = read_json_object(root / EXTRA_FILE, EXTRA_FILE) if (root / EXTRA_FILE).is_file() else {}
    settings = UpscaleSettings(max_noise_level=index.get("max_noise_level", MAX_NOISE_LEVEL),
                               noise_level=extra.get("noise_level", DEFAULT_NOISE_LEVEL), base=extra.get("base"),
                               defaults=extra.get("defaults"))
    for name in ("max_noise_level", "noise_level"):
        value = getattr(settings, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100_000):
            raise CheckpointError(f"{root}: {name}={value!r} is not a noise level")
    if settings.base is not None and not isinstance(settings.base, str):
        raise CheckpointError(f"{root / EXTRA_FILE}: base must be a model path or name")
    if settings.defaults is not None and not isinstance(settings.defaults, dict):
        raise CheckpointError(f"{root / EXTRA_FILE}: defaults must be an object")
    return settings


def _load_base(root: Path, base: str, dtype: torch.dtype | None) -> Pipeline:
    """The base model a folder names: a path relative to it, else a model name (`t2i models`)."""
    from t2i.systems.registry import resolve  # at call time: the registry imports the families

    family, path = resolve(root / base if (root / base).exists() else base)
    return family.load(path, dtype or torch.float32)


def load(path: Path, dtype: torch.dtype | None = torch.float32) -> SDUpscalePipeline:
    """An upscaler folder -> SDUpscalePipeline in `dtype` (None: the U-Net's stored dtype), with its
    base model when `t2i_upscale.json` names one."""
    root = Path(path)
    index = read_json_object(root / "model_index.json", "a diffusers model index")
    if index.get("_class_name") != PIPELINE_CLASS:
        raise CheckpointError(f"{root}: not a {PIPELINE_CLASS} folder")
    for part in ("unet", "vae", "scheduler", "low_res_scheduler", "text_encoder", "tokenizer"):
        if not (root / part).is_dir():
            raise FileNotFoundError(f"{root / part} is missing: not a complete upscaler folder")
    settings = read_settings(root, index)
    schedule, scheduler_class = read_schedule(root)
    low_file = root / "low_res_scheduler" / "scheduler_config.json"
    low_res = read_config_file(scheduler_config_from_dict, low_file, source=str(low_file))
    check_schedule(low_res, str(low_file))
    if settings.max_noise_level >= low_res.num_train_timesteps:
        raise CheckpointError(f"{root}: max_noise_level {settings.max_noise_level} is beyond the low-res "
                              f"schedule's {low_res.num_train_timesteps} steps")
    unet = load_unet(root / "unet", dtype)
    if unet.cfg.num_class_embeds is None or unet.cfg.num_class_embeds <= settings.max_noise_level:
        raise CheckpointError(f"{root}: the U-Net has no class label for every noise level up to "
                              f"{settings.max_noise_level} (num_class_embeds={unet.cfg.num_class_embeds})")
    dtype = dtype or next(unet.parameters()).dtype
    vae = load_vae(root / "vae", dtype)
    if unet.cfg.in_channels != vae.cfg.latent_channels + 3:
        raise CheckpointError(f"{root}: the U-Net takes {unet.cfg.in_channels} channels, not the "
                              f"{vae.cfg.latent_channels} latents + 3 of the low-res image")
    check_text_encoder(root / "text_encoder")
    text = load_diffusers_text_encoder(root, dtype)
    stored = {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, **(settings.defaults or {})}
    parts = LatentDiffusionParts(unet, vae, text, schedule, root.name, text_layout(text), scheduler_class,
                                 defaults=stored)
    base = None if settings.base is None else _load_base(root, settings.base, dtype)
    return SDUpscalePipeline(unet, vae, text, schedule, low_res, settings, base=base, name=root.name,
                             defaults=generation_defaults(parts))


def save_upscaler_folder(parts: LatentDiffusionParts, low_res: ScheduleConfig, settings: UpscaleSettings,
                         folder: Path) -> Path:
    """Write an upscaler as diffusers writes one (`StableDiffusionUpscalePipeline.save_pretrained`):
    the SD folder of `parts` (t2i's exporter) with the pipeline class, `max_noise_level` and
    `low_res_scheduler/` of the upscaler, and `t2i_upscale.json` when there is more to say."""
    folder = save_diffusers_folder(parts, Path(folder))
    index = read_json_object(folder / "model_index.json", "model_index.json")
    for key in ("requires_safety_checker", "force_zeros_for_empty_prompt"):  # not upscaler arguments
        index.pop(key, None)
    index.update(_class_name=PIPELINE_CLASS, low_res_scheduler=["diffusers", "DDPMScheduler"],
                 max_noise_level=settings.max_noise_level)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    write_scheduler_config(low_res, folder / "low_res_scheduler", "DDPMScheduler")
    extra = {k: v for k, v in (("base", settings.base), ("noise_level", settings.noise_level),
                               ("defaults", settings.defaults)) if v not in (None, DEFAULT_NOISE_LEVEL)}
    if extra:
        (folder / EXTRA_FILE).write_text(json.dumps(extra, indent=2) + "\n", encoding="utf-8")
    return folder


# A tiny upscaler over the tiny SD's 32x32 images: 32x32 latents, an f=2 autoencoder -> 64x64 images.
TINY_UNET = UNetConfig(in_channels=7, block_channels=(32, 64), layers_per_block=(1, 1), attention=(False, True),
                       num_heads=(2, 2), transformer_depth=(1, 1), context_dim=32, linear_projection=True,
                       only_cross_attention=(False, True), norm_groups=8, sample_size=32,
                       num_class_embeds=MAX_NOISE_LEVEL + 1)
TINY_VAE = AutoencoderKLConfig(block_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_groups=8,
                               sample_size=64, scaling_factor=0.08333)
TINY_TEXT = CLIPTextConfig(width=32, layers=2, heads=2, mlp_dim=64, eos_token_id=2, pooling="argmax")


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """`folder/tiny-sd-upscale`, a random upscaler finishing `folder/tiny-sd` (the SD family's tiny
    model) when no low-res image is given, 8 DDIM steps by default."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_sd(folder, seed)
    torch.manual_seed(seed)
    text = CLIPTextEncoder(CLIPTokenizer.default(), CLIPTextModel(TINY_TEXT), "last")
    schedule = replace(LOW_RES_SCHEDULE, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                       steps_offset=1, timestep_spacing="leading")
    parts = LatentDiffusionParts(UNet(TINY_UNET), AutoencoderKL(TINY_VAE), text, schedule, "tiny-sd-upscale", "sd1",
                                 "DDIMScheduler")
    settings = UpscaleSettings(base="../tiny-sd", defaults={"steps": 8, "guidance": 5.0})
    return save_upscaler_folder(parts, LOW_RES_SCHEDULE, settings, folder / "tiny-sd-upscale")


SYSTEM = System(
    name=NAME,
    description="latent super-resolution: a diffusers StableDiffusionUpscalePipeline folder (the SD x4 upscaler "
                "layout; t2i's shapes SR models use it too)",
    detect=detect, load=load, write_tiny=write_tiny)
