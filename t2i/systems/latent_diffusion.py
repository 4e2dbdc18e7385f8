"""Latent diffusion text-to-image (Stable Diffusion 1/2/XL and t2i's own shapes model).

The one data path of DESIGN.md: prompt -> text encoder -> context; seed noise -> sampler over
the guided denoiser -> latents -> autoencoder decode -> image. Everything model-specific lives
in the components; this file only wires them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from t2i.autoencoders.kl import AutoencoderKL
from t2i.autoencoders.preview import PreviewDecoder
from t2i.diffusion.guidance import CFGDenoiser
from t2i.diffusion.paint_with_words import (
    COND_KEY,
    DEFAULT_WEIGHT,
    PaintWithWords,
    Region,
    as_regions,
    check_regions,
    cross_attentions,
    region_masks,
)
from t2i.diffusion.schedules import ScheduleConfig
from t2i.imageio import from_pil, request_parameters, to_pil
from t2i.nets.cast_inputs import CastInputs
from t2i.nets.controlnet import ControlledUNet, ControlNet, check_fits
from t2i.nets.unet import DeepCacheUNet, UNet, guidance_scale_embedding
from t2i.quantize import precision_of
from t2i.samplers.diffusers_plan import SamplingPlan, plan_for_request
from t2i.samplers.sampling import SAMPLERS
from t2i.seeds import seed_generators, seed_noise
from t2i.systems.base import (
    Capabilities,
    GenerationDefaults,
    GenerationRequest,
    GenerationResult,
    RequestMethods,
    StepReport,
    check_sampling_settings,
    per_image,
    stop_polling,
)
from t2i.text.encoders import TextEncoder, TextEncoding
from t2i.text.prompt_syntax import encode_prompts

_malloc_trim: Callable[[int], int] | bool | None = None  # glibc's, looked up on first use


def release_freed_memory() -> bool:
    """Hand the C heap's freed pages back to the OS (glibc `malloc_trim`); False where there is none.

    The sampler's many mid-sized temporaries leave freed heap pages resident; the VAE decode that
    follows makes the run's largest allocations on top of them. Trimming first lowered the peak RSS
    of a 512x512 SD 1.5 step + decode by 0.1 GB (5.44 -> 5.35 GB, session 5).
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


