"""DDPM (Ho et al. 2020): a pixel-space eps-prediction U-Net sampled ancestrally (Algorithm 2).

There is no autoencoder: the sampler walks the images themselves, in [-1, 1]. The network is
`t2i.nets.pixel_unet.PixelUNet`, unconditional (DDPM's CIFAR/LSUN models, diffusers'
`DDPMPipeline`) or text-conditional by cross-attention to the frozen MiniLM token states (the
shapes world needs text: the judge scores prompts), with classifier-free guidance. Every t2i
sampler runs on it through the denoiser contract: "ddpm" is Algorithm 2, "ddim" Song et al.
(2021); the schedules are diffusers' spacings ("default", "karras") or IDDPM's respacing
("iddpm": `steps` timesteps evenly over [0, T), the first and last included; Nichol & Dhariwal
2021 sec. 4), the few-step DDPM of the improved paper. A network with 2C output channels learns its
variance (IDDPM): "ddpm" then samples with it (`t2i.samplers.learned_variance`, diffusers'
`variance_type="learned_range"`, also over the respaced betas); the other samplers use its eps half.
`with_classifier` adds ADM's classifier guidance (a `t2i train classifier` file) to every sampler,
towards the class the prompt names, next to classifier-free guidance.

Two layouts load: t2i's own file (one safetensors, `unet.*` weights, the resolved `DDPMConfig`
as JSON in its metadata, like the shapes LDM) and a diffusers DDPM/DDIM folder
(`t2i.checkpoints.diffusers_ddpm`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.checkpoints.diffusers_ddpm import is_diffusers_ddpm, read_diffusers_ddpm
from t2i.checkpoints.io import (
    CheckpointError,
    check_safetensors_header,
    header_tensors,
    is_system_file,
    load_state_dict,
    model_name,
    read_config,
    save_with_config,
    system_file,
)
from t2i.checkpoints.limits import build_checked, check_schedule, fill
from t2i.data.shapes_vocab import out_of_world_warning
from t2i.diffusion.classifier_guidance import ClassifierGuidance
from t2i.diffusion.clip_guidance import ClipGuide
from t2i.diffusion.schedules import ScheduleConfig, respace_timesteps, respaced_sigmas
from t2i.imageio import request_parameters, to_pil
from t2i.nets.cast_inputs import CastInputs
from t2i.nets.classifier import load_noisy_classifier
from t2i.nets.glide_clip import is_noisy_clip, load_noisy_clip
from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS, PixelUNet, PixelUNetConfig
from t2i.quantize import precision_of
from t2i.samplers.diffusers_plan import SamplingPlan, plan_for_request
from t2i.samplers.learned_variance import sample_guided
from t2i.samplers.sampling import SAMPLERS
from t2i.seeds import seed_generators, seed_noise
from t2i.systems.base import (
    Capabilities,
    GenerationDefaults,
    GenerationRequest,
    GenerationResult,
    RequestMethods,
    ShippedModel,
    StepReport,
    System,
    UnsupportedOption,
    check_sampling_request,
    per_image,
    stop_polling,
)
from t2i.systems.guide_files import GuideFiles

SCHEDULES = ("default", "karras", "iddpm")
OPTIONS = frozenset({"steps", "sampler", "schedule", "eta", "width", "height"})  # what run() honours
TEXT_OPTIONS = OPTIONS | {"negative_prompt", "guidance"}  # and with a text-conditional network
# ADM's classifier guidance: any DDPM (classifier_name: what the PNG calls the file, e.g. `t2i serve`'s NAME)
GUIDE_OPTIONS = frozenset({"classifier", "classifier_scale", "classifier_name"})


def ddpm_schedule(beta_schedule: str = "linear") -> ScheduleConfig:
    """DDPM's training schedule (T = 1000, betas 1e-4 .. 0.02 linear, or IDDPM's cosine) with every
    sampler setting stated: x0 clipped to the image range [-1, 1], as DDPM's sampler does, and
    trailing spacing so that a few-step run starts at the last training timestep."""
    return ScheduleConfig(beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02,
                          prediction_type="epsilon", timestep_spacing="trailing", steps_offset=0, clip_sample=True,
                          thresholding=False, set_alpha_to_one=True, final_sigmas_type="zero")


@dataclass
class DDPMConfig:
    """Everything needed to rebuild a t2i DDPM model from its weight file."""

    net: PixelUNetConfig = field(default_factory=lambda: replace(PIXEL_UNET_PRESETS["shapes_32"]))
    schedule: ScheduleConfig = field(default_factory=ddpm_schedule)
    text_encoder: str | None = "minilm"  # all-MiniLM-L6-v2 token states; None for an unconditional net
    text_length: int = 32
    sampler: str = "ddpm"
    schedule_name: str = "default"
    steps: int = 50
    guidance: float = 3.0
    image_size: int = 32

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DDPMConfig:
        d = dict(d)
        return cls(net=PixelUNetConfig(**d.pop("net")), schedule=ScheduleConfig(**d.pop("schedule")), **d)


class DDPMPipeline(RequestMethods):
    """A pixel U-Net, its training schedule and (text-conditional nets) the frozen text encoder.

    Args:
        net: eps(x_t, t[, context]) on images in [-1, 1].
        schedule: the training schedule and sampler settings (clip_sample for images).
        text_encoder: prompts -> TextEncoding; None for an unconditional network (prompts ignored).
        name: shown in the PNG parameters; defaults: settings a request does not give.
    """

    family = "ddpm"

    def __init__(self, net: PixelUNet, schedule: ScheduleConfig, *, text_encoder: nn.Module | None = None,
                 name: str = "ddpm", defaults: GenerationDefaults | None = None) -> None:
        if net.pixel_cfg.text_conditional != (text_encoder is not None):
            raise ValueError("a text-conditional network needs a text encoder, an unconditional one none")
        # `unet`, as LatentDiffusionPipeline names it: t2i.load's int8 precision quantizes pipe.unet
        self.unet, self.schedule, self.text_encoder = net, schedule, text_encoder
        self.name = name
        size = net.pixel_cfg.sample_size
        self.defaults = defaults or GenerationDefaults(sampler="ddpm", steps=50, guidance=1.0, width=size,
                                                       height=size)
        self.prompt_check = out_of_world_warning if text_encoder is not None else None
        # ADM's classifier guidance: the files requests name, and `with_classifier`'s default
        self.classifiers = GuideFiles(read_classifier, lambda: self.schedule, "classifier")

    def with_classifier(self, path: str | Path, scale: float) -> DDPMPipeline:
        """Guide every later request with a noise-aware classifier file (`t2i train classifier`) at scale s
        (Dhariwal & Nichol 2021), towards the class the prompt names ("a red circle" -> "circle"), or with a
        noise-aware CLIP file (`t2i train noisy-clip`) towards the caption (GLIDE's CLIP guidance), on top
        of classifier-free guidance if the request asks for it; a request's own classifier_scale replaces s.
        Scale 0 turns it off. Returns self."""
        self.classifiers.set_default(path, scale)
        return self

    def check_classifier(self, path: str | Path) -> None:
        """Load the classifier file at `path` (kept for the requests that name it) and check that it is an ADM
        classifier or a noise-aware CLIP of this model's noise schedule; ValueError (CheckpointError) naming the
        problem otherwise. `t2i serve --classifier` checks its files with it at startup."""
        self.classifiers.get(path)

    def check_guidance(self, request: GenerationRequest) -> None:
        """Refuse (UnsupportedOption naming the request field, a ValueError) classifier guidance the request
        cannot have, before any work: a classifier_scale without a classifier, or a prompt that does not name
        exactly one of the classifier's classes (a noise-aware CLIP takes any prompt). The server's Resolver calls
        it after resolving the classifier's name (a 422), `run` before sampling."""
        requested = self.classifiers.requested(self.classifiers.resolve(request))
        if requested is not None:
            for prompt in dict.fromkeys([request.prompt] if isinstance(request.prompt, str) else request.prompt):
                requested[0].check_prompt(prompt)

    @property
    def capabilities(self) -> Capabilities:
        d = self.defaults
        return Capabilities(options=(TEXT_OPTIONS if self.text_encoder is not None else OPTIONS) | GUIDE_OPTIONS,
                            samplers=tuple(SAMPLERS), schedules=SCHEDULES, size_multiple=self.size_multiple,
                            native_size=(d.width, d.height), max_steps=self.schedule.num_train_timesteps)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.unet.pixel_cfg.block_channels) - 1)

    @property
    def learned_variance(self) -> bool:
        """Whether the network outputs its variance values after eps (IDDPM's learned Sigma)."""
        c = self.unet.pixel_cfg
        return c.out_channels == 2 * c.in_channels

    def plan(self, sampler: str, steps: int, schedule: str, eta: float | None = None) -> SamplingPlan:
        """The sampler run: diffusers' spacing of the model's schedule ("default", "karras"), or
        IDDPM's respacing, the same plan over `respaced_sigmas` with x0 limited as configured."""
        if schedule != "iddpm":
            return plan_for_request(self.schedule, sampler, steps, schedule, eta)
        if eta and sampler != "ddim":
            raise ValueError("eta applies to the ddim sampler only")
        acp = self.schedule.alphas_cumprod()
        sigmas, timesteps = respaced_sigmas(acp, respace_timesteps(acp.shape[0], str(steps)))
        limit = ("clip", self.schedule.clip_sample_range) if self.schedule.clip_sample else None
        return SamplingPlan(sampler, sigmas, timesteps, float((sigmas[0] ** 2 + 1) ** 0.5), acp,
                            self.schedule.prediction_type, {"eta": eta or 0.0} if sampler == "ddim" else {},
                            limit, steps)

    def _resolve(self, r: GenerationRequest) -> GenerationRequest:
        r = r.with_defaults(self.defaults)
        check_sampling_request(r, SAMPLERS, SCHEDULES, self.size_multiple)
        self.check_guidance(r)
        return self.classifiers.resolve(r)  # `with_classifier`'s, recorded as any request's

    def _conditioning(self, prompts: list[str], negatives: list[str], guided: bool) -> tuple[dict, dict | None]:
        """(cond, uncond) network keyword arguments, one row per image."""
        if self.text_encoder is None:
            return {}, None
        texts = list(dict.fromkeys(prompts + (negatives if guided else [])))
        context = self.text_encoder.encode(texts).context.float()  # (U, T, 384), every text once

        def pick(batch: list[str]) -> dict[str, torch.Tensor]:
            return {"context": context[torch.tensor([texts.index(t) for t in batch])]}  # (B, T, 384)

        return pick(prompts), pick(negatives) if guided else None

    @torch.no_grad()
    def run(self, request: GenerationRequest) -> GenerationResult:
        """Generate request.num_images images per prompt; image i of seed s starts from seed s + i."""
        with stop_polling(request.should_stop, self.unet):
            return self._generate(request)

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        start = time.perf_counter()
        r = self._resolve(request)
        prompts, negatives, seeds = per_image(r.prompt, r.negative_prompt, r.seed, r.num_images)
        guided = self.text_encoder is not None and r.guidance > 1.0
        cond, uncond = self._conditioning(prompts, negatives, guided)
        warnings = [m for m in map(self.prompt_check, dict.fromkeys(prompts)) if m] if self.prompt_check else []
        plan = self.plan(r.sampler, r.steps, r.schedule, r.eta)
        generators = seed_generators(seeds)
        x = plan.start(seed_noise(generators, (self.unet.pixel_cfg.in_channels, r.height, r.width)))  # (N, 3, H, W)
        requested = self.classifiers.requested(r)
        guide = None if requested is None else functools.partial(requested[0].around, prompts=prompts,
                                                                 scale=requested[1])
        with StepReport.of(r, plan.steps) as on_step:
            images = sample_guided(plan, CastInputs.around(self.unet), x, cond, uncond, r.guidance, generators,
                                   on_step, learned_variance=self.learned_variance, guide=guide)
        pictures = to_pil(images)
        for im, p, neg, sd in zip(pictures, prompts, negatives, seeds, strict=True):
            im.info["parameters"] = request_parameters(r, p, neg, sd, self.name, precision_of(self.unet))
        return GenerationResult(pictures, images, seeds, warnings, time.perf_counter() - start)


