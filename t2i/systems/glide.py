"""GLIDE (Nichol et al. 2021, "GLIDE: Towards Photorealistic Image Generation and Editing with Text-Guided Diffusion
Models"): a pixel-space text-to-image cascade whose text encoder is trained from scratch with the diffusion model.

- **base**: `t2i.nets.glide.GlideNet` at low resolution (GLIDE: 64x64; the shapes world: 32x32): the caption's word
  ids through GLIDE's transformer, its final token added to the timestep embedding and its token sequence projected
  into every attention layer as extra keys and values; cosine betas, eps (GLIDE's; or v, Salimans & Ho 2022) with a
  learned variance (IDDPM), trained with 20% empty captions so that one network is also the unconditional model of
  classifier-free guidance.
- **upsampler** (optional second stage, GLIDE's 64 -> 256; here 2x): the same network reading the base sample
  (rounded to 8 bits, as GLIDE hands it over) upsampled bilinearly next to its noisy input, and the caption again.
- **CLIP guidance** (sec. 2.4): a noise-aware shapes CLIP (`t2i.nets.glide_clip`, `t2i train noisy-clip`) steers the
  base stage's mean along grad (f(x_t, t) . g(c)) at scale s (`t2i.diffusion.clip_guidance`), next to or instead of
  classifier-free guidance (GLIDE's comparison). Requests name the CLIP file where ADM's classifier goes
  (`classifier`, `classifier_scale`; `t2i generate --classifier FILE --classifier-scale S`): in GLIDE the CLIP model
  *is* the classifier of classifier guidance. `with_clip_guidance` sets one for every request.

The tokenizer is the token families' word tokenizer (`t2i.systems.dalle.WordTokenizer`: [BOS] words [PAD] ..., over
the shapes world's word list stored in the file). Every t2i sampler runs each stage through the denoiser contract;
"ddpm" (the default) samples with the learned variance (`t2i.samplers.learned_variance`). A request's steps,
guidance, sampler, schedule and eta are the base stage's; the upsampler takes the pipeline's `up_steps` and
`up_guidance` (the file's) and the request's sampler. Image i of seed s draws, from one generator (seed s + i), the
base's start and step noise, then the upsampler's.

Each stage reads its network with its own parameterisation (`GlideConfig.stage_schedule`): the schedule's
prediction_type is the base's, `up_prediction_type` the upsampler's when it differs (a v upsampler on an eps base).
v with a learned variance is what learns on the shapes world at our budget: the cosine schedule's SNR at t = 999
(2.4e-9) leaves eps nothing to say about the image there.

Layout: t2i's own file (one safetensors: `base.*` [+ `up.*`], the resolved `GlideConfig` in its metadata), what
`t2i train glide` writes; files from before `up_prediction_type` (eps throughout) read as they were.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.checkpoints.io import is_system_file, model_name, save_with_config, system_file
from t2i.checkpoints.limits import check_schedule, load_system_file
from t2i.data.shapes_vocab import out_of_world_warning, vocabulary
from t2i.diffusion.clip_guidance import ClipGuide
from t2i.diffusion.denoiser import PREDICTIONS
from t2i.diffusion.schedules import ScheduleConfig
from t2i.imageio import request_parameters, to_pil
from t2i.nets.cast_inputs import CastInputs
from t2i.nets.glide import IMAGE_CHANNELS, GlideNet, GlideNetConfig, preset
from t2i.nets.glide_clip import is_noisy_clip, load_noisy_clip
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
from t2i.systems.ddpm import ddpm_schedule
from t2i.systems.guide_files import GuideFiles
from t2i.text.words import SPECIALS, WordTokenizer

SYSTEM_NAME = "glide"
OPTIONS = frozenset({"negative_prompt", "steps", "guidance", "sampler", "schedule", "eta", "width", "height",
                     "classifier", "classifier_scale", "classifier_name"})
SCHEDULES = ("default", "karras")


def glide_schedule(prediction_type: str = "epsilon") -> ScheduleConfig:
    """GLIDE's diffusion: IDDPM's cosine betas over T = 1000, eps prediction (GLIDE's; or v) with the variance the
    network's, x0 clipped to the image range, trailing spacing so that a few-step run starts at the last training
    timestep."""
    return dataclasses.replace(ddpm_schedule("squaredcos_cap_v2"), prediction_type=prediction_type)


def shapes_words() -> list[str]:
    """The shapes world's caption words, the tokenizer's vocabulary after its specials."""
    return sorted(vocabulary())


@dataclass
class GlideConfig:
    """Everything needed to rebuild a t2i GLIDE model from its file (and its generation defaults)."""

    base: GlideNetConfig = field(default_factory=lambda: preset("shapes_base_32", len(SPECIALS) + len(shapes_words())))
    up: GlideNetConfig | None = None
    schedule: ScheduleConfig = field(default_factory=glide_schedule)
    words: list[str] = field(default_factory=shapes_words)
    sampler: str = "ddpm"
    steps: int = 50
    guidance: float = 3.0
    up_steps: int = 25
    up_guidance: float = 1.0  # GLIDE samples its upsampler unguided
    # what the upsampler predicts when it differs from the base's schedule.prediction_type (None: the same)
    up_prediction_type: str | None = None

    def __post_init__(self) -> None:
        if self.up_prediction_type not in (None, *PREDICTIONS):
            raise ValueError(f"unknown up_prediction_type {self.up_prediction_type!r}; expected one of {PREDICTIONS}")
        for name, net in (("base", self.base), ("up", self.up)):
            if net is not None and net.text.vocab != len(SPECIALS) + len(self.words):
                raise ValueError(f"{name}: a text vocabulary of {net.text.vocab} for {len(self.words)} words "
                                 f"+ {len(SPECIALS)} specials")
        if self.base.upsampler or (self.up is not None and not self.up.upsampler):
            raise ValueError("the base stage takes 3 input channels, the upsampler 6")

    def stage_schedule(self, stage: str) -> ScheduleConfig:
        """The schedule a stage ("base" or "up") samples and trains with: the betas are shared, the
        parameterisation is the stage's own."""
        if stage == "up" and self.up_prediction_type is not None:
            return dataclasses.replace(self.schedule, prediction_type=self.up_prediction_type)
        return self.schedule

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GlideConfig:
        d = dict(d)
        up = d.pop("up")
        return cls(base=GlideNetConfig.from_dict(d.pop("base")),
                   up=None if up is None else GlideNetConfig.from_dict(up),
                   schedule=ScheduleConfig(**d.pop("schedule")), **d)


class GlideNets(nn.Module):
    """The file's networks as one module (`base.*`, `up.*`) with its config; built from it, or given (training's
    EMA network next to another file's stage)."""

    def __init__(self, cfg: GlideConfig, base: GlideNet | None = None, up: GlideNet | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.base = GlideNet(cfg.base) if base is None else base
        self.up = up if up is not None or cfg.up is None else GlideNet(cfg.up)


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def read_clip(path: str | Path) -> tuple[ClipGuide, ScheduleConfig]:
    """A `t2i train noisy-clip` file -> (its noise-aware CLIP as a guide, the schedule it was trained on);
    ValueError for any other file."""
    if not is_noisy_clip(path):
        raise ValueError(f"{path}: GLIDE guides with a noise-aware CLIP (`t2i train noisy-clip`), and this is not one")
    clip, schedule = load_noisy_clip(path)
    return ClipGuide(clip), schedule


def sample_stage(net: GlideNet, plan: SamplingPlan, x: torch.Tensor, cond: dict, uncond: dict | None, guidance: float,
                 generators: list[torch.Generator], report: Callable[[dict], None],
                 guide: Callable | None = None) -> torch.Tensor:
    """One stage from x (VE, at plan.sigmas[0]) to its sample (`sample_guided`: CFG, then `guide`, CLIP guidance,
    then the schedule's x0 clipping). guide: (denoiser, sigma_to_t) -> the CLIP-guided denoiser, or None."""
    return sample_guided(plan, CastInputs.around(net), x, cond, uncond, guidance, generators, report,
                         learned_variance=net.cfg.learned_variance, guide=guide)


class GlidePipeline(RequestMethods):
    """GLIDE's base model, optionally its upsampler, and their tokenizer.

    Attributes a caller may set: up_steps, up_guidance (the upsampler's settings); `with_clip_guidance`."""

    family = SYSTEM_NAME

    def __init__(self, nets: GlideNets, *, name: str = "glide", defaults: GenerationDefaults | None = None) -> None:
        cfg = nets.cfg
        # `unet`: the base network under the name t2i.load's int8 quantization looks for
        self.nets, self.cfg, self.unet, self.name = nets, cfg, nets.base, name
        size = cfg.base.unet.sample_size * self.scale
        self.defaults = defaults or GenerationDefaults(sampler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance,
                                                       width=size, height=size)
        self.up_steps, self.up_guidance = cfg.up_steps, cfg.up_guidance
        self.prompt_check: Callable[[str], str | None] | None = out_of_world_warning
        self.clips = GuideFiles(read_clip, lambda: self.cfg.schedule, "CLIP")

    @property
    def scale(self) -> int:
        """Final side / base side (1 without an upsampler)."""
        up = self.cfg.up
        return 1 if up is None else max(1, up.unet.sample_size // self.cfg.base.unet.sample_size)

    @property
    def size_multiple(self) -> int:
        base = self.scale * self.cfg.base.size_multiple
        return base if self.cfg.up is None else math.lcm(base, self.cfg.up.size_multiple)

    @property
    def capabilities(self) -> Capabilities:
        d = self.defaults
        return Capabilities(options=OPTIONS, samplers=tuple(SAMPLERS), schedules=SCHEDULES,
                            size_multiple=self.size_multiple, native_size=(d.width, d.height),
                            max_steps=self.cfg.schedule.num_train_timesteps)

    def tokenize(self, texts: list[str], net: GlideNet) -> torch.Tensor:
        """(B, L) word ids of `net`'s caption window."""
        return WordTokenizer(self.cfg.words, net.cfg.text.length)(texts)

    # ---------------------------------------------------------------- CLIP guidance

    def with_clip_guidance(self, path: str | Path, scale: float) -> GlidePipeline:
        """Guide every later request's base stage with a noise-aware CLIP file (`t2i train noisy-clip`) at scale
        s (GLIDE sec. 2.4), on top of classifier-free guidance if the request asks for it; a request's own
        classifier_scale replaces s; 0 turns it off."""
        self.clips.set_default(path, scale)
        return self

    def check_classifier(self, path: str | Path) -> None:
        """Load the file at `path` (kept for the requests that name it) and check that it is a noise-aware CLIP of
        this model's noise schedule; ValueError naming the problem otherwise. `t2i serve --classifier` checks its
        files with it at startup."""
        self.clips.get(path)

    def check_guidance(self, request: GenerationRequest) -> None:
        """Refuse (UnsupportedOption naming the field, a ValueError) a classifier_scale without a CLIP to guide
        with, before any work (CLIP guidance steers towards any caption: every prompt is one it can take). The
        server's Resolver calls it, `run` before sampling."""
        self.clips.resolve(request)

    # ---------------------------------------------------------------- generation

    def _resolve(self, request: GenerationRequest) -> GenerationRequest:
        r = request.with_defaults(self.defaults)
        check_sampling_request(r, SAMPLERS, SCHEDULES, self.size_multiple)
        return self.clips.resolve(r)  # `with_clip_guidance`'s, recorded as any request's

    def _warnings(self, prompts: list[str]) -> list[str]:
        window = self.cfg.base.text.length - 1  # [BOS] first
        tokenizer = WordTokenizer(self.cfg.words, self.cfg.base.text.length)
        out = [f"prompt {p[:40]!r} was cut to the model's {window} caption words" for p in dict.fromkeys(prompts)
               if len(tokenizer.split(p)) > window]
        return out + [m for m in map(self.prompt_check or (lambda p: None), dict.fromkeys(prompts)) if m]

    def _conditioning(self, net: GlideNet, prompts: list[str], negatives: list[str],
                      guided: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(cond, uncond or None): each stage's own caption window; the negative prompt (default: the empty
        caption, the unconditional model) is the unguided branch."""
        return {"tokens": self.tokenize(prompts, net)}, {"tokens": self.tokenize(negatives, net)} if guided else None

    @torch.no_grad()
    def run(self, request: GenerationRequest) -> GenerationResult:
        """Generate request.num_images images per prompt; image i of seed s starts from seed s + i."""
        with stop_polling(request.should_stop, *(n for n in (self.nets.base, self.nets.up) if n is not None)):
            return self._generate(request)

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        start = time.perf_counter()
        r = self._resolve(request)
        prompts, negatives, seeds = per_image(r.prompt, r.negative_prompt, r.seed, r.num_images)
        requested = self.clips.requested(r)
        guide = None if requested is None else functools.partial(requested[0].around, prompts=prompts,
                                                                 scale=requested[1])
        plan = self._plan("base", r.sampler, r.steps, r.schedule, r.eta)
        up = self.nets.up
        up_plan = None if up is None else self._plan("up", r.sampler, self.up_steps, "default", None)
        generators = seed_generators(seeds)
        base = self.nets.base
        with StepReport.of(r, plan.steps + (0 if up_plan is None else up_plan.steps)) as report:
            cond, uncond = self._conditioning(base, prompts, negatives, r.guidance > 1.0)
            x = plan.start(seed_noise(generators, (IMAGE_CHANNELS, r.height // self.scale, r.width // self.scale)))
            x = sample_stage(base, plan, x, cond, uncond, r.guidance, generators, report, guide)  # (N, 3, h, w)
            if up is not None and up_plan is not None:
                # GLIDE hands the base sample over on the 8-bit grid
                low = ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
                cond, uncond = self._conditioning(up, prompts, negatives, self.up_guidance > 1.0)
                cond["low_res"] = low
                if uncond is not None:
                    uncond["low_res"] = low
                x = up_plan.start(seed_noise(generators, (IMAGE_CHANNELS, r.height, r.width)))
                x = sample_stage(up, up_plan, x, cond, uncond, self.up_guidance, generators,
                                 lambda info: report({**info, "i": info["i"] + plan.steps}))  # counted after base's
        pictures = to_pil(x)
        for im, p, neg, sd in zip(pictures, prompts, negatives, seeds, strict=True):
            im.info["parameters"] = request_parameters(r, p, neg, sd, self.name, precision_of(self.unet))
        return GenerationResult(pictures, x, seeds, self._warnings(prompts), time.perf_counter() - start)

    def _plan(self, stage: str, sampler: str, steps: int, schedule: str, eta: float | None) -> SamplingPlan:
        return plan_for_request(self.cfg.stage_schedule(stage), sampler, steps, schedule, eta)


# ---------------------------------------------------------------------------------------
# The t2i file: save, detect, load
# ---------------------------------------------------------------------------------------


def save_glide(base: GlideNet, up: GlideNet | None, cfg: GlideConfig, path: str | Path) -> None:
    """Write the stages as `base.*` / `up.*` with the resolved config in the metadata, atomically."""
    state = {f"base.{k}": v.detach().float() for k, v in base.state_dict().items()}
    if up is not None:
        state.update({f"up.{k}": v.detach().float() for k, v in up.state_dict().items()})
    save_with_config(state, path, dataclasses.asdict(cfg), SYSTEM_NAME)


def read_glide(path: str | Path) -> GlideNets:
    """A t2i GLIDE file -> its networks (float32, frozen) with the config, checked before anything is allocated."""

    def parts(cfg: GlideConfig) -> dict[str, Any]:
        stages = {"base": cfg.base} | ({} if cfg.up is None else {"up": cfg.up})
        return {f"{k}.{part}": getattr(net, part) for k, net in stages.items() for part in ("text", "unet")}

    def check(cfg: GlideConfig) -> None:
        check_schedule(cfg.schedule, f"{path}: schedule")

    return load_system_file(Path(path), SYSTEM_NAME, "a t2i GLIDE file", GlideConfig.from_dict, GlideNets, parts,
                            check)


def load(path: Path, dtype: torch.dtype = torch.float32) -> GlidePipeline:
    """A t2i GLIDE file (or a folder holding it as model.safetensors) -> GlidePipeline."""
    file = system_file(path)
    nets = read_glide(file)
    if dtype != torch.float32:
        nets.to(dtype)
    return GlidePipeline(nets, name=model_name(file))


def write_tiny(folder: Path, seed: int = 0) -> Path:
    """A random two-stage model of the tiny presets (16x16 base, 32x32 output) as folder/model.safetensors."""
    torch.manual_seed(seed)
    vocab = len(SPECIALS) + len(shapes_words())
    cfg = GlideConfig(base=preset("tiny_base", vocab), up=preset("tiny_up", vocab))
    nets = GlideNets(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_glide(nets.base, nets.up, cfg, folder / "model.safetensors")
    return folder / "model.safetensors"


SYSTEM = System(
    name=SYSTEM_NAME,
    description="GLIDE pixel cascade with a text transformer trained from scratch: a t2i GLIDE .safetensors (or a "
                "folder holding it as model.safetensors)",
    detect=lambda path: is_system_file(Path(path), SYSTEM_NAME),
    load=load,
    write_tiny=write_tiny,
)
