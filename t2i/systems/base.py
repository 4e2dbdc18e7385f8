"""What every model family is to its callers: a `Pipeline` that takes a `GenerationRequest` and
returns a `GenerationResult`, and says through its `Capabilities` which options it honours.

The CLI, the server and eval build a request, ask `check_request` whether the model can honour it
(so an option a model lacks is refused before any work, naming the option and the model), and
call `pipe.run(request)`. Nothing outside a family's own module knows how it generates: a
diffusion model samples a denoiser, a token model decodes a codebook, a cascade chains stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from t2i.checkpoints.io import system_file
from t2i.diffusion.paint_with_words import Region
from t2i.layout.spec import Layout
from t2i.seeds import resolve_seed


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
class GenerationRequest:
    """One call's settings. None (or the field's default) means "the model's default / not used".

    prompt, negative_prompt and seed may be lists (one entry per prompt: a batch of requests that
    share the other settings); image i of a prompt with seed s starts from seed s + i. An unset
    (None) or -1 seed is drawn at random and returned in `GenerationResult.seeds` (A1111).
    Options beyond prompt, seed and num_images are honoured only by models whose capabilities
    list them (`Capabilities.options`); `check_request` refuses the others by name.
    """

    prompt: str | list[str]
    negative_prompt: str | list[str] = ""
    seed: int | list[int] | None = None
    num_images: int = 1
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float = 0.0
    sampler: str | None = None
    schedule: str | None = None
    eta: float | None = None
    width: int | None = None
    height: int | None = None
    init_image: Image.Image | None = None  # img2img (SDEdit)
    strength: float | None = None
    mask: Image.Image | None = None  # white = repaint
    refiner: Any = None  # a second Pipeline of the same family that finishes the low-noise steps
    refiner_start: float = 0.8
    deepcache: int = 1
    preview: bool = False  # decode with the pipeline's preview decoder
    progress: bool = False  # a progress bar on stderr
    callback: Callable[[int, int], None] | None = None  # (step, total) after each step
    # Polled between steps and inside them (between network blocks); True stops the run with
    # `Interrupted` within a fraction of a step (the server's cancel and interrupt).
    should_stop: Callable[[], bool] | None = None
    # After each step: (step, total, x0), the run's current estimate of its final sample (as
    # GenerationResult.sample): the server's live preview and its image of an interrupted run.
    on_sample: Callable[[int, int, torch.Tensor], None] | None = None
    # Where each object goes (t2i.layout.spec.Layout); layout models plan one per image from the
    # prompt when it is None. A list (one per image) is what a layout model passes to its own
    # batched run.
    layout: Layout | list[Layout] | None = None
    # ControlNet (t2i.nets.controlnet.ControlNet, e.g. from t2i.checkpoints.diffusers_controlnet.load_controlnet)
    # and the conditioning image it reads (resized to the output size); control_scale multiplies its residuals.
    controlnet: Any = None
    control_image: Image.Image | None = None
    control_scale: float = 1.0
    # Paint-with-words (eDiff-I): boxes of the canvas tied to words of the prompt (a tuple of
    # t2i.diffusion.paint_with_words.Region, or what its `as_regions` reads: "x0,y0,x1,y1:words" strings,
    # {"box", "words"} dicts), and w', the strength of the cross-attention boost (None: the default).
    regions: Sequence[Region | str | dict] | None = None
    region_weight: float | None = None
    # ADM's classifier guidance (pixel DDPMs): a noise-aware classifier file (`t2i train classifier`) and
    # its scale s (None: 1), towards the class the prompt names.
    classifier: str | Path | None = None
    classifier_scale: float | None = None
    # What the PNG parameters call the classifier: the name a server knows the file by (`t2i serve --classifier
    # NAME=FILE`), so that a client sending them back names it; None: the file's stem.
    classifier_name: str | None = None
    # Token models' draws (t2i.tokens.sampling): temperature (0: argmax), top-k and nucleus top-p cuts
    # of each token's distribution (None: the model's own setting).
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    # Upscalers (t2i.systems.sd_upscale): the noise level of the low-res input, 0..max_noise_level
    # (None: the model's default, 20 for the SD x4 upscaler).
    noise_level: int | None = None

    def set_options(self) -> list[str]:
        """The names of the options this request sets to something other than their default."""
        return [f.name for f in fields(self) if f.name not in _ALWAYS and getattr(self, f.name) != f.default]

    def with_defaults(self, defaults: GenerationDefaults) -> GenerationRequest:
        """The request with every unset setting that `defaults` has filled in."""
        return replace(self, **{k: v for k, v in vars(defaults).items() if getattr(self, k, 0) is None})


# Every family takes these: what to draw, how many, from which seed, and how to report progress.
_ALWAYS = frozenset({"prompt", "seed", "num_images", "progress", "callback", "should_stop",
                     "on_sample"})


@dataclass
class GenerationResult:
    """images: one PIL image per output, each with its A1111 `parameters` in `image.info`.
    sample: the final sample before decoding, (N, ...) (diffusion latents at the diffusion scale,
    pixels for pixel models, (N, T) codes for token models).
    seeds: the seed each image started from. warnings: e.g. prompts cut to fit the encoder."""

    images: list[Image.Image]
    sample: torch.Tensor
    seeds: list[int]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def latents(self) -> torch.Tensor:
        """The final sample under the latent-diffusion name it had first."""
        return self.sample


@dataclass(frozen=True)
class Capabilities:
    """What a pipeline can honour.

    options: the GenerationRequest fields it takes beyond prompt/seed/num_images/progress.
    samplers, schedules: the names its `sampler` and `schedule` options accept.
    size_multiple: width and height must be multiples of it; native_size: (width, height) it was
    trained at (other sizes work but compose worse: callers warn).
    required: the options a request must set, the model cannot generate without them (an upscaler
    with no base model: its low-res image, init_image).
    max_steps: the most sampling steps its schedule has (a diffusion model's training timesteps), None
    where any count works.
    """

    options: frozenset[str]
    samplers: tuple[str, ...] = ()
    schedules: tuple[str, ...] = ()
    size_multiple: int = 8
    native_size: tuple[int, int] = (512, 512)
    required: frozenset[str] = frozenset()
    max_steps: int | None = None

    def accepts(self, option: str) -> bool:
        return option in self.options


@runtime_checkable
class Pipeline(Protocol):
    """A loaded model of any family. `name` is shown in PNG metadata and by the server;
    `family` names the registered system it belongs to."""

    name: str
    family: str
    defaults: GenerationDefaults

    @property
    def capabilities(self) -> Capabilities: ...

    def run(self, request: GenerationRequest) -> GenerationResult: ...


class Interrupted(Exception):
    """A run stopped because its request's `should_stop()` said so."""


@contextmanager
def stop_polling(should_stop: Callable[[], bool] | None, *nets: nn.Module) -> Iterator[None]:
    """Ask `should_stop()` before every block of `nets` runs (each entry of their ModuleLists: the
    U-Net's and the VAE's resnets and attention layers) and raise Interrupted when it says yes, so
    a cancelled job stops within a fraction of a step rather than at the end of one. None: no hooks."""
    if should_stop is None:
        yield
        return

    def check(_module: nn.Module, _args: tuple) -> None:
        if should_stop():
            raise Interrupted

    handles = [block.register_forward_pre_hook(check) for net in nets for m in net.modules()
               if isinstance(m, nn.ModuleList) for block in m]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class UnsupportedOption(ValueError):
    """A request sets an option its model cannot honour, or lacks one it needs. `option` names the
    request field."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


class UnsupportedPrompt(ValueError):
    """A prompt the model cannot draw at all, whatever the settings (a class-conditional model given
    a caption naming several classes). `prompt` is the refused prompt. Evaluations count it as a miss
    rather than stopping; a user gets the message."""

    def __init__(self, prompt: str, message: str) -> None:
        super().__init__(message)
        self.prompt = prompt


def check_request(pipe: Pipeline, request: GenerationRequest) -> None:
    """Refuse (UnsupportedOption) the first option `pipe` cannot honour, before any work.

    Checks the option names against `pipe.capabilities.options`, that the options it requires are set,
    the steps against its schedule's length, and the sampler / schedule names against the lists it gives;
    values are the pipeline's own business (it raises ValueError naming the setting)."""
    caps = pipe.capabilities
    for option in request.set_options():
        if not caps.accepts(option):
            raise UnsupportedOption(option, f"{pipe.name} ({pipe.family}) does not support the option "
                                            f"{option!r}")
    for option in sorted(caps.required):
        if getattr(request, option) is None:
            raise UnsupportedOption(option, f"{pipe.name} ({pipe.family}) needs the option {option!r}: it cannot "
                                            "generate without one")
    if caps.max_steps is not None and request.steps is not None and request.steps > caps.max_steps:
        raise UnsupportedOption("steps", f"{request.steps} steps: {pipe.name} ({pipe.family}) samples at most "
                                         f"{caps.max_steps}, its schedule's timesteps")
    for option, allowed in (("sampler", caps.samplers), ("schedule", caps.schedules)):
        value = getattr(request, option)
        if value is not None and allowed and value not in allowed:
            raise UnsupportedOption(option, f"unknown {option} {value!r} for {pipe.name} ({pipe.family}); "
                                            f"choose one of {', '.join(allowed)}")


def check_sampling_request(r: GenerationRequest, samplers: Sequence[str], schedules: Sequence[str] = (),
                           multiple: int | None = None) -> None:
    """The checks every diffusion family makes of a request with its defaults filled in, before any work
    (ValueError naming the setting): see `check_sampling_settings`."""
    check_sampling_settings(r.sampler, r.schedule, r.steps, r.width, r.height, r.guidance, samplers, schedules,
                            multiple, r.classifier_scale)


def check_sampling_settings(sampler: str | None, schedule: str | None, steps: int | None, width: int | None,
                            height: int | None, guidance: float | None, samplers: Sequence[str],
                            schedules: Sequence[str] = (), multiple: int | None = None,
                            classifier_scale: float | None = None) -> None:
    """ValueError naming the first bad setting: a sampler not in `samplers`; a schedule not in `schedules`
    (a family without a list takes none); fewer than one step; a width or height that is not a positive
    multiple of `multiple` (a family that checks its own sizes passes None); a guidance or classifier scale
    that is not finite. Unset (None) settings are not checked."""
    if sampler not in samplers:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers)}")
    if schedules and schedule not in schedules:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(schedules)}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    for what, v in (("width", width), ("height", height)):
        if multiple is not None and v is not None and (v <= 0 or v % multiple):
            raise ValueError(f"{what} must be a positive multiple of {multiple}, got {v}")
    for what, x in (("guidance", guidance), ("classifier_scale", classifier_scale)):
        if x is not None and not math.isfinite(x):
            raise ValueError(f"{what} must be a finite number, got {x}")


