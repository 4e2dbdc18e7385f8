"""AUTOMATIC1111's API (`/sdapi/v1/...`): txt2img, img2img, progress with a live preview, interrupt,
and the listings its clients read (models, samplers, schedulers, scripts, options, LoRAs, embeddings)."""

from __future__ import annotations

import base64
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from t2i.diffusion.paint_with_words import DEFAULT_WEIGHT, regions_to_json
from t2i.imageio import A1111_SAMPLER_NAMES
from t2i.serve.context import ServeContext
from t2i.serve.jobs import Job, encode_png, sketch
from t2i.serve.networks import lora_listing
from t2i.serve.schemas import A1111Img2Img, A1111Txt2Img
from t2i.systems.base import GenerationRequest


def timestamp(job: Job) -> str:
    """A1111's job_timestamp: the job's creation time, so it is the same on every poll of one job."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(job.created))


def generation_info(ctx: ServeContext, r: GenerationRequest, job: Job, batch_size: int) -> dict:
    """The `info` A1111 returns beside the images (its clients read seeds and settings from it)."""
    seeds = [o.seed for o in job.outputs]
    n = len(seeds)
    return {"prompt": r.prompt, "all_prompts": [r.prompt] * n, "negative_prompt": r.negative_prompt,
            "all_negative_prompts": [r.negative_prompt] * n, "seed": r.seed, "all_seeds": seeds,
            "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": r.width, "height": r.height,
            "sampler_name": A1111_SAMPLER_NAMES.get(r.sampler or "", r.sampler),
            "scheduler": (r.schedule or "").capitalize(), "cfg_scale": r.guidance, "steps": r.steps,
            "batch_size": batch_size, "restore_faces": False, "sd_model_name": ctx.pipe.name,
            "denoising_strength": r.strength, "styles": [],
            "extra_generation_params": extra_generation_params(r),
            "index_of_first_image": 0, "infotexts": [o.parameters for o in job.outputs],
            "job_timestamp": timestamp(job), "clip_skip": 1, "is_using_inpainting_conditioning": False,
            "version": "t2i", "warnings": job.warnings}


def extra_generation_params(r: GenerationRequest) -> dict[str, str]:
    """What t2i adds to A1111's settings, as its PNG parameters name it: the layout, the regions."""
    out = {} if r.layout is None else {"Layout": r.layout.to_json()}  # type: ignore[union-attr]
    if r.regions:
        out["Regions"] = regions_to_json(r.regions)  # resolved by then: Region objects
        out["Region weight"] = str(DEFAULT_WEIGHT if r.region_weight is None else r.region_weight)
    return out


def preview_png(ctx: ServeContext, job: Job) -> str | None:
    """Base64 PNG of the running batch's first image as it stands: through the pipeline's preview
    decoder when it has one, else a sketch of the sample's channels; None before the first step."""
    sample = ctx.queue.sample
    if sample is None:
        return None
    if getattr(ctx.pipe, "preview_decoder", None) is not None:
        image = ctx.pipe.decode(sample[:1], preview=True)[0]
    else:
        image = sketch(sample, (job.request.width or 64, job.request.height or 64))
    return None if image is None else base64.b64encode(encode_png(image)).decode()


def router(ctx: ServeContext) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1")
    queue, pipe = ctx.queue, ctx.pipe

    async def generate(body: A1111Txt2Img, request: Request):
        r = await ctx.off_loop(ctx.resolver.a1111, body)
        job = await ctx.run(r, request)
        if isinstance(job, JSONResponse):
            return job
        parameters = body.model_dump(exclude={"init_images", "mask"})
        return {"images": [base64.b64encode(o.png).decode() for o in job.outputs], "parameters": parameters,
                "info": json.dumps(generation_info(ctx, job.request, job, body.batch_size))}

    @api.post("/txt2img")
    async def txt2img(body: A1111Txt2Img, request: Request):
        return await generate(body, request)

    @api.post("/img2img")
    async def img2img(body: A1111Img2Img, request: Request):
        return await generate(body, request)

    @api.get("/progress")
    async def progress(skip_current_image: bool = False):
        job = queue.current()
        image = None
        if job is not None and not skip_current_image:
            image = await ctx.off_loop(preview_png, ctx, job)
        return {"progress": job.progress if job else 0.0, "eta_relative": (job.eta_seconds or 0.0) if job else 0.0,
                "state": {"skipped": False, "interrupted": bool(job and job.interrupted), "job": job.id if job else "",
                          "job_count": len(queue.pending) + len(queue.running),
                          "job_timestamp": timestamp(job) if job else "0", "job_no": 0,
                          "sampling_step": job.step if job else 0,
                          "sampling_steps": (job.steps or job.request.steps) if job else 0},
                "current_image": image, "textinfo": None}

    @api.post("/interrupt")
    async def interrupt():
        return {"interrupted": queue.interrupt()}

    @api.get("/sd-models")
    async def sd_models():
        return [{"title": pipe.name, "model_name": pipe.name, "hash": None, "sha256": None,
                 "filename": pipe.name, "config": None}]

    @api.get("/samplers")
    async def samplers():
        return [{"name": A1111_SAMPLER_NAMES.get(s, s), "aliases": [s], "options": {}}
                for s in pipe.capabilities.samplers]

    @api.get("/schedulers")
    async def schedulers():
        label = {"default": ("automatic", "Automatic")}
        return [{"name": label.get(s, (s, s.capitalize()))[0], "label": label.get(s, (s, s.capitalize()))[1],
                 "aliases": None} for s in pipe.capabilities.schedules]

    @api.get("/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @api.get("/options")
    async def options():
        return {"sd_model_checkpoint": pipe.name}

    @api.get("/loras")
    async def loras():
        return await ctx.off_loop(lora_listing, ctx.config.lora_dir)

    @api.post("/refresh-loras")
    async def refresh_loras():  # nothing to refresh: every tag and listing reads the folder as it is now
        return None

    @api.get("/embeddings")
    async def embeddings():
        return ctx.embeddings

    return api