@dataclass
class ClassifierGuide:
    """A noise-aware classifier (logits of VP images at t) and its class names."""

    classifier: nn.Module
    labels: list[str]

    def label_of(self, prompt: str) -> int:
        """The one class whose name is a word of the prompt; UnsupportedOption (a ValueError) naming the prompt
        and the classes otherwise."""
        words = set(prompt.lower().replace(",", " ").split())
        found = [i for i, name in enumerate(self.labels) if name.lower() in words]
        if len(found) != 1:
            raise UnsupportedOption("prompt", f"classifier guidance needs a prompt naming exactly one of "
                                              f"{', '.join(self.labels)}; prompt {prompt[:100]!r} names {len(found)}")
        return found[0]

    def check_prompt(self, prompt: str) -> None:
        """UnsupportedOption unless the prompt names exactly one class (`label_of`)."""
        self.label_of(prompt)

    def around(self, denoiser: Any, sigma_to_t: Any, prompts: list[str], scale: float) -> ClassifierGuidance:
        """ADM's guidance at scale s towards the class each prompt names."""
        labels = torch.tensor([self.label_of(p) for p in prompts])  # (B,)
        return ClassifierGuidance(denoiser, self.classifier, labels, scale, sigma_to_t)


def read_classifier(path: str | Path) -> tuple[ClassifierGuide | ClipGuide, ScheduleConfig]:
    """A `t2i train classifier` file -> (its classifier and class names, the schedule it was trained on); a
    `t2i train noisy-clip` file -> (its noise-aware CLIP, GLIDE's CLIP guidance, the same for a DDPM)."""
    if is_noisy_clip(path):
        clip, schedule = load_noisy_clip(path)
        return ClipGuide(clip), schedule
    classifier, labels, schedule = load_noisy_classifier(path)
    return ClassifierGuide(classifier, labels), schedule


# ---------------------------------------------------------------------------------------
# The t2i file: save, detect, load
# ---------------------------------------------------------------------------------------

SYSTEM_NAME = "ddpm"
SMALL_DIR = Path(__file__).resolve().parent.parent / "assets" / "ddpm_small"
SHIPPED = (ShippedModel("t2i-ddpm-small", SMALL_DIR / "model.safetensors", "pixel-space DDPM small enough to ship: "
                        "a 1.58 M-parameter 32x32 U-Net, v-prediction on the cosine schedule, captions through MiniLM "
                        "(fp16, 3.2 MB)", card=SMALL_DIR / "MODEL_CARD.md"),)


def save_ddpm(net: PixelUNet, cfg: DDPMConfig, path: str | Path) -> None:
    """Write the network as `unet.*` with the resolved config in the metadata, atomically."""
    state = {f"unet.{k}": v.detach().float() for k, v in net.state_dict().items()}
    save_with_config(state, path, dataclasses.asdict(cfg), SYSTEM_NAME)


def is_t2i_ddpm(path: Path) -> bool:
    """A file written by `save_ddpm` (or a folder holding one as model.safetensors)."""
    return is_system_file(path, SYSTEM_NAME)


def load_text_encoder(cfg: DDPMConfig) -> nn.Module | None:
    """The frozen text encoder the config names (None for an unconditional model)."""
    if cfg.text_encoder is None:
        return None
    if cfg.text_encoder != "minilm":
        raise ValueError(f"unknown text encoder {cfg.text_encoder!r} (expected 'minilm' or none)")
    from t2i.text.encoders import MiniLMTextEncoder

    return MiniLMTextEncoder.load(max_length=cfg.text_length)