class RequestMethods:
    """`generate(prompt, **settings)` and `pipe(prompt, **settings)` for a class with `run`: the
    keyword form of a GenerationRequest, for scripts and notebooks."""

    def run(self, request: GenerationRequest) -> GenerationResult:  # pragma: no cover - the family's
        raise NotImplementedError

    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] = "",
                 **settings: Any) -> GenerationResult:
        """Generate with the settings of GenerationRequest (unset ones take the model's defaults)."""
        return self.run(GenerationRequest(prompt, negative_prompt, **settings))

    def __call__(self, prompt: str, negative_prompt: str = "", **settings: Any) -> list[Image.Image]:
        """The images only; see `generate`."""
        return self.generate(prompt, negative_prompt, **settings).images


@dataclass(frozen=True)
class ShippedModel:
    """A model installed with t2i: `t2i models` lists it and `--model NAME` finds it."""

    name: str
    path: Path
    description: str = ""
    default: bool = False  # the model `t2i generate` uses without --model
    card: Path | None = None  # its model card (Markdown); `t2i models` shows the score line it states


@dataclass(frozen=True)
class System:
    """A model family.

    detect(path) -> bool: whether a file or folder is in one of this family's layouts (cheap:
        headers and config files only, never the weights).
    load(path, dtype) -> Pipeline.
    write_tiny(folder, seed) -> path: a tiny random model in this family's own layout, loadable
        by `load` (used by the tests every registered family gets).
    export(pipe, dst) -> path: write a loaded model in the family's layouts (`t2i convert`); None if
        the family has nothing to convert to.
    """

    name: str
    description: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, torch.dtype], Pipeline]
    write_tiny: Callable[[Path, int], Path]
    shipped: tuple[ShippedModel, ...] = field(default_factory=tuple)
    export: Callable[[Pipeline, Path], Path] | None = None

    def shipped_at(self, path: Path) -> ShippedModel | None:
        """The shipped model whose file (or folder) `path` is, if any: `t2i.load` names the pipeline after it,
        however the model was asked for (its name, its folder or its file)."""
        file = system_file(path).resolve()
        return next((m for m in self.shipped if system_file(m.path).resolve() == file), None)


