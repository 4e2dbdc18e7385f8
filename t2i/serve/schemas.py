"""Request bodies of the three APIs (OpenAI Images, AUTOMATIC1111, our job API) and their
translation into one `GenerationRequest`, checked against the served model and the server's limits.

Pydantic checks types and fixed ranges (a 422 whose `loc` names the field); the `Resolver` checks
what depends on the model and the server (the options and samplers the model's capabilities list,
its size multiple, the limits that follow its native size, the cost budget) and raises
`FieldError`, which the app also turns into a 4xx naming the request's own field. Both happen
before a job is queued.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import replace
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from t2i.diffusion.paint_with_words import Region, RegionError, as_regions
from t2i.imageio import A1111_SAMPLER_NAMES
from t2i.layout.spec import Layout, LayoutError, as_layout
from t2i.seeds import RANDOM, random_seed
from t2i.serve.config import Limits
from t2i.systems.base import GenerationRequest, Pipeline, UnsupportedOption, check_request

MAX_SEED = 2**32 - 1  # the pipelines' (and A1111's) range; every image's seed s + i must be in it
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
# t2i.layout.spec's JSON form (pixels on the request's width x height, or fractions), any JSON value
# here: Resolver's as_layout checks it, with messages naming the object.
LayoutParam = Field(default=None, description='for models that take a layout: {"units": "pixels" | "fractions", '
                                               '"objects": [{"phrase": "a red circle", "box": [x0, y0, x1, y1]}, ...]}')
# Paint-with-words (t2i.diffusion.paint_with_words.as_regions reads it; messages name the region).
RegionsParam = Field(default=None, description='paint-with-words: ["x0,y0,x1,y1:words", ...] or [{"box": [x0, y0, '
                                               'x1, y1], "words": "red circle"}, ...]; numbers all within [0, 1] are '
                                               'fractions of the canvas, otherwise pixels')
RegionWeight = Field(default=None, allow_inf_nan=False, description="paint-with-words strength w' (default 1)")
# Token models' draws (MaskGIT, DALL-E); other models refuse them by name.
Temperature = Field(default=None, ge=0, allow_inf_nan=False,
                    description="token models: temperature of the token draws (0: the most likely token)")
TopK = Field(default=None, ge=1, description="token models: draw from the k most likely tokens")
TopP = Field(default=None, gt=0, le=1, allow_inf_nan=False,
             description="token models: draw from the smallest set of tokens holding probability p")
# Classifier guidance (ADM's noise-aware classifier for pixel DDPMs, GLIDE's noise-aware CLIP): the name of a file
# the server was started with (`t2i serve --classifier NAME=FILE`), never a path: a client must not choose which
# files the server reads. Other models refuse both fields by name.
ClassifierParam = Field(default=None, min_length=1, max_length=100,
                        description="classifier / CLIP guidance: a name from /v1/info's `classifiers`")
ClassifierScale = Field(default=None, allow_inf_nan=False, description="classifier guidance scale s (default 1)")


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
    layout: Any = LayoutParam
    temperature: float | None = Temperature
    top_k: int | None = TopK
    top_p: float | None = TopP
    classifier: str | None = ClassifierParam
    classifier_scale: float | None = ClassifierScale


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
    layout: Any = LayoutParam
    regions: Any = RegionsParam
    region_weight: float | None = RegionWeight
    temperature: float | None = Temperature
    top_k: int | None = TopK
    top_p: float | None = TopP
    classifier: str | None = ClassifierParam
    classifier_scale: float | None = ClassifierScale


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
    layout: Any = LayoutParam  # ours: A1111 has none
    regions: Any = RegionsParam  # ours too
    region_weight: float | None = RegionWeight
    temperature: float | None = Temperature
    top_k: int | None = TopK
    top_p: float | None = TopP
    classifier: str | None = ClassifierParam
    classifier_scale: float | None = ClassifierScale


class A1111Img2Img(A1111Txt2Img):
    """`POST /sdapi/v1/img2img`: one base64 init image (a data: URL prefix is accepted), optional mask."""

    init_images: list[str] = Field(min_length=1)
    denoising_strength: float = Field(default=0.75, ge=0, le=1, allow_inf_nan=False)
    mask: str | None = None


# ---------------------------------------------------------------------- resolution


def sampler_names(samplers: tuple[str, ...]) -> dict[str, tuple[str, str | None]]:
    """Every accepted sampler name (lower case) -> (our sampler, schedule or None).

    Ours ("dpmpp_2m"), A1111's ("DPM++ 2M") and A1111's older Karras spelling ("DPM++ 2M Karras")."""
    names: dict[str, tuple[str, str | None]] = {}
    for ours in samplers:
        names[ours] = (ours, None)
        a1111 = A1111_SAMPLER_NAMES.get(ours)
        if a1111:
            names[a1111.lower()] = (ours, None)
            names[f"{a1111} karras".lower()] = (ours, "karras")
    return names


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's "WxH" (or "auto"/None: the model's default)."""
    if size is None or size == "auto":
        return None, None
    m = SIZE_RE.match(size.strip())
    if not m:
        raise FieldError("size", f"expected 'WIDTHxHEIGHT' such as '512x512', got {size!r}")
    return int(m.group(1)), int(m.group(2))


def open_image(data: str, field: str, limits: Limits) -> Image.Image:
    """Base64 (optionally a data: URL) -> a PIL image whose header is read and whose size is within
    max_init_pixels; its pixels are not decoded yet (a decompression bomb is refused first)."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FieldError(field, f"not valid base64: {e}") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise FieldError(field, f"not a readable image: {e}") from None
    if image.width * image.height > limits.max_init_pixels:
        raise FieldError(field, f"image of {image.width}x{image.height} is larger than "
                                f"{limits.max_init_pixels} pixels")
    return image


def load_resized(image: Image.Image, size: tuple[int, int], field: str, mask: bool = False) -> Image.Image:
    """Decode `image` and resize it to the job's (width, height) at once, so a job never holds a full-size
    input: an init image as RGB with Lanczos (as the pipeline would resize it), a mask as L with
    nearest (it is thresholded at 128). `reducing_gap` first shrinks a much larger image by an integer
    factor (box filter), which makes a 4096x4096 input cheap at a visually identical result."""
    try:
        image.load()
        if mask:
            return image.convert("L").resize(size, Image.NEAREST)
        if image.mode not in ("RGB", "L"):  # palette, alpha, 16-bit ...: resample in RGB
            image = image.convert("RGB")
        out = image.resize(size, Image.LANCZOS, reducing_gap=3.0) if image.size != size else image.copy()
        return out.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FieldError(field, f"not a readable image: {e}") from None
    finally:
        image.close()


# Settings every API body carries under the GenerationRequest's names, passed through as given.
EXTRAS = ("temperature", "top_k", "top_p", "classifier", "classifier_scale")


def extras(req: BaseModel) -> dict[str, Any]:
    """The token-draw and classifier-guidance settings of a request body (every API names them alike)."""
    return {k: getattr(req, k) for k in EXTRAS}


# The GenerationRequest fields every API names alike; each API maps the others to its own names.
SAME_NAMES = ("prompt", "negative_prompt", "steps", "guidance", "width", "height", "seed", "sampler",
              "schedule", "eta", "layout", "regions", "region_weight", *EXTRAS)


class Resolver:
    """Turns validated request bodies into GenerationRequests for one pipeline and one set of limits.

    Each API method (`openai`, `job`, `a1111`) passes the settings the client gave (None: not given)
    and a map from GenerationRequest field names to the API's own, so that every refusal names the
    field the client sent."""

    def __init__(self, pipe: Pipeline, limits: Limits, classifiers: dict[str, str] | None = None) -> None:
        self.pipe, self.caps = pipe, pipe.capabilities
        self.classifiers = dict(classifiers or {})  # name -> file (`t2i serve --classifier NAME=FILE`)
        self.limits = limits.for_model(self.caps.native_size, pipe.defaults.steps)
        # Multiples of 8 at least: A1111 clients and the page step sizes by 8.
        self.multiple = math.lcm(8, self.caps.size_multiple)

    def model(self) -> str:
        return f"{self.pipe.name} ({self.pipe.family})"

    def sampler(self, name: str | None, schedule: str | None, field: str,
                schedule_field: str) -> tuple[str | None, str | None]:
        """(sampler, schedule) from the request's names (A1111's accepted); None: the model's default."""
        sampler, implied = name or None, None
        if name and self.caps.samplers:
            hit = sampler_names(self.caps.samplers).get(name.strip().lower())
            if hit is None:
                labels = ", ".join(A1111_SAMPLER_NAMES.get(s, s) for s in self.caps.samplers)
                raise FieldError(field, f"unknown sampler {name!r} for {self.model()}; choose one of {labels}")
            sampler, implied = hit
        sched = (schedule or "").strip().lower()
        if sched in ("", "automatic"):
            return sampler, implied
        if self.caps.schedules and sched not in self.caps.schedules:
            raise FieldError(schedule_field, f"unknown schedule {schedule!r} for {self.model()}; choose one of "
                                             f"{', '.join(self.caps.schedules)}")
        return sampler, sched

    def request(self, given: dict, names: dict[str, str] | None = None) -> GenerationRequest:
        """A checked GenerationRequest from the settings the client gave (None values: not given).

        Refuses (FieldError, naming the client's field) an option the model cannot honour, then a
        value over the limits or a cost over the budget, then a layout it cannot draw (naming the
        object); fills the model's defaults for the rest and draws a random seed for -1. A layout's
        pixels are read on the request's size, the model's default size where none is given."""
        f = {k: k for k in SAME_NAMES} | {"num_images": "n"} | (names or {})
        seed = given.pop("seed", -1)
        if not given.get("regions"):  # `regions: []` asks for none: not an option a model without them refuses
            given.pop("regions", None)
        request = GenerationRequest(**{k: v for k, v in given.items() if v is not None})
        try:
            check_request(self.pipe, request)
        except UnsupportedOption as e:
            raise FieldError(f.get(e.option, e.option), str(e)) from None
        d = self.pipe.defaults
        request = replace(request, **{k: v for k, v in vars(d).items()
                                      if getattr(request, k) is None and self.caps.accepts(k)})
        self.check_limits(request, f)
        # the file for the pipeline, the client's name for the PNG (which a client may send back)
        request = replace(request, classifier=self.classifier(request.classifier, f["classifier"]),
                          classifier_name=request.classifier)
        self.check_guidance(request, f)
        request = replace(request, layout=self.layout(request, f["layout"]))
        request = replace(request, regions=self.regions(request, f["regions"]))
        if request.eta is not None and request.sampler != "ddim":
            request = replace(request, eta=None)  # only DDIM reads it: other samplers batch with any eta
        if seed == RANDOM:
            seed = random_seed()
        if seed + request.num_images - 1 > MAX_SEED:
            raise FieldError(f["seed"], f"seed + image count exceeds {MAX_SEED}")
        return replace(request, seed=seed)

    def layout(self, r: GenerationRequest, field: str) -> Layout | None:
        """The client's layout JSON (r.layout) as a Layout, pixels read on the request's size (the
        model's default where none is given), no more objects than the model draws and no phrase
        longer than a prompt may be; FieldError naming the object otherwise."""
        d, top = self.pipe.defaults, self.limits.max_prompt_chars
        try:
            layout = as_layout(r.layout, r.width or d.width, r.height or d.height,
                               getattr(self.pipe, "max_objects", None))
        except LayoutError as e:
            raise FieldError(field, str(e)) from None
        for i, o in enumerate(layout.objects if layout is not None else ()):
            if len(o.phrase) > top:
                raise FieldError(field, f"layout object {i + 1}: a phrase of {len(o.phrase)} characters; at most {top}")
        return layout

    def classifier(self, name: str | None, field: str) -> str | None:
        """The file of the classifier the client names; FieldError for a name the server was not started with
        (a path is such a name: clients never choose the files a server reads)."""
        if name is None:
            return None
        if name not in self.classifiers:
            known = ", ".join(sorted(self.classifiers)) or "none (t2i serve --classifier NAME=FILE adds one)"
            raise FieldError(field, f"unknown classifier {name[:100]!r}; this server has {known}")
        return self.classifiers[name]

    def check_guidance(self, r: GenerationRequest, f: dict[str, str]) -> None:
        """FieldError naming the client's field for classifier guidance the request cannot have, checked here so
        that it never fails a job (nor the batch it would join): a classifier_scale without a classifier, a prompt
        that names none (or two) of the classifier's classes. The pipeline's `check_guidance` knows its own
        rules (a default classifier, CLIP guidance taking any prompt); a pipeline without one, only the first."""
        check = getattr(self.pipe, "check_guidance", None)
        try:
            if check is not None:
                check(r)
            elif r.classifier is None and r.classifier_scale is not None:
                raise UnsupportedOption("classifier_scale", "classifier_scale needs classifier (the file to guide "
                                                            "with)")
        except UnsupportedOption as e:
            raise FieldError(f.get(e.option, e.option), str(e)) from None

    def regions(self, r: GenerationRequest, field: str) -> tuple[Region, ...] | None:
        """The client's regions parsed (pixels on the request's size) and, where the model can tell
        (`request_regions`), their words found in the prompt; FieldError naming the region otherwise."""
        d = self.pipe.defaults
        sized = replace(r, width=r.width or d.width, height=r.height or d.height)
        try:
            check = getattr(self.pipe, "request_regions", None)
            return check(sized) if check is not None else as_regions(r.regions, sized.width, sized.height)
        except RegionError as e:
            raise FieldError(field, str(e)) from None

    def check_limits(self, r: GenerationRequest, f: dict[str, str]) -> None:
        """FieldError for the first setting over the limits, or for a cost over the budget."""
        lim, d = self.limits, self.pipe.defaults
        for key in ("prompt", "negative_prompt"):
            if len(getattr(r, key)) > lim.max_prompt_chars:
                raise FieldError(f[key], f"{len(getattr(r, key))} characters; at most {lim.max_prompt_chars}")
        if r.num_images > lim.max_images:
            raise FieldError(f["num_images"], f"{r.num_images} images; at most {lim.max_images} per request")
        steps = r.steps or d.steps
        if steps > lim.max_steps:
            raise FieldError(f["steps"], f"{steps} steps; at most {lim.max_steps}")
        if r.guidance is not None and r.guidance > lim.max_guidance:
            raise FieldError(f["guidance"], f"{r.guidance}; at most {lim.max_guidance}")
        width, height = r.width or d.width, r.height or d.height
        for key, v, top in (("width", width, lim.max_width), ("height", height, lim.max_height)):
            if v % self.multiple or not self.multiple <= v <= top:
                raise FieldError(f[key], f"{v}: must be a multiple of {self.multiple} between {self.multiple} "
                                         f"and {top} for {self.model()}")
        cost = width * height * steps * r.num_images
        assert lim.max_pixel_steps is not None
        if cost > lim.max_pixel_steps:
            # Name the setting furthest above the model's default request, the one to lower first.
            native = self.caps.native_size[0] * self.caps.native_size[1]
            excess = {"num_images": r.num_images, "steps": steps / d.steps,
                      "width": width / self.caps.native_size[0], "height": height / self.caps.native_size[1]}
            worst = max(excess, key=lambda k: excess[k])
            raise FieldError(f[worst], f"{width}x{height} x {steps} steps x {r.num_images} images is {cost:,} "
                                       f"pixel-steps, over this server's budget of {lim.max_pixel_steps:,} "
                                       f"({lim.max_pixel_steps // (native * d.steps)} images at the native "
                                       f"{self.caps.native_size[0]}x{self.caps.native_size[1]} and {d.steps} "
                                       "steps); lower the size, steps or image count")

    def openai(self, req: OpenAIImageRequest) -> GenerationRequest:
        names = (self.pipe.name, "t2i", *OPENAI_MODEL_ALIASES)
        if req.model is not None and req.model not in names:
            raise FieldError("model", f"unknown model {req.model!r}; this server runs {self.pipe.name!r}",
                             status=404)
        width, height = parse_size(req.size)
        sampler, schedule = self.sampler(req.sampler, req.schedule, "sampler", "schedule")
        return self.request(dict(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed,
                                 num_images=req.n, steps=req.steps, guidance=req.guidance, sampler=sampler,
                                 schedule=schedule, width=width, height=height, layout=req.layout,
                                 **extras(req)),
                            {"width": "size", "height": "size"})

    def job(self, req: JobRequest) -> GenerationRequest:
        sampler, schedule = self.sampler(req.sampler, req.schedule, "sampler", "schedule")
        return self.request(dict(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed,
                                 num_images=req.n, steps=req.steps, guidance=req.guidance, sampler=sampler,
                                 schedule=schedule, width=req.width, height=req.height, layout=req.layout,
                                 regions=req.regions, region_weight=req.region_weight, **extras(req)))

    def a1111(self, req: A1111Txt2Img) -> GenerationRequest:
        """txt2img and img2img. Decodes the init image and mask (resized to the job's size), so the
        app calls it off the event loop."""
        for name, on in (("enable_hr", req.enable_hr), ("restore_faces", req.restore_faces),
                         ("tiling", req.tiling), ("subseed_strength", req.subseed_strength > 0),
                         ("script_name", bool(req.script_name))):
            if on:
                raise FieldError(name, f"not supported by this server ({self.model()})")
        sampler, schedule = self.sampler(req.sampler_name or req.sampler_index, req.scheduler, "sampler_name",
                                         "scheduler")
        names = {"num_images": "batch_size", "guidance": "cfg_scale", "sampler": "sampler_name",
                 "schedule": "scheduler", "init_image": "init_images", "strength": "denoising_strength"}
        given = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed,
                     num_images=req.batch_size * req.n_iter, steps=req.steps, guidance=req.cfg_scale,
                     sampler=sampler, schedule=schedule, eta=req.eta, width=req.width, height=req.height,
                     layout=req.layout, regions=req.regions, region_weight=req.region_weight, **extras(req))
        if not isinstance(req, A1111Img2Img):
            return self.request(given, names)
        if len(req.init_images) > 1:
            raise FieldError("init_images", "only one init image per request is supported")
        init = open_image(req.init_images[0], "init_images", self.limits)
        mask = open_image(req.mask, "mask", self.limits) if req.mask else None
        # Without a size, img2img keeps the input's, rounded down to what the model takes.
        m = self.multiple
        given["width"] = req.width or max(m, init.width // m * m)
        given["height"] = req.height or max(m, init.height // m * m)
        # Placeholders while the options and limits are checked: nothing is decoded for a refused request.
        tiny = Image.new("RGB", (1, 1))
        # A1111 clients send denoising_strength whether or not it was set (default 0.75); a model without a
        # strength (an upscaler: it keeps the whole image) only refuses one the client set itself.
        strength = (req.denoising_strength if self.caps.accepts("strength")
                    or "denoising_strength" in req.model_fields_set else None)
        request = self.request({**given, "init_image": tiny, "strength": strength,
                                "mask": tiny if mask else None}, names)
        size = (request.width or given["width"], request.height or given["height"])
        return replace(request, init_image=load_resized(init, size, "init_images"),
                       mask=None if mask is None else load_resized(mask, size, "mask", mask=True))
