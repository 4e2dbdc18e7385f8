"""Images in and out: tensors <-> PIL, and PNG files that carry their generation parameters.

The `parameters` text chunk uses AUTOMATIC1111's format, which most image tools (A1111's PNG
info tab, ComfyUI, civitai, image browsers) already read:

    a red circle above a blue square
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: shapes

A value holding a comma, colon or newline is written as a JSON string, as A1111 quotes it (a
layout: `Layout: "{\\"units\\":\\"fractions\\",...}"`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from t2i.diffusion.paint_with_words import DEFAULT_WEIGHT, as_regions, regions_to_json
from t2i.layout.spec import Layout
from t2i.systems.base import GenerationRequest

# Our sampler names -> the names A1111 writes, so its tools recognise them.
A1111_SAMPLER_NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "lcm": "LCM",
}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> list of RGB PIL images (rounded, not truncated)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def from_pil(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) in [-1, 1]; resized to size=(W, H) with Lanczos if given."""
    image = image.convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.LANCZOS)
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return (arr.permute(2, 0, 1)[None].float() / 127.5) - 1


def format_parameters(prompt: str, negative_prompt: str = "", **settings: object) -> str:
    """A1111's `parameters` text. settings: steps, sampler (our name), schedule, guidance, seed,
    width, height, model, and any extra key=value pairs (written as `Key: value`)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    s = dict(settings)
    fields: list[tuple[str, object]] = []
    if "steps" in s:
        fields.append(("Steps", s.pop("steps")))
    if "sampler" in s:
        name = str(s.pop("sampler"))
        fields.append(("Sampler", A1111_SAMPLER_NAMES.get(name, name)))
    schedule = s.pop("schedule", None)
    if schedule and schedule != "default":
        fields.append(("Schedule type", str(schedule).capitalize()))
    if "guidance" in s:
        fields.append(("CFG scale", s.pop("guidance")))
    if "seed" in s:
        fields.append(("Seed", s.pop("seed")))
    if "width" in s and "height" in s:
        fields.append(("Size", f"{s.pop('width')}x{s.pop('height')}"))
    if "model" in s:
        fields.append(("Model", s.pop("model")))
    for k, v in s.items():
        if v is not None:
            fields.append((k.replace("_", " ").capitalize(), v))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields))
    return "\n".join(lines)


def request_parameters(request: GenerationRequest, prompt: str, negative_prompt: str, seed: int, model: str,
                       precision: str = "fp32") -> str:
    """The `parameters` of one image of a resolved request (steps, guidance, sampler, schedule, width,
    height and, with an init image, strength filled in): every setting that changes its pixels, so
    that `request_fields(parse_parameters(text))` regenerates it. Settings at their no-op value
    (eta 0, guidance rescale 0, deepcache 1, fp32) are left out, as A1111 leaves out what is off.
    precision: the weights' precision ("bf16" changes pixels slightly)."""
    r = request
    extra: dict[str, object] = {}
    if r.eta:
        extra["eta"] = r.eta
    if r.guidance_rescale:
        extra["guidance_rescale"] = r.guidance_rescale
    if r.init_image is not None:
        extra["denoising_strength"] = r.strength
    if r.refiner is not None:
        extra.update(refiner=r.refiner.name, refiner_switch_at=r.refiner_start)
    if r.deepcache > 1:
        extra["deepcache_interval"] = r.deepcache
    if r.preview:
        extra["decoder"] = "preview"
    if precision != "fp32":
        extra["precision"] = precision
    if r.controlnet is not None:  # the conditioning image itself is the user's file, not recorded
        extra.update(controlnet=getattr(r.controlnet, "name", "controlnet"), control_scale=r.control_scale)
    if r.layout is not None:  # given or planned: the boxes that were drawn
        extra["layout"] = r.layout.to_json()
    if r.classifier is not None and r.classifier_scale != 0:  # classifier guidance: the file's (served) name, its scale
        extra.update(classifier=r.classifier_name or Path(r.classifier).stem,
                     classifier_scale=1.0 if r.classifier_scale is None else r.classifier_scale)
    if r.regions:  # paint-with-words, with its weight (resolved requests hold Region objects)
        extra.update(regions=regions_to_json(as_regions(r.regions, r.width or 1, r.height or 1)),
                     region_weight=DEFAULT_WEIGHT if r.region_weight is None else r.region_weight)
    return format_parameters(prompt, negative_prompt, steps=r.steps, sampler=r.sampler, schedule=r.schedule,
                             guidance=r.guidance, seed=seed, width=r.width, height=r.height, model=model, **extra)


def _quote(v: object) -> str:
    """A1111's `quote`: a value that holds its separators becomes a JSON string (inner quotes and
    backslashes escaped, so `parse_parameters` reads back exactly what was written)."""
    text = str(v)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _unquote(value: str) -> str:
    """A1111's `unquote`: a JSON string's text; a value quoted without escapes (as t2i wrote before
    quoting followed A1111) loses only its quotes."""
    if not value.startswith('"'):
        return value
    try:
        text = json.loads(value)
    except json.JSONDecodeError:
        return value[1:-1]
    return text if isinstance(text, str) else value[1:-1]


def parse_parameters(text: str) -> dict[str, str]:
    """Inverse of `format_parameters`: {"prompt", "negative_prompt", "Steps", "Sampler", ...}."""
    lines = text.strip().split("\n")
    settings_line = lines[-1] if len(lines) > 1 and re.match(r"^\w[\w ]*: ", lines[-1]) else ""
    body = lines[:-1] if settings_line else lines
    out: dict[str, str] = {"prompt": "", "negative_prompt": ""}
    neg = [i for i, ln in enumerate(body) if ln.startswith("Negative prompt: ")]
    if neg:
        out["prompt"] = "\n".join(body[: neg[0]])
        out["negative_prompt"] = "\n".join(body[neg[0]:])[len("Negative prompt: "):]
    else:
        out["prompt"] = "\n".join(body)
    for m in re.finditer(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', settings_line):
        out[m.group(1).strip()] = _unquote(m.group(2).strip())
    return out


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None = None,
             overwrite: bool = True) -> None:
    """Write a PNG with the A1111 `parameters` chunk; atomically, so a reader never sees half a file.

    overwrite=False: FileExistsError if `path` exists, also when another process creates it while
    this one writes (the finished file is hard-linked into place, which never replaces a file).
    The temporary file is removed whatever happens."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give a .png file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _place_new(tmp: Path, path: Path) -> None:
    """Move the finished `tmp` to `path`, never replacing a file there (FileExistsError)."""
    try:
        os.link(tmp, path)  # atomic, and fails if path exists
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename (a narrow race remains)
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)


def read_parameters(path: str | os.PathLike) -> str | None:
    with Image.open(path) as im:
        return im.info.get("parameters")


# parse_parameters keys -> (GenerationRequest field, type); the inverse of request_parameters.
_REQUEST_KEYS: dict[str, tuple[str, type]] = {
    "Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int), "Eta": ("eta", float),
    "Guidance rescale": ("guidance_rescale", float), "Denoising strength": ("strength", float),
    "Refiner switch at": ("refiner_start", float), "Deepcache interval": ("deepcache", int),
    "Region weight": ("region_weight", float), "Noise level": ("noise_level", int),
    "Temperature": ("temperature", float), "Top k": ("top_k", int), "Top p": ("top_p", float),
}
_OUR_SAMPLER_NAMES = {v: k for k, v in A1111_SAMPLER_NAMES.items()}


def request_fields(params: dict[str, str]) -> dict[str, Any]:
    """`parse_parameters` output -> GenerationRequest keyword arguments (prompt, negative_prompt,
    steps, guidance, seed, sampler, schedule, width, height, layout and the optional settings present).

    What a PNG names but cannot hold comes back under its own key for the caller to load:
    "model", "refiner" (model names) and "precision"; an img2img or inpainting input image is
    not in the metadata at all. A1111 sampler names map back to ours ("DPM++ 2M" -> "dpmpp_2m")."""
    out: dict[str, Any] = {"prompt": params.get("prompt", ""), "negative_prompt": params.get("negative_prompt", "")}
    for key, (name, kind) in _REQUEST_KEYS.items():
        if key in params:
            out[name] = kind(params[key])
    if "Sampler" in params:
        out["sampler"] = _OUR_SAMPLER_NAMES.get(params["Sampler"], params["Sampler"])
    out["schedule"] = params.get("Schedule type", "default").lower()
    if "Size" in params:
        out["width"], out["height"] = (int(v) for v in params["Size"].split("x"))
    if params.get("Decoder") == "preview":
        out["preview"] = True
    if "Layout" in params:  # fractions: the size does not matter
        out["layout"] = Layout.from_json(params["Layout"], out.get("width", 1), out.get("height", 1))
    if "Regions" in params:  # fractions, as the layout
        out["regions"] = as_regions(params["Regions"], out.get("width", 1), out.get("height", 1))
    for key in ("Model", "Refiner", "Precision"):
        if key in params:
            out[key.lower()] = params[key]
    out.setdefault("precision", "fp32")
    return out