class _FrozenCompiled(nn.Module):
    """A torch.compile'd module whose compiles (the first call's and any recompile) run with inductor's
    `freezing` on. Inductor reads that flag from its global config while compiling, which happens
    lazily inside a call; `torch.compile(options={"freezing": True})` did not reach it (measured:
    the same step time as without freezing), a config patch around the call does."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


# The GenerationRequest options every latent diffusion model honours (besides prompt, seed, ...).
LATENT_DIFFUSION_OPTIONS = frozenset({
    "negative_prompt", "steps", "guidance", "guidance_rescale", "sampler", "schedule", "eta", "width", "height",
    "init_image", "strength", "mask", "refiner", "refiner_start", "deepcache", "preview",
    "controlnet", "control_image", "control_scale"})
# Paint-with-words (eDiff-I): offered where the prompt is encoded here (see `paints_words`).
REGION_OPTIONS = frozenset({"regions", "region_weight"})


class LatentDiffusionPipeline(RequestMethods):
    """A text encoder, a U-Net and a KL autoencoder with the schedule the U-Net was trained on.

    Args:
        unet: the denoising network, eps/v/x0 by `schedule.prediction_type`.
        vae: the autoencoder whose (scaled) latent space the U-Net works in.
        text_encoder: prompts -> TextEncoding (context, pooled for SDXL, padding mask).
        schedule: the training noise schedule and the diffusers inference settings.
        name: shown in the PNG parameters (`Model:`).
        family: the registered system that loaded it (`t2i.systems.registry`).
        defaults: settings a request does not give.
        micro_conditioning: SDXL's size/crop time ids (needs `pooled` from the text encoder).
        zero_empty_negative: SDXL's `force_zeros_for_empty_prompt`: an empty negative prompt is
            all-zero conditioning rather than the encoding of "".
    """

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder, schedule: ScheduleConfig, *,
                 name: str = "model", family: str = "stable_diffusion", defaults: GenerationDefaults | None = None,
                 micro_conditioning: bool = False, zero_empty_negative: bool = False) -> None:
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.schedule = schedule
        self.name, self.family = name, family
        self.defaults = defaults or GenerationDefaults()
        self.micro_conditioning = micro_conditioning
        self.zero_empty_negative = zero_empty_negative
        # prompt -> a warning about it or None (the shapes family: words outside its world)
        self.prompt_check: Callable[[str], str | None] | None = None
        self.preview_decoder: PreviewDecoder | None = None  # set by the user; generate(preview=True) decodes with it
        self._compiled_unet: nn.Module | None = None  # set by compile()
        self.vae_scale = vae.cfg.downsample_factor
        self.latent_channels = vae.cfg.latent_channels
        # The SDXL refiner conditions on an aesthetic score instead of the target size: its
        # added embedding then takes 5 time ids, not 6.
        self.aesthetic_conditioning = bool(
            micro_conditioning and unet.cfg.projection_class_embeddings_input_dim is not None
            and text_encoder.pooled_dim is not None and unet.cfg.addition_time_embed_dim is not None
            and unet.cfg.projection_class_embeddings_input_dim - text_encoder.pooled_dim
            == 5 * unet.cfg.addition_time_embed_dim)
        # A U-Net whose added embedding reads the 6 time ids alone (t2i's micro-conditioned shapes
        # models: `t2i train ldm --micro-conditioning`) takes no pooled text, unlike SDXL's.
        self.time_ids_only = bool(
            micro_conditioning and unet.cfg.addition_time_embed_dim is not None
            and unet.cfg.projection_class_embeddings_input_dim == 6 * unet.cfg.addition_time_embed_dim)

    @property
    def precision(self) -> str:
        """"int8" (t2i.quantize), "bf16" or "fp32": what the U-Net computes in (PNG metadata)."""
        return precision_of(self.unet)

    @property
    def capabilities(self) -> Capabilities:
        d = self.defaults
        options = LATENT_DIFFUSION_OPTIONS | (REGION_OPTIONS if self.paints_words else frozenset())
        # a 9-channel inpainting U-Net cannot draw without the image and the mask it reads: a request lacking
        # them is refused before any work (a 4xx from the server), not failed inside the job
        inpainting = self.unet.cfg.in_channels == 2 * self.latent_channels + 1
        return Capabilities(options=options, samplers=tuple(SAMPLERS),
                            schedules=("default", "karras"), size_multiple=self.vae_scale,
                            native_size=(d.width, d.height),
                            required=frozenset({"init_image", "mask"}) if inpainting else frozenset(),
                            max_steps=self.schedule.num_train_timesteps)

    @property
    def paints_words(self) -> bool:
        """Whether regions (paint-with-words) are honoured: the U-Net has cross-attention and the context it
        reads is the prompt's own encoding. A subclass that adds its own conditioning may re-encode the
        prompt (the layout model recaptions it), which would move the words' tokens, so it is left out."""
        own = type(self).extra_conditioning is LatentDiffusionPipeline.extra_conditioning
        return own and bool(cross_attentions(self.unet))

    def request_regions(self, request: GenerationRequest) -> tuple[Region, ...] | None:
        """request.regions parsed (pixels read on the request's size, the model's default where unset)
        and checked against every prompt of the request through this model's tokenizer; RegionError
        (a ValueError naming the region) for a bad box or words that are not in a prompt."""
        regions = as_regions(request.regions, request.width or self.defaults.width,
                             request.height or self.defaults.height)
        if regions is not None:
            check_regions(self.text_encoder, per_image(request.prompt, request.negative_prompt, 0, 1)[0], regions)
        return regions

    # ------------------------------------------------------------------ conditioning

    @property
    def embeds_guidance(self) -> bool:
        """The U-Net takes the guidance scale as an input (an LCM distilled with guidance, Luo et al.
        2023 sec. 4.2): guidance is its embedding, not a classifier-free guidance batch, as in every
        diffusers SD pipeline whose U-Net has `time_cond_proj_dim`."""
        return getattr(self.unet.cfg, "time_cond_proj_dim", None) is not None

    def _with_guidance_embedding(self, cond: dict[str, torch.Tensor], guidance: float) -> dict[str, torch.Tensor]:
        """cond plus `timestep_cond`, the embedding of w = guidance - 1 (the LCM paper's CFG weight
        for diffusers' guidance scale), for a U-Net that embeds guidance; cond unchanged otherwise."""
        dim = getattr(self.unet.cfg, "time_cond_proj_dim", None)  # networks without it (DiT, PixArt) never embed w
        if dim is None:
            return cond
        w = torch.full((cond["context"].shape[0],), guidance - 1.0, dtype=torch.float32)  # (B,)
        return {**cond, "timestep_cond": guidance_scale_embedding(w, dim)}  # (B, dim)

    def network_conditioning(self, enc: TextEncoding, height: int, width: int,
                             aesthetic: float) -> dict[str, torch.Tensor]:
        """Network keyword arguments for a batch of encoded prompts."""
        cond = {"context": enc.context}
        if self.micro_conditioning:
            if enc.pooled is None and not self.time_ids_only:
                raise ValueError("micro-conditioning needs a text encoder with a pooled output")
            b = enc.context.shape[0]
            # SDXL paper sec. 2.2: original size and crop top-left as (h, w) pairs, then the target
            # size (base) or an aesthetic score (refiner).
            tail = [aesthetic] if self.aesthetic_conditioning else [height, width]
            ids = torch.tensor([height, width, 0, 0, *tail], dtype=torch.float32)
            if not self.time_ids_only:
                cond["text_embeds"] = enc.pooled
            cond["time_ids"] = ids.expand(b, ids.shape[0])
        return cond

    def extra_conditioning(self, request: GenerationRequest, n: int, cond: dict,
                           uncond: dict | None) -> tuple[dict, dict | None]:
        """cond and uncond with what a subclass adds to the network's inputs besides the prompt (a
        layout model: its boxes); unchanged here. n: images in the batch."""
        return cond, uncond

    def encode_prompts(self, prompts: list[str], negative_prompts: list[str], height: int, width: int,
                       guided: bool) -> tuple[dict, dict | None, list[str]]:
        """(cond, uncond or None, warnings) for one prompt and negative prompt per image."""
        # Every distinct text once, in one call so long prompts share one chunk count.
        texts = list(dict.fromkeys(prompts + (negative_prompts if guided else [])))
        # A1111 prompt syntax: (word:1.3) emphasis, BREAK, and prompts longer than one window
        # encoded in 75-token chunks; plain short prompts encode exactly as diffusers does.
        enc = encode_prompts(self.text_encoder, texts)
        window = self.text_encoder.max_length
        warnings = [f"prompt {t[:40]!r} was cut to the text encoder's {window} tokens"
                    for t, cut in zip(texts, enc.truncated, strict=True) if cut]
        if enc.mask is None and enc.context.shape[1] > window:
            warnings.append(f"long prompt: encoded in {enc.context.shape[1] // window} chunks of "
                            f"{window - 2} tokens (A1111 style)")

        def pick(batch: list[str]) -> TextEncoding:
            idx = torch.tensor([texts.index(t) for t in batch])
            pooled = None if enc.pooled is None else enc.pooled[idx]
            mask = None if enc.mask is None else enc.mask[idx]
            return TextEncoding(enc.context[idx], pooled, mask, [])

        cond = self.network_conditioning(pick(prompts), height, width, aesthetic=6.0)
        if not guided:
            return cond, None, warnings
        neg = pick(negative_prompts)
        if self.zero_empty_negative:
            empty = torch.tensor([not n for n in negative_prompts])
            neg = replace(neg, context=torch.where(empty[:, None, None], 0.0, neg.context),
                          pooled=None if neg.pooled is None else torch.where(empty[:, None], 0.0, neg.pooled))
        return cond, self.network_conditioning(neg, height, width, aesthetic=2.5), warnings

    # ------------------------------------------------------------------ images <-> latents

    def encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """PIL image -> (1, C, h, w) diffusion latents (posterior mode, resized to width x height)."""
        x = from_pil(image, (width, height)).to(self._vae_dtype())
        return self.vae.scale(self.vae.encode(x).mode().float())

    def decode(self, latents: torch.Tensor, preview: bool = False) -> list[Image.Image]:
        """(N, C, h, w) diffusion latents -> N PIL images; preview: with `self.preview_decoder`."""
        z = self.vae.unscale(latents.float())
        if preview:
            decoder = self._checked_preview_decoder()
            return to_pil(decoder(z.to(next(decoder.parameters()).dtype)))
        release_freed_memory()
        return to_pil(self.vae.decode(z.to(self._vae_dtype())))

    def _checked_preview_decoder(self) -> PreviewDecoder:
        d = self.preview_decoder
        if d is None:
            raise ValueError("preview decoding needs a preview decoder: set pipe.preview_decoder = "
                             "PreviewDecoder.load(PATH)")
        if (d.cfg.latent_channels, d.cfg.downsample_factor) != (self.latent_channels, self.vae_scale):
            raise ValueError(f"the preview decoder takes {d.cfg.latent_channels}-channel latents at factor "
                             f"{d.cfg.downsample_factor}; this model's are {self.latent_channels} at {self.vae_scale}")
        return d

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def compile(self) -> None:
        """From the next generate() on, run the U-Net through `torch.compile` (inductor, with the weights
        frozen into the graph as constants, which lets it pre-pack them for oneDNN and fuse the
        element-wise work between the matmuls).

        The first run at each new latent shape or batch size compiles: minutes for SD 1.5 on two cores.
        Inductor keeps the generated kernels in its on-disk cache (TORCHINDUCTOR_CACHE_DIR), so a later
        process compiles faster. Frozen weights: call it again after changing the U-Net's weights.
        DeepCache runs (deepcache > 1) use the eager U-Net.
        """
        from t2i.compact import is_compact
        from t2i.quantize import int8_layers

        if is_compact(self.unet):  # frozen constants would be fp32 copies of every weight: the saving gone
            raise ValueError("--compile freezes the weights as float32 constants; a compact model cannot be compiled "
                             "(use --precision fp32 or bf16 with --compile)")
        if int8_layers(self.unet):  # torch 2.13's inductor fails on oneDNN's int8 convolution (its output strides)
            raise ValueError("--compile cannot trace the int8 U-Net's oneDNN kernels; use --precision bf16 or fp32 "
                             "with --compile (`auto` picks bf16 when --compile is given)")
        self._compiled_unet = _FrozenCompiled(torch.compile(self.unet))

    def _sampling_net(self, deepcache: int = 1, control: tuple[ControlNet, torch.Tensor, float] | None = None,
                      eager: bool = False) -> nn.Module:
        """The U-Net as the float32 samplers call it (deepcache > 1: a DeepCacheUNet for one run;
        control: (ControlNet, its (1, C, H, W) image in [0, 1], scale), its residuals added; eager: never
        the compiled U-Net, for runs that change its attention between calls, as paint-with-words does)."""
        if deepcache > 1:
            net: nn.Module = DeepCacheUNet(self.unet, deepcache)
        else:
            compiled = self._compiled_unet is not None and not eager
            net = self._compiled_unet if compiled else self.unet  # type: ignore[assignment]
        if control is not None:
            net = ControlledUNet(net, *control)
        return CastInputs.around(net, self.unet)

    def sampling_denoiser(self, plan: SamplingPlan, net: nn.Module) -> Callable:
        """`net` (the U-Net as `_sampling_net` made it) behind the plan's denoiser contract. A subclass
        whose noise levels belong to several networks switches between them here (eDiff-I's experts,
        `t2i.systems.ediffi`); guidance and the x0 limit wrap whatever this returns."""
        return plan.denoiser(net)

    def _control(self, request: GenerationRequest, width: int, height: int
                 ) -> tuple[ControlNet, torch.Tensor, float] | None:
        """The request's ControlNet, checked against this model, with its image as diffusers'
        `StableDiffusionControlNetPipeline.prepare_image` makes it: RGB, Lanczos-resized to the output
        size, in [0, 1] (not normalised to [-1, 1]); None without one."""
        controlnet, image = request.controlnet, request.control_image
        if controlnet is None and image is None:
            return None
        if controlnet is None or image is None:
            raise ValueError("a ControlNet needs both controlnet and control_image")
        if not isinstance(controlnet, ControlNet):
            raise ValueError(f"the ControlNet does not fit this model: {self.name} ({self.family}) takes a loaded "
                             f"U-Net ControlNet, not a {type(controlnet).__name__}")
        check_fits(controlnet.control_cfg, self.unet.cfg, self.latent_channels, self.vae_scale)
        if request.mask is not None or request.deepcache > 1:
            raise ValueError("a ControlNet cannot be combined with inpainting or DeepCache (yet)")
        if not math.isfinite(request.control_scale):
            raise ValueError(f"control_scale must be a finite number, got {request.control_scale}")
        x = (from_pil(image, (width, height)) + 1) / 2  # (1, 3, H, W) in [0, 1]
        return controlnet, x.to(next(controlnet.parameters()).dtype), request.control_scale

    def _latent_mask(self, mask: Image.Image, h: int, w: int) -> torch.Tensor:
        """White = repaint. -> (1, 1, h, w) in {0, 1} at latent resolution (nearest, as diffusers)."""
        m = from_pil(mask.convert("L").convert("RGB"), (w * self.vae_scale, h * self.vae_scale))[:, :1]
        m = (m > 0).float()  # from_pil maps [0, 255] to [-1, 1]: > 0 is the upper half
        return F.interpolate(m, size=(h, w), mode="nearest")

    # ------------------------------------------------------------------ generation

    def _resolve(self, steps, guidance, sampler, schedule, width, height, init_image):
        d = self.defaults
        if init_image is not None and (width is None or height is None):
            # img2img keeps the input's size, rounded down to what the autoencoder can take
            width = width or init_image.width // self.vae_scale * self.vae_scale
            height = height or init_image.height // self.vae_scale * self.vae_scale
        steps, guidance = d.steps if steps is None else steps, d.guidance if guidance is None else guidance
        sampler, schedule = sampler or d.sampler, schedule or d.schedule
        width, height = width or d.width, height or d.height
        check_sampling_settings(sampler, schedule, steps, width, height, guidance, tuple(SAMPLERS),
                                ("default", "karras"), self.vae_scale)
        return steps, guidance, sampler, schedule, width, height

    def plan(self, sampler: str, steps: int, schedule: str, eta: float | None = None) -> SamplingPlan:
        """The full sampling plan for these settings on this model's schedule."""
        return plan_for_request(self.schedule, sampler, steps, schedule, eta)

    @torch.no_grad()
    def run(self, request: GenerationRequest) -> GenerationResult:
        """Generate request.num_images images per prompt. Unset settings take `self.defaults`.

        init_image + strength: img2img (SDEdit): the last int(steps * strength) steps run from the
        noised image latents (strength 0 returns the input, 1 ignores it; default 0.8, or 1.0 with
        a mask). mask (white = repaint): inpainting; 9-channel U-Nets also see the mask and the
        masked image, and every model keeps the unmasked latents (blended into each x0 estimate).
        refiner + refiner_start: the base runs the first refiner_start of the schedule, the refiner
        the rest on the same latents (SDXL's ensemble of expert denoisers).
        deepcache N > 1: the U-Net runs in full every N-th call and otherwise only its first level on
        the deep features of the last full call (DeepCache; faster, slightly different images).
        preview: decode with `self.preview_decoder` (a PreviewDecoder) instead of the VAE decoder.
        controlnet + control_image (+ control_scale): a ControlNet's residuals added to the U-Net's skips
        for both guidance branches (diffusers' StableDiffusionControlNetPipeline, guess_mode off); without
        width/height the output takes the control image's size, as there.
        callback(step, total) is called after each sampler step (for progress reporting).
        """
        nets = (self.unet, self.vae) + ((request.controlnet,) if isinstance(request.controlnet, nn.Module) else ())
        with stop_polling(request.should_stop, *nets):
            return self._generate(request)

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        r = request
        prompt, negative_prompt, seed, num_images = r.prompt, r.negative_prompt, r.seed, r.num_images
        init_image, strength, mask, refiner = r.init_image, r.strength, r.mask, r.refiner
        guidance_rescale, eta, deepcache, preview = r.guidance_rescale, r.eta, r.deepcache, r.preview
        refiner_start, progress, callback = r.refiner_start, r.progress, r.callback
        steps, guidance, sampler, schedule, width, height = self._resolve(
            r.steps, r.guidance, r.sampler, r.schedule, r.width, r.height,
            init_image if init_image is not None else r.control_image)  # diffusers: the control image's size
        if mask is not None and init_image is None:
            raise ValueError("a mask needs an init image")
        if self.unet.cfg.in_channels != self.latent_channels and mask is None:
            raise ValueError("this is an inpainting model: give an init image and a mask")
        strength = (1.0 if mask is not None else 0.8) if strength is None else strength
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if deepcache < 1:
            raise ValueError(f"deepcache must be at least 1, got {deepcache}")
        if preview:
            self._checked_preview_decoder()  # refuse before sampling, not after
        if r.regions and not self.paints_words:
            raise ValueError(f"{self.name} ({self.family}) does not take regions (paint-with-words)")
        regions = self.request_regions(replace(r, width=width, height=height))
        region_weight = DEFAULT_WEIGHT if r.region_weight is None else r.region_weight
        if not math.isfinite(region_weight):
            raise ValueError(f"region_weight must be a finite number, got {r.region_weight}")
        start = time.perf_counter()
        h, w = height // self.vae_scale, width // self.vae_scale

        prompts, negatives, seeds = per_image(prompt, negative_prompt, seed, num_images)
        guided = guidance > 1.0 and not self.embeds_guidance
        cond, uncond, warnings = self.encode_prompts(prompts, negatives, height, width, guided)
        cond = self._with_guidance_embedding(cond, guidance)
        if self.embeds_guidance and any(negatives):
            warnings.append("the negative prompt is ignored: this model takes guidance as an embedding "
                            "(no unconditional branch)")
        if self.prompt_check is not None:
            warnings += [m for m in map(self.prompt_check, dict.fromkeys(prompts)) if m]
        n = len(prompts)
        cond, uncond = self.extra_conditioning(r, n, cond, uncond)
        if regions is not None:  # eDiff-I's mask A rides with the conditional branch; zeros leave uncond alone
            masks = region_masks(self.text_encoder, prompts, regions, cond["context"].shape[1], (h, w))
            cond = {**cond, COND_KEY: masks}
            uncond = None if uncond is None else {**uncond, COND_KEY: torch.zeros_like(masks)}
            if refiner is not None:
                warnings.append("regions steer the base model's steps only, not the refiner's")
        plan = self.plan(sampler, steps, schedule, eta)
        refiner_plan = None
        if refiner is not None:
            plan, _ = plan.split(refiner_start)
            refiner_plan = refiner.plan(sampler, steps, schedule, eta).split(refiner_start)[1]
        net = self._sampling_net(deepcache, self._control(r, width, height), eager=regions is not None)
        init = keep = None
        if init_image is not None:
            init = self.encode_image(init_image, width, height).expand(n, -1, -1, -1)
            plan = plan.from_strength(strength)
        if mask is not None:
            keep = 1 - self._latent_mask(mask, h, w)  # (1, 1, h, w), 1 where the input stays
            if self.unet.cfg.in_channels == 2 * self.latent_channels + 1:
                masked = self.encode_image(_masked_image(init_image, mask, width, height), width, height)
                net = ConcatChannels(net, torch.cat([1 - keep, masked], dim=1))

        generators = seed_generators(seeds)
        noise = seed_noise(generators, (self.latent_channels, h, w))
        x = plan.start(noise, init)
        inner = self.sampling_denoiser(plan, net)
        if regions is not None:
            inner = PaintWithWords(inner, cross_attentions(self.unet), region_weight)
        denoiser = plan.limit_x0(CFGDenoiser(inner, guidance, guidance_rescale))
        if keep is not None:
            denoiser = KeepUnmasked(denoiser, init, keep)
        x = self._run(plan, denoiser, x, cond, uncond, generators, progress, callback, r.on_sample)
        latents = plan.finish(x)
        if refiner is not None and refiner_plan is not None:
            r_cond, r_uncond, r_warn = refiner.encode_prompts(prompts, negatives, height, width, guided)
            warnings += r_warn
            r_den = refiner_plan.limit_x0(CFGDenoiser(refiner_plan.denoiser(refiner._sampling_net()), guidance,
                                                      guidance_rescale))
            x = refiner._run(refiner_plan, r_den, refiner_plan.resume(latents), r_cond, r_uncond, generators,
                             progress, callback, r.on_sample)
            latents = refiner_plan.finish(x)

        images = self.decode(latents, preview)
        if mask is not None and init_image is not None:
            # The decoder's attention mixes every latent into every pixel, so the unmasked region is
            # pasted back from the input, as A1111 and diffusers' overlay do.
            images = [_overlay(init_image, im, mask) for im in images]
        resolved = replace(r, steps=steps, guidance=guidance, sampler=sampler, schedule=schedule, width=width,
                           height=height, strength=strength, regions=regions,
                           region_weight=region_weight if regions is not None else None)
        precision = self.precision
        # a layout model draws image i from layouts[i] (its own planned layout)
        layouts = r.layout if isinstance(r.layout, list) else [r.layout] * n
        for im, p, neg, sd, lay in zip(images, prompts, negatives, seeds, layouts, strict=True):
            im.info["parameters"] = request_parameters(replace(resolved, layout=lay), p, neg, sd, self.name, precision)
        return GenerationResult(images, latents, seeds, warnings, time.perf_counter() - start)

    def _run(self, plan: SamplingPlan, denoiser: Callable, x: torch.Tensor, cond: dict, uncond: dict | None,
             generators: list[torch.Generator], progress: bool,
             callback: Callable[[int, int], None] | None,
             on_sample: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        with StepReport(plan.steps, progress, callback, on_sample) as on_step:
            return plan.run(denoiser, x, {"cond": cond, "uncond": uncond}, on_step, generators)


class ConcatChannels(nn.Module):
    """An inpainting U-Net's extra input channels (mask, masked-image latents; seed 002) appended to
    the noisy latents, unscaled, as the network was trained: net(cat[x, extra], t, ...)."""

    def __init__(self, net: nn.Module, extra: torch.Tensor) -> None:
        super().__init__()
        self.net, self.extra = net, extra  # extra: (1, E, h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        extra = self.extra.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return self.net(torch.cat([x, extra], dim=1), t, **cond)


class KeepUnmasked(nn.Module):
    """Inpainting by latent blending: x0 estimates keep the input latents where keep = 1, so the
    sampler walks the unmasked region straight back to the input."""

    def __init__(self, denoiser: Callable, init: torch.Tensor, keep: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.init, self.keep = denoiser, init, keep

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.keep * self.init + (1 - self.keep) * self.inner(x, sigma, **kwargs)


def _masked_image(image: Image.Image, mask: Image.Image, width: int, height: int) -> Image.Image:
    """The input with the region to repaint blanked to mid-gray (0 in [-1, 1]), as diffusers does."""
    img = np.asarray(image.convert("RGB").resize((width, height), Image.LANCZOS)).astype(np.float32)
    m = np.asarray(mask.convert("L").resize((width, height), Image.NEAREST)) >= 128
    img[m] = 127.5
    return Image.fromarray(img.round().astype(np.uint8))


def _overlay(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """generated where the mask is white, the original elsewhere (both at the generated size)."""
    size = generated.size
    keep = mask.convert("L").resize(size, Image.NEAREST).point(lambda v: 255 if v < 128 else 0)
    out = generated.copy()
    out.paste(original.convert("RGB").resize(size, Image.LANCZOS), (0, 0), keep)
    out.info = dict(generated.info)
    return out


def outpaint_canvas(image: Image.Image, left: int = 0, top: int = 0, right: int = 0,
                    bottom: int = 0) -> tuple[Image.Image, Image.Image]:
    """Outpainting as inpainting: the image padded with gray on each side, and the mask of the padding."""
    w, h = image.width + left + right, image.height + top + bottom
    canvas = Image.new("RGB", (w, h), (127, 127, 127))
    canvas.paste(image.convert("RGB"), (left, top))
    mask = Image.new("L", (w, h), 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask
