"""Imagen / DeepFloyd IF (Saharia et al. 2022; DeepFloyd 2023): a cascade of pixel-space diffusion models
conditioned on a frozen text encoder.

Stage I draws a small image from the text (IF: 64x64); stage II upsamples it (IF: 4x, to 256x256),
reading the text again, the stage-I image upsampled bilinearly and noised at a fixed augmentation level
(noise conditioning augmentation, `t2i.diffusion.noise_augmentation`), concatenated to its noisy input,
and that level as a second timestep embedding. Both stages are `t2i.nets.if_unet.IFUNet`s predicting eps
and a learned variance (IDDPM's "learned_range"), sampled with DDPM ancestral steps by default under
classifier-free guidance, with Imagen's dynamic thresholding of x0 as a wrapper around the guided
denoiser (`t2i.diffusion.thresholding`, from the scheduler's `thresholding` settings: IF p = 0.95, cap 1.5).

What a request's settings mean for a cascade: width/height are the final image's; stage I runs at
that size divided by the stage-II factor. steps, guidance, sampler, schedule and eta apply to stage I;
stage II takes the pipeline's `sr_steps` and `sr_guidance` (IF's defaults 50, 4.0; set them on the pipeline
from Python), the request's sampler and its noise_level (unset: the pipeline's `noise_level`, IF's 250), which
the PNG records. Image i of seed s uses one generator
(seed s + i) for both stages, in the order diffusers draws when one generator is passed to both
pipelines: stage I's start and step noise, then stage II's start, augmentation and step noise.

Layouts:
- a diffusers `IFPipeline` folder: stage I alone (T5 encoder and tokenizer read locally);
- a cascade folder: `stage_1/` (an IFPipeline folder) and `stage_2/` (an IFSuperResolutionPipeline
  folder), e.g. two symlinks to downloaded folders; stage I's text encoder serves both stages (IF's
  stages share T5-XXL; a stage II copy is not loaded). `load_cascade(base, sr)` does the same in Python;
- t2i's own file (one safetensors, `base.*` and `sr.*` weights, `IFConfig` in its metadata): the frozen
  MiniLM text encoder, what the tiny test model and shapes-world runs use.
Prompts are lower-cased and stripped as diffusers does without `clean_caption` (its HTML/URL scrubbing
needs bs4 and ftfy and is not implemented). No safety checker or watermark.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i.checkpoints.diffusers_folder import file_tensors
from t2i.checkpoints.diffusers_if import (
    BASE,
    SUPER_RESOLUTION,
    if_pipeline_class,
    read_if_schedules,
    read_if_unet_config,
)
from t2i.checkpoints.io import (
    CheckpointError,
    check_safetensors_header,
    find_weights,
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
from t2i.diffusion.denoiser import PREDICTIONS
from t2i.diffusion.noise_augmentation import NoiseAugmentation
from t2i.diffusion.schedules import ScheduleConfig
from t2i.imageio import request_parameters, to_pil
from t2i.nets.cast_inputs import CastInputs
from t2i.nets.if_unet import IF_UNET_PRESETS, IFUNet, IFUNetConfig
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
    StepReport,
    System,
    check_sampling_request,
    per_image,
    stop_polling,
)

SYSTEM_NAME = "deepfloyd_if"
OPTIONS = frozenset({"negative_prompt", "steps", "guidance", "sampler", "schedule", "eta", "width", "height"})
SR_OPTIONS = frozenset({"noise_level"})  # stage II's augmentation level: only a cascade takes it
SCHEDULES = ("default", "karras")
IMAGE_CHANNELS = 3
TEXT_LENGTH = 77  # IFPipeline's T5 window
# IFPipeline's and IFSuperResolutionPipeline's defaults
STEPS, GUIDANCE, SR_STEPS, SR_GUIDANCE, NOISE_LEVEL = 100, 7.0, 50, 4.0, 250


def if_schedule(thresholding: bool = True) -> ScheduleConfig:
    """IF's sampling schedule: cosine betas over T = 1000, eps-prediction (the variance is the
    network's), x0 dynamically thresholded (p = 0.95, cap 1.5) or, without thresholding, clipped to +-1."""
    return ScheduleConfig(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", timestep_spacing="leading",
                          steps_offset=0, clip_sample=True, thresholding=thresholding,
                          dynamic_thresholding_ratio=0.95, sample_max_value=1.5, set_alpha_to_one=True,
                          final_sigmas_type="zero")


def noising_schedule() -> ScheduleConfig:
    """The schedule stage II's input is noised with (IF's image_noising_scheduler: cosine, T = 1000)."""
    return ScheduleConfig(beta_schedule="squaredcos_cap_v2")


@dataclass
class IFStage:
    """One stage of the cascade: its network, its sampling schedule and (stage II) the schedule its
    low-resolution input is noised with."""

    net: IFUNet
    schedule: ScheduleConfig
    noising: ScheduleConfig | None = None

    @property
    def super_resolution(self) -> bool:
        return self.net.cfg.in_channels == 2 * IMAGE_CHANNELS

    @property
    def learned_variance(self) -> bool:
        return self.net.cfg.out_channels == 2 * IMAGE_CHANNELS

    def augmentation(self) -> NoiseAugmentation:
        if self.noising is None:
            raise ValueError("a super-resolution stage needs its image-noising schedule")
        return NoiseAugmentation(self.noising.alphas_cumprod())


class LowResInput(nn.Module):
    """A super-resolution network seen as a plain one: net(cat[x, low_res], t, context, class_labels=level).
    The noised low-resolution image and its level travel in the conditioning (batched with it under
    guidance); the image is not scaled with x (diffusers concatenates it after scale_model_input)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, low_res: torch.Tensor,
                noise_level: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W); low_res: (B, 3, H, W) upsampled and noised; noise_level: (B,) -> (B, 6, H, W)."""
        return self.net(torch.cat([x, low_res.to(x.dtype)], dim=1), t, context=context, class_labels=noise_level)


class IFPipeline(RequestMethods):
    """Stage I (and optionally stage II) with the frozen text encoder.

    Args:
        base: stage I; sr: stage II or None.
        text_encoder: prompts -> TextEncoding (T5 for IF folders, MiniLM for t2i files).
        name, defaults: as every pipeline (defaults.width/height: the final image's native size).
    Attributes a caller may set: sr_steps, sr_guidance, noise_level (stage II's settings; a request's own
    noise_level overrides the last for that request).
    """

    family = SYSTEM_NAME

    def __init__(self, base: IFStage, text_encoder: nn.Module, *, sr: IFStage | None = None, name: str = "if",
                 defaults: GenerationDefaults | None = None, sr_steps: int = SR_STEPS,
                 sr_guidance: float = SR_GUIDANCE, noise_level: int = NOISE_LEVEL) -> None:
        if base.super_resolution:
            raise ValueError("stage I must be a base model (3 input channels), not a super-resolution one")
        if sr is not None and not sr.super_resolution:
            raise ValueError("stage II must be a super-resolution model (6 input channels)")
        for stage in (base, sr):
            width = None if stage is None else (stage.net.cfg.encoder_hid_dim or stage.net.cfg.context_dim)
            if width is not None and width != text_encoder.context_dim:
                raise ValueError(f"the text encoder gives {text_encoder.context_dim}-wide states, a stage reads "
                                 f"{width}")
        # `unet`: stage I under the name t2i.load's int8 quantization looks for
        self.base, self.sr, self.unet, self.text_encoder, self.name = base, sr, base.net, text_encoder, name
        size = base.net.cfg.sample_size * self.scale
        self.defaults = defaults or GenerationDefaults(sampler="ddpm", steps=STEPS, guidance=GUIDANCE, width=size,
                                                       height=size)
        self.sr_steps, self.sr_guidance, self.noise_level = sr_steps, sr_guidance, noise_level
        self.prompt_check: Callable[[str], str | None] | None = None

    @property
    def scale(self) -> int:
        """Final size / stage I size: the stage II networks' trained sizes' ratio (1 without stage II)."""
        if self.sr is None:
            return 1
        return max(1, self.sr.net.cfg.sample_size // self.base.net.cfg.sample_size)

    @property
    def size_multiple(self) -> int:
        """Final sides must be multiples of this: stage I's multiple times the factor, and stage II's."""
        base = self.scale * self.base.net.cfg.size_multiple
        return base if self.sr is None else math.lcm(base, self.sr.net.cfg.size_multiple)

    @property
    def capabilities(self) -> Capabilities:
        d = self.defaults
        options = OPTIONS if self.sr is None else OPTIONS | SR_OPTIONS
        return Capabilities(options=options, samplers=tuple(SAMPLERS), schedules=SCHEDULES,
                            size_multiple=self.size_multiple, native_size=(d.width, d.height))

    def _resolve(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the defaults filled in (noise_level: the pipeline's, with stage II), checked."""
        r = request.with_defaults(self.defaults)
        if self.sr is not None and r.noise_level is None:
            r = replace(r, noise_level=self.noise_level)
        check_sampling_request(r, SAMPLERS, SCHEDULES, self.size_multiple)
        if self.sr is None and r.noise_level is not None:
            raise ValueError(f"{self.name} has no stage II: noise_level is the super-resolution stage's")
        level = r.noise_level
        if self.sr is not None and not (isinstance(level, int) and 0 <= level < self.sr.augmentation().levels):
            raise ValueError(f"noise_level must be a timestep of the noising schedule (0..."
                             f"{self.sr.augmentation().levels - 1}), got {level!r}")
        return r

    def _conditioning(self, prompts: list[str], negatives: list[str],
                      guided: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, list[str]]:
        """(cond, uncond or None, warnings): every distinct text encoded once, lower-cased and stripped
        (IFPipeline's `_text_preprocessing` without clean_caption). The whole window goes to the network,
        padding included, unmasked, as IFPipeline passes it."""
        texts = list(dict.fromkeys(prompts + (negatives if guided else [])))
        enc = self.text_encoder.encode([t.lower().strip() for t in texts])
        context = enc.context.float()  # (U, T, D)
        warnings = [f"prompt {t[:40]!r} was cut to the text encoder's {self.text_encoder.max_length} tokens"
                    for t, cut in zip(texts, enc.truncated, strict=True) if cut]

        def pick(batch: list[str]) -> dict[str, torch.Tensor]:
            return {"context": context[torch.tensor([texts.index(t) for t in batch])]}  # (B, T, D)

        return pick(prompts), pick(negatives) if guided else None, warnings

    @torch.no_grad()
    def run(self, request: GenerationRequest) -> GenerationResult:
        """Generate request.num_images images per prompt; image i of seed s starts from seed s + i."""
        with stop_polling(request.should_stop, *(s.net for s in (self.base, self.sr) if s is not None)):
            return self._generate(request)

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        start = time.perf_counter()
        r = self._resolve(request)
        prompts, negatives, seeds = per_image(r.prompt, r.negative_prompt, r.seed, r.num_images)
        guided = r.guidance > 1.0 or (self.sr is not None and self.sr_guidance > 1.0)
        cond, uncond, warnings = self._conditioning(prompts, negatives, guided)
        if self.prompt_check is not None:
            warnings += [m for m in map(self.prompt_check, dict.fromkeys(prompts)) if m]
        plan = self._plan(self.base, r.sampler, r.steps, r.schedule, r.eta)
        sr_plan = None if self.sr is None else self._plan(self.sr, r.sampler, self.sr_steps, "default", None)
        generators = seed_generators(seeds)
        with StepReport.of(r, plan.steps + (0 if sr_plan is None else sr_plan.steps)) as report:
            x = plan.start(seed_noise(generators, (IMAGE_CHANNELS, r.height // self.scale, r.width // self.scale)))
            x = sample_stage(self.base, plan, x, cond, uncond, r.guidance, generators, report)  # (N, 3, h, w)
            if self.sr is not None and sr_plan is not None:
                x = self.upsample(x, cond, uncond, sr_plan, generators, r.height, r.width,
                                  lambda info: report({**info, "i": info["i"] + plan.steps}),  # counted after I's
                                  r.noise_level)
        pictures = to_pil(x)
        for im, p, neg, sd in zip(pictures, prompts, negatives, seeds, strict=True):
            text = request_parameters(r, p, neg, sd, self.name, precision_of(self.unet))
            im.info["parameters"] = text if r.noise_level is None else f"{text}, Noise level: {r.noise_level}"
        return GenerationResult(pictures, x, seeds, warnings, time.perf_counter() - start)

    def upsample(self, low: torch.Tensor, cond: dict, uncond: dict | None, plan: SamplingPlan,
                 generators: list[torch.Generator], height: int, width: int,
                 report: Callable[[dict], None], noise_level: int | None = None) -> torch.Tensor:
        """Stage II on stage I's samples `low` (N, 3, h, w) in [-1, 1] (unclipped, as IF hands them over)
        -> (N, 3, height, width): start noise, then the bilinear upsampling noised at `noise_level` (None: the
        pipeline's; noise conditioning augmentation), then the sampler, each image's noise from its generator."""
        assert self.sr is not None
        level = self.noise_level if noise_level is None else noise_level
        x = plan.start(seed_noise(generators, (IMAGE_CHANNELS, height, width)))
        upscaled = F.interpolate(low.float(), (height, width), mode="bilinear", align_corners=True)
        noised, levels = self.sr.augmentation().at_level(upscaled, level,
                                                         seed_noise(generators, tuple(upscaled.shape[1:])))
        extra = {"low_res": noised, "noise_level": levels}
        return sample_stage(self.sr, plan, x, {**cond, **extra}, None if uncond is None else {**uncond, **extra},
                            self.sr_guidance, generators, report)

    @torch.no_grad()
    def super_resolve(self, prompts: list[str], low: torch.Tensor, seed: int = 0,
                      noise_level: int | None = None) -> torch.Tensor:
        """Stage II alone on given images (what diffusers' IFSuperResolutionPipeline does), e.g. real
        low-resolution scenes where a cascade would hand over stage I's samples.

        low: (N, 3, h, w) in [-1, 1], one prompt each -> (N, 3, h * scale, w * scale) in [-1, 1]; image i's
        noise from seed + i (fresh generators, so not the cascade's draws for the same seed); guidance
        against the empty prompt at sr_guidance; noise_level None: the pipeline's."""
        if self.sr is None:
            raise ValueError(f"{self.name} has no stage II to super-resolve with")
        if low.dim() != 4 or low.shape[0] != len(prompts) or low.shape[1] != IMAGE_CHANNELS:
            raise ValueError(f"low must be (N, 3, h, w) with one prompt per image, got {tuple(low.shape)} for "
                             f"{len(prompts)} prompts")
        level = self.noise_level if noise_level is None else noise_level
        r = self._resolve(GenerationRequest(prompt=prompts[0], noise_level=level, height=low.shape[2] * self.scale,
                                            width=low.shape[3] * self.scale))
        guided = self.sr_guidance > 1.0
        cond, uncond, _ = self._conditioning(list(prompts), [""] * len(prompts), guided)
        plan = self._plan(self.sr, r.sampler, self.sr_steps, "default", None)
        generators = seed_generators([seed + i for i in range(len(prompts))])
        return self.upsample(low, cond, uncond, plan, generators, r.height, r.width, lambda info: None, level)

    def _plan(self, stage: IFStage, sampler: str, steps: int, schedule: str, eta: float | None) -> SamplingPlan:
        return plan_for_request(stage.schedule, sampler, steps, schedule, eta)


def sample_stage(stage: IFStage, plan: SamplingPlan, x: torch.Tensor, cond: dict, uncond: dict | None,
                 guidance: float, generators: list[torch.Generator], report: Callable[[dict], None]) -> torch.Tensor:
    """One stage's sampler run from x (VE, at plan.sigmas[0]) -> the sample diffusers holds at the end.

    The denoiser (`sample_guided`): network (+ low-res input for stage II) -> the eps half behind the VP
    preconditioning (the variance half kept by the tap for DDPM's learned-variance steps) -> classifier-free
    guidance -> the schedule's x0 limit (dynamic thresholding or clipping) as the outermost wrapper."""
    net: nn.Module = CastInputs.around(stage.net)
    if stage.super_resolution:
        net = LowResInput(net)
    return sample_guided(plan, net, x, cond, uncond, guidance, generators, report,
                         learned_variance=stage.learned_variance)


# ---------------------------------------------------------------------------------------
# Loading: diffusers folders, a cascade folder, t2i's own file
# ---------------------------------------------------------------------------------------


def load_stage(root: Path) -> IFStage:
    """A diffusers IFPipeline / IFSuperResolutionPipeline folder's U-Net and schedules, config and tensor
    names/shapes checked on the meta device before the weights are read."""
    cfg = read_if_unet_config(root)
    files = find_weights(root / "unet", "diffusion_pytorch_model")
    net = build_checked(lambda: IFUNet(cfg), {"unet": cfg}, file_tensors(files), str(root / "unet"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_state_dict(f))
    schedule, noising = read_if_schedules(root, learned=cfg.out_channels == 2 * IMAGE_CHANNELS)
    stage = IFStage(fill(net, state, torch.float32), schedule, noising)
    if stage.super_resolution and noising is None:
        raise CheckpointError(f"{root}: a super-resolution stage without image_noising_scheduler/")
    return stage


def load_t5(root: Path) -> nn.Module:
    from t2i.text.encoders import T5TextEncoder

    if not (root / "text_encoder").is_dir() or not (root / "tokenizer").is_dir():
        raise CheckpointError(f"{root}: no text_encoder/ and tokenizer/ folders (IF's T5 is read from the "
                              "stage I folder)")
    return T5TextEncoder.from_folders(root / "tokenizer", root / "text_encoder", max_length=TEXT_LENGTH)


def load_cascade(base: str | Path, sr: str | Path | None = None, name: str | None = None) -> IFPipeline:
    """An IFPipeline folder (stage I and the T5 encoder) and optionally an IFSuperResolutionPipeline
    folder (stage II) -> IFPipeline."""
    base, sr = Path(base), None if sr is None else Path(sr)
    if if_pipeline_class(base) != BASE:
        raise CheckpointError(f"{base}: not a diffusers {BASE} folder")
    if sr is not None and if_pipeline_class(sr) != SUPER_RESOLUTION:
        raise CheckpointError(f"{sr}: not a diffusers {SUPER_RESOLUTION} folder")
    stage_2 = None if sr is None else load_stage(sr)
    return IFPipeline(load_stage(base), load_t5(base), sr=stage_2, name=name or base.name)


def is_cascade_folder(path: Path) -> bool:
    """A folder holding stage_1/ (IFPipeline) and stage_2/ (IFSuperResolutionPipeline)."""
    return (if_pipeline_class(path / "stage_1") == BASE
            and if_pipeline_class(path / "stage_2") == SUPER_RESOLUTION)


def detect(path: Path) -> bool:
    path = Path(path)
    return if_pipeline_class(path) == BASE or is_cascade_folder(path) or is_system_file(path, SYSTEM_NAME)


@dataclass
class IFConfig:
    """Everything needed to rebuild a t2i IF model from its weight file."""

    base: IFUNetConfig = field(default_factory=lambda: replace(IF_UNET_PRESETS["shapes_base_32"]))
    sr: IFUNetConfig | None = field(default_factory=lambda: replace(IF_UNET_PRESETS["shapes_sr_64"]))
    schedule: ScheduleConfig = field(default_factory=if_schedule)
    noising: ScheduleConfig = field(default_factory=noising_schedule)
    text_encoder: str = "minilm"
    text_length: int = 32
    sampler: str = "ddpm"
    steps: int = 50
    guidance: float = 3.0
    sr_steps: int = 25
    sr_guidance: float = 1.0
    noise_level: int = 100
    # what stage II predicts when it differs from stage I's schedule.prediction_type (None: the same)
    sr_prediction_type: str | None = None

    def __post_init__(self) -> None:
        if self.sr_prediction_type not in (None, *PREDICTIONS):
            raise ValueError(f"unknown sr_prediction_type {self.sr_prediction_type!r}; expected one of {PREDICTIONS}")

    def stage_schedule(self, stage: str) -> ScheduleConfig:
        """The schedule a stage ("base" or "sr") samples and trains with: the betas are shared, the
        parameterisation is the stage's own."""
        if stage == "sr" and self.sr_prediction_type is not None:
            return replace(self.schedule, prediction_type=self.sr_prediction_type)
        return self.schedule

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IFConfig:
        d = dict(d)
        sr = d.pop("sr")
        return cls(base=IFUNetConfig(**d.pop("base")), sr=None if sr is None else IFUNetConfig(**sr),
                   schedule=ScheduleConfig(**d.pop("schedule")), noising=ScheduleConfig(**d.pop("noising")), **d)


def save_if(base: IFUNet, sr: IFUNet | None, cfg: IFConfig, path: str | Path) -> None:
    """Write the stages as `base.*` / `sr.*` with the resolved config in the metadata, atomically."""
    state = {f"base.{k}": v.detach().float() for k, v in base.state_dict().items()}
    if sr is not None:
        state.update({f"sr.{k}": v.detach().float() for k, v in sr.state_dict().items()})
    save_with_config(state, path, dataclasses.asdict(cfg), SYSTEM_NAME)


def read_if_file(path: Path) -> tuple[IFConfig, IFUNet, IFUNet | None]:
    """A t2i IF file -> (its config, stage I network, stage II network or None), checked before anything is
    allocated."""
    raw = read_config(path, "a t2i IF file", SYSTEM_NAME)
    try:
        cfg = IFConfig.from_dict(raw)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed IF config ({type(e).__name__}: {e})") from None
    if cfg.text_encoder != "minilm":
        raise CheckpointError(f"{path}: unknown text encoder {cfg.text_encoder!r} (expected 'minilm')")
    for what, schedule in (("schedule", cfg.schedule), ("noising", cfg.noising)):
        check_schedule(schedule, f"{path}: {what}")
    tensors = header_tensors(check_safetensors_header(path))
    parts = {"base": cfg.base} | ({} if cfg.sr is None else {"sr": cfg.sr})
    if any(k.split(".", 1)[0] not in parts for k in tensors):
        raise CheckpointError(f"{path}: tensors outside the stages {sorted(parts)}")

    def own(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}

    nets = {name: build_checked(lambda c=c: IFUNet(c), {name: c}, own(tensors, name), f"{path} ({name})")
            for name, c in parts.items()}
    state = load_state_dict(path)
    for name, net in nets.items():
        fill(net, own(state, name), torch.float32)
    return cfg, nets["base"], nets.get("sr")


def combine_stages(base_file: str | Path, sr_file: str | Path, out: str | Path) -> Path:
    """One cascade file from the stage I of `base_file` and the stage II of `sr_file` (t2i IF files, e.g. a
    base run and a super-resolution run trained side by side); stage II's sampling settings are kept."""
    base_cfg, base, _ = read_if_file(Path(base_file))
    sr_cfg, _, sr = read_if_file(Path(sr_file))
    if sr is None or sr_cfg.sr is None:
        raise CheckpointError(f"{sr_file}: holds no stage II")
    if base_cfg.text_length != sr_cfg.text_length or base_cfg.text_encoder != sr_cfg.text_encoder:
        raise CheckpointError(f"{base_file} and {sr_file} read different text encodings")
    sr_prediction = sr_cfg.stage_schedule("sr").prediction_type
    base_prediction = base_cfg.schedule.prediction_type
    save_if(base, sr, replace(sr_cfg, base=base_cfg.base, steps=base_cfg.steps, guidance=base_cfg.guidance,
                              schedule=base_cfg.schedule,
                              sr_prediction_type=None if sr_prediction == base_prediction else sr_prediction), out)
    return Path(out)


def if_file_pipeline(cfg: IFConfig, base: IFUNet, sr: IFUNet | None, text_encoder: nn.Module,
                     name: str) -> IFPipeline:
    """The pipeline of a t2i IF model (a shapes model: words outside its world draw nothing, and it says so)."""
    scale = 1 if sr is None else max(1, sr.cfg.sample_size // base.cfg.sample_size)
    size = base.cfg.sample_size * scale
    defaults = GenerationDefaults(sampler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance, width=size, height=size)
    pipe = IFPipeline(IFStage(base, cfg.schedule), text_encoder,
                      sr=None if sr is None else IFStage(sr, cfg.stage_schedule("sr"), cfg.noising), name=name,
                      defaults=defaults,
                      sr_steps=cfg.sr_steps, sr_guidance=cfg.sr_guidance, noise_level=cfg.noise_level)
    pipe.prompt_check = out_of_world_warning
    return pipe


def load_minilm(length: int) -> nn.Module:
    from t2i.text.encoders import MiniLMTextEncoder

    return MiniLMTextEncoder.load(max_length=length)


def load_t2i_if(path: Path) -> IFPipeline:
    """A t2i IF file -> IFPipeline with the MiniLM text encoder."""
    cfg, base, sr = read_if_file(path)
    name = model_name(path)
    return if_file_pipeline(cfg, base, sr, load_minilm(cfg.text_length), name)


def load(path: Path, dtype: torch.dtype = torch.float32) -> IFPipeline:
    """An IFPipeline folder, a cascade folder (stage_1/, stage_2/) or a t2i IF file -> IFPipeline
    (float32 weights unless dtype says otherwise)."""
    path = Path(path)
    if if_pipeline_class(path) == BASE:
        pipe = load_cascade(path)
    elif is_cascade_folder(path):
        pipe = load_cascade(path / "stage_1", path / "stage_2", name=path.name)
    elif is_system_file(path, SYSTEM_NAME):
        pipe = load_t2i_if(system_file(path))
    else:
        raise CheckpointError(f"{path}: not an IFPipeline folder, a cascade folder (stage_1/, stage_2/) or a t2i "
                              "IF file")
    if dtype != torch.float32:
        for stage in (pipe.base, pipe.sr):
            if stage is not None:
                stage.net.to(dtype)
    return pipe


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """A random two-stage model of the tiny presets (16x16 stage I, 32x32 output) as folder/model.safetensors."""
    torch.manual_seed(seed)
    cfg = IFConfig(base=replace(IF_UNET_PRESETS["tiny_base"]), sr=replace(IF_UNET_PRESETS["tiny_sr"]))
    folder.mkdir(parents=True, exist_ok=True)
    save_if(IFUNet(cfg.base), IFUNet(cfg.sr), cfg, folder / "model.safetensors")  # type: ignore[arg-type]
    return folder / "model.safetensors"


SYSTEM = System(
    name=SYSTEM_NAME,
    description="Imagen / DeepFloyd IF pixel cascade: a diffusers IFPipeline folder (T5), a folder holding stage_1/ "
                "(IFPipeline) and stage_2/ (IFSuperResolutionPipeline), or a t2i IF .safetensors (MiniLM)",
    detect=detect,
    load=load,
    write_tiny=write_tiny,
)