def per_image(prompt: str | list[str], negative: str | list[str], seed: int | list[int | None] | None,
               num_images: int) -> tuple[list[str], list[str], list[int]]:
    """Prompt, negative prompt and seed of every image: prompt-major, seeds s, s + 1, ...; an unset
    or -1 seed is drawn at random (A1111), once per prompt, and returned like any other."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    seeds = [seed] * len(prompts) if seed is None or isinstance(seed, int) else list(seed)
    seeds = [resolve_seed(s) for s in seeds]
    if not prompts or len(negatives) != len(prompts) or len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts, {len(negatives)} negative prompts and {len(seeds)} seeds: "
                         "give one of each per prompt")
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    prompts = [p for p in prompts for _ in range(num_images)]
    negatives = [n for n in negatives for _ in range(num_images)]
    return prompts, negatives, [s + i for s in seeds for i in range(num_images)]


def progress_bar(total: int, enabled: bool, desc: str = "sampling"):
    """A tqdm bar on stderr for `total` steps, or None when not enabled (request.progress)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


class StepReport:
    """What every sampling family reports after each step, as the samplers' callback(info): the
    progress bar (request.progress), callback(step, total) and on_sample(step, total, x0) (the
    server's progress and live preview). A context manager, so the bar closes however the run ends."""

    def __init__(self, total: int, progress: bool = False, callback: Callable[[int, int], None] | None = None,
                 on_sample: Callable[[int, int, torch.Tensor], None] | None = None) -> None:
        self.total, self.callback, self.on_sample = total, callback, on_sample
        self.bar = progress_bar(total, progress)

    @classmethod
    def of(cls, request: GenerationRequest, total: int) -> StepReport:
        return cls(total, request.progress, request.callback, request.on_sample)

    def __call__(self, info: dict) -> None:
        """info: the sampler's step record ("i" the step index, "denoised" the x0 estimate)."""
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(info["i"] + 1, self.total)
        if self.on_sample is not None:
            self.on_sample(info["i"] + 1, self.total, info["denoised"])

    def __enter__(self) -> StepReport:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