def _checked_net(cfg: PixelUNetConfig, tensors: dict[str, torch.Tensor], state: Any, what: str) -> PixelUNet:
    """Config and files' tensor names/shapes checked on the meta device, then the weights assigned;
    `state` is called for the weights only after the checks pass."""
    net = build_checked(lambda: PixelUNet(cfg), {"net": cfg}, tensors, what)
    return fill(net, state(), torch.float32)


def load_t2i_ddpm(path: Path) -> tuple[PixelUNet, DDPMConfig]:
    """A t2i DDPM file -> (network, config), checked before anything is allocated."""
    raw = read_config(path, "a t2i DDPM file", SYSTEM_NAME)
    try:
        cfg = DDPMConfig.from_dict(raw)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed DDPM config ({type(e).__name__}: {e})") from None
    check_schedule(cfg.schedule, f"{path}: schedule")
    tensors = {k.removeprefix("unet."): v for k, v in header_tensors(check_safetensors_header(path)).items()}

    def weights() -> dict[str, torch.Tensor]:
        return {k.removeprefix("unet."): v for k, v in load_state_dict(path).items()}

    return _checked_net(cfg.net, tensors, weights, str(path)), cfg


def load(path: Path, dtype: torch.dtype = torch.float32) -> DDPMPipeline:
    """A t2i DDPM file/folder or a diffusers DDPM/DDIM folder -> DDPMPipeline (float32 weights
    unless dtype says otherwise)."""
    path = Path(path)
    if is_diffusers_ddpm(path):
        net_cfg, schedule, files = read_diffusers_ddpm(path)
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(header_tensors(check_safetensors_header(f)) if f.suffix == ".safetensors"
                           else load_state_dict(f))

        def weights() -> dict[str, torch.Tensor]:
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_state_dict(f))
            return state

        net = _checked_net(net_cfg, tensors, weights, str(path))
        pipe = DDPMPipeline(net, schedule, name=path.name)
    else:
        file = system_file(path)
        net, cfg = load_t2i_ddpm(file)
        defaults = GenerationDefaults(sampler=cfg.sampler, schedule=cfg.schedule_name, steps=cfg.steps,
                                      guidance=cfg.guidance, width=cfg.image_size, height=cfg.image_size)
        name = model_name(file)
        pipe = DDPMPipeline(net, cfg.schedule, text_encoder=load_text_encoder(cfg), name=name, defaults=defaults)
    if dtype != torch.float32:
        pipe.unet.to(dtype)
    return pipe


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """A random text-conditional model of the tiny preset (16x16 images) as folder/model.safetensors."""
    torch.manual_seed(seed)
    cfg = DDPMConfig(net=replace(PIXEL_UNET_PRESETS["tiny"]), image_size=PIXEL_UNET_PRESETS["tiny"].sample_size)
    folder.mkdir(parents=True, exist_ok=True)
    save_ddpm(PixelUNet(cfg.net), cfg, folder / "model.safetensors")
    return folder / "model.safetensors"


SYSTEM = System(
    name=SYSTEM_NAME,
    description="pixel-space DDPM: a t2i DDPM .safetensors with a t2i_config (or a folder holding it as "
                "model.safetensors), or a diffusers DDPMPipeline/DDIMPipeline folder",
    detect=lambda path: is_diffusers_ddpm(Path(path)) or is_t2i_ddpm(Path(path)),
    load=load,
    write_tiny=write_tiny,
    shipped=SHIPPED,
)
