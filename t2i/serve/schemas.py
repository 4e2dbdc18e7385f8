"""Request bodies of the three APIs (OpenAI Images, AUTOMATIC1111, our job API) and their
translation into one `GenSpec`, with every field checked against the server's limits.

Pydantic checks types and fixed ranges (a 422 whose `loc` names the field); `to_spec` checks what
depends on the server (configured maximum size, the model's samplers) and raises `FieldError`,
which the app also turns into a 4xx naming the field. Both happen before a job is queued.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import secrets
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from t2i.imageio import A1111_SAMPLER_NAMES
from t2i.samplers.sampling import SAMPLERS
from t2i.serve.config import Limits
from t2i.serve.jobs import GenSpec, Settings

MAX_SEED = 2**53 - 1  # seeds travel through JSON and JavaScript: keep them exact as doubles
SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# OpenAI model names that scripts send: all mean "the model this server runs".
OPENAI_MODEL_ALIASES = ("dall-e-2", "dall-e-3", "gpt-image-1")


class FieldError(ValueError):
    """A request field outside what this server accepts (HTTP 422 naming the field)."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


Seed = Field(default=-1, ge=-1, le=MAX_SEED, description="-1: random; the seed used is returned")
Prompt = Field(default="", max_length=100_000)  # the configured (smaller) limit is checked in to_spec


class OpenAIImageRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields plus our extensions (seed ... schedule)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=100_000)
    n: int = Field(default=1, ge=1)
    size: str | None = None  # "WxH" or "auto"
    response_format: Literal["b64_json", "url"] = "url"  # OpenAI's default for dall-e models
    model: str | None = Field(default=None, max_length=200)
    quality: str | None = Field(default=None, max_length=20)  # accepted and ignored, as are style/user
    style: str | None = Field(default=None, max_length=20)
    user: str | None = Field(default=None, max_length=200)
    output_format: Literal["png"] | None = None
    # extensions
    seed: int = Seed
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    negative_prompt: str = Prompt
    sampler: str | None = Field(default=None, max_length=50)
    schedule: str | None = Field(default=None, max_length=20)


class JobRequest(BaseModel):
    """`POST /v1/jobs` (the web page): our own names."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=100_000)
    negative_prompt: str = Prompt
    n: int = Field(default=1, ge=1)
    width: int | None = Field(default=None, ge=8)
    height: int | None = Field(default=None, ge=8)
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    seed: int = Seed
    sampler: str | None = Field(default=None, max_length=50)
    schedule: str | None = Field(default=None, max_length=20)


class A1111Txt2Img(BaseModel):
    """`POST /sdapi/v1/txt2img`. A1111 clients send many fields (hires fix, scripts, ...): the ones we
    do not know are ignored, as A1111 ignores fields of extensions it lacks; features we cannot
    honour when switched on (enable_hr, restore_faces, tiling, subseeds, scripts) are refused."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Prompt
    negative_prompt: str = Prompt
    seed: int = Seed
    steps: int | None = Field(default=None, ge=1)
    cfg_scale: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    width: int | None = Field(default=None, ge=8)
    height: int | None = Field(default=None, ge=8)
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1)
    sampler_name: str | None = Field(default=None, max_length=50)
    sampler_index: str | None = Field(default=None, max_length=50)  # deprecated alias of sampler_name
    scheduler: str | None = Field(default=None, max_length=50)
    eta: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    enable_hr: bool = False
    restore_faces: bool | None = None
    tiling: bool | None = None
    subseed_strength: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    script_name: str | None = None


class A1111Img2Img(A1111Txt2Img):
    """`POST /sdapi/v1/img2img`: one base64 init image (a data: URL prefix is accepted), optional mask."""

    init_images: list[str] = Field(min_length=1)
    denoising_strength: float = Field(default=0.75, ge=0, le=1, allow_inf_nan=False)
    mask: str | None = None


# ---------------------------------------------------------------------- resolution


def sampler_names() -> dict[str, tuple[str, str | None]]:
    """Every accepted sampler name (lower case) -> (our sampler, schedule or None).

    Ours ("dpmpp_2m"), A1111's ("DPM++ 2M") and A1111's older Karras spelling ("DPM++ 2M Karras")."""
    names: dict[str, tuple[str, str | None]] = {}
    for ours in SAMPLERS:
        names[ours] = (ours, None)
        a1111 = A1111_SAMPLER_NAMES.get(ours)
        if a1111:
            names[a1111.lower()] = (ours, None)
            names[f"{a1111} karras".lower()] = (ours, "karras")
    return names


def resolve_sampler(name: str | None, schedule: str | None, defaults, field: str,
                    schedule_field: str) -> tuple[str, str]:
    """(sampler, schedule) from request names; None takes the model's defaults."""
    sampler, implied = defaults.sampler, None
    if name:
        hit = sampler_names().get(name.strip().lower())
        if hit is None:
            raise FieldError(field, f"unknown sampler {name!r}; choose one of "
                                    f"{', '.join(A1111_SAMPLER_NAMES.get(s, s) for s in SAMPLERS)}")
        sampler, implied = hit
    sched = (schedule or "").strip().lower()
    if sched in ("", "automatic"):
        sched = implied or defaults.schedule
    elif sched in ("default", "karras"):
        pass
    else:
        raise FieldError(schedule_field, f"unknown schedule {schedule!r}; choose 'default' or 'karras'")
    return sampler, sched


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's "WxH" (or "auto"/None: the model's default)."""
    if size is None or size == "auto":
        return None, None
    m = SIZE_RE.match(size.strip())
    if not m:
        raise FieldError("size", f"expected 'WIDTHxHEIGHT' such as '512x512', got {size!r}")
    return int(m.group(1)), int(m.group(2))


def decode_image(data: str, field: str, limits: Limits) -> Image.Image:
    """Base64 (optionally a data: URL) -> RGB PIL image, refusing anything over max_init_pixels
    before the pixels are decoded."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FieldError(field, f"not valid base64: {e}") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > limits.max_init_pixels:
            raise FieldError(field, f"image of {image.width}x{image.height} is larger than "
                                    f"{limits.max_init_pixels} pixels")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise FieldError(field, f"not a readable image: {e}") from None
    return image.convert("RGB")


class Resolver:
    """Turns validated request bodies into GenSpecs for one pipeline and one set of limits."""

    def __init__(self, pipe, limits: Limits) -> None:
        self.pipe, self.limits = pipe, limits
        self.multiple = max(8, getattr(pipe, "vae_scale", 8))

    def spec(self, *, prompt: str, negative_prompt: str, seed: int, n: int, steps: int | None,
             guidance: float | None, sampler: str, schedule: str, width: int | None, height: int | None,
             eta: float | None = None, fields: dict[str, str] | None = None, **extra) -> GenSpec:
        """Check the limits (raising FieldError with the request's own field names) and resolve
        defaults and the random seed. fields maps our names (n, guidance, ...) to the request's."""
        f = {"prompt": "prompt", "negative_prompt": "negative_prompt", "n": "n", "steps": "steps",
             "guidance": "guidance", "width": "width", "height": "height", **(fields or {})}
        lim, d = self.limits, self.pipe.defaults
        for key, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if len(text) > lim.max_prompt_chars:
                raise FieldError(f[key], f"{len(text)} characters; at most {lim.max_prompt_chars}")
        if n > lim.max_images:
            raise FieldError(f["n"], f"{n} images; at most {lim.max_images} per request")
        steps = d.steps if steps is None else steps
        if steps > lim.max_steps:
            raise FieldError(f["steps"], f"{steps} steps; at most {lim.max_steps}")
        guidance = d.guidance if guidance is None else guidance
        if guidance > lim.max_guidance:
            raise FieldError(f["guidance"], f"{guidance}; at most {lim.max_guidance}")
        width = d.width if width is None else width
        height = d.height if height is None else height
        for key, v, top in (("width", width, lim.max_width), ("height", height, lim.max_height)):
            if v % self.multiple or not self.multiple <= v <= top:
                raise FieldError(f[key], f"{v}: must be a multiple of {self.multiple} "
                                         f"between {self.multiple} and {top}")
        if seed == -1:
            seed = secrets.randbelow(2**32)  # A1111's range for random seeds
        if seed + n - 1 > MAX_SEED:
            raise FieldError("seed", f"seed + image count exceeds {MAX_SEED}")
        settings = Settings(steps, float(guidance), sampler, schedule, width, height,
                            eta if sampler == "ddim" else None)
        return GenSpec(prompt, negative_prompt, seed, n, settings, **extra)

    def openai(self, req: OpenAIImageRequest) -> GenSpec:
        names = (self.pipe.name, "t2i", *OPENAI_MODEL_ALIASES)
        if req.model is not None and req.model not in names:
            raise FieldError("model", f"unknown model {req.model!r}; this server runs {self.pipe.name!r}",
                             status=404)
        width, height = parse_size(req.size)
        sampler, schedule = resolve_sampler(req.sampler, req.schedule, self.pipe.defaults, "sampler", "schedule")
        return self.spec(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed, n=req.n,
                         steps=req.steps, guidance=req.guidance, sampler=sampler, schedule=schedule,
                         width=width, height=height, fields={"width": "size", "height": "size"})

    def job(self, req: JobRequest) -> GenSpec:
        sampler, schedule = resolve_sampler(req.sampler, req.schedule, self.pipe.defaults, "sampler", "schedule")
        return self.spec(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed, n=req.n,
                         steps=req.steps, guidance=req.guidance, sampler=sampler, schedule=schedule,
                         width=req.width, height=req.height)

    def a1111(self, req: A1111Txt2Img) -> GenSpec:
        for name, on in (("enable_hr", req.enable_hr), ("restore_faces", req.restore_faces),
                         ("tiling", req.tiling), ("subseed_strength", req.subseed_strength > 0),
                         ("script_name", bool(req.script_name))):
            if on:
                raise FieldError(name, "not supported by this server")
        sampler, schedule = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler,
                                            self.pipe.defaults, "sampler_name", "scheduler")
        extra: dict = {}
        width, height = req.width, req.height
        if isinstance(req, A1111Img2Img):
            if len(req.init_images) > 1:
                raise FieldError("init_images", "only one init image per request is supported")
            init = extra["init_image"] = decode_image(req.init_images[0], "init_images", self.limits)
            # Without a size, img2img keeps the input's, rounded down to what the model takes.
            width = req.width or max(self.multiple, init.width // self.multiple * self.multiple)
            height = req.height or max(self.multiple, init.height // self.multiple * self.multiple)
            extra["strength"] = req.denoising_strength
            if req.mask:
                extra["mask"] = decode_image(req.mask, "mask", self.limits)
        return self.spec(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed,
                         n=req.batch_size * req.n_iter, steps=req.steps, guidance=req.cfg_scale,
                         sampler=sampler, schedule=schedule, width=width, height=height, eta=req.eta,
                         fields={"n": "batch_size", "guidance": "cfg_scale"}, **extra)
