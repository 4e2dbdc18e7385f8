"""The HTTP app: OpenAI Images and AUTOMATIC1111 routes, our job API, and the web page.

    app = create_app(pipe, ServeConfig(max_queue=8, api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every generation route resolves its body into a `GenSpec` (all checks done, 4xx naming the field
otherwise), submits it to the `JobQueue` (429 + Retry-After when full) and answers when the job
ends: 200 with the images, 409 if it was cancelled, 500/503 if it failed.
"""

from __future__ import annotations

import base64
import json
import re
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from t2i.imageio import A1111_SAMPLER_NAMES
from t2i.samplers.sampling import SAMPLERS
from t2i.serve.config import ServeConfig
from t2i.serve.guard import Guard
from t2i.serve.jobs import CANCELLED, DONE, DuplicateJob, GenSpec, Job, JobQueue, QueueFull
from t2i.serve.schemas import (
    A1111Img2Img,
    A1111Txt2Img,
    FieldError,
    JobRequest,
    OpenAIImageRequest,
    Resolver,
)

STATIC = Path(__file__).resolve().parent / "static"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None,
          kind: str = "invalid_request_error") -> JSONResponse:
    """OpenAI's error object plus FastAPI/A1111's `detail`, so every client shows the message."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status},
                         "detail": message}, status_code=status, headers=headers)


def create_app(pipe, config: ServeConfig | None = None) -> FastAPI:
    """The app for one pipeline. The job queue starts and stops with the app (its lifespan)."""
    config = config or ServeConfig()
    queue = JobQueue(pipe, config.max_queue, config.max_batch, config.batch_wait, config.retain_jobs)
    resolver = Resolver(pipe, config.limits)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await queue.start()
        yield
        await queue.stop()

    app = FastAPI(title="t2i", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.queue, app.state.config = queue, config

    # ------------------------------------------------------------------ errors

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # A JSON syntax error's loc is ("body", character offset): the field is the body itself.
        field = "body" if first.get("type") == "json_invalid" else ".".join(loc) or "body"
        return error(422, f"{field}: {first.get('msg')}", param=field)

    @app.exception_handler(FieldError)
    async def bad_field(_request: Request, exc: FieldError) -> JSONResponse:
        return error(exc.status, str(exc), param=exc.field)

    # ------------------------------------------------------------------ running jobs

    def job_id_from(request: Request) -> str | None:
        job_id = request.headers.get("x-job-id")
        if job_id is not None and not JOB_ID_RE.match(job_id):
            raise FieldError("X-Job-Id", "1-64 characters from A-Z a-z 0-9 _ . -")
        return job_id

    def submit(spec: GenSpec, request: Request) -> Job | JSONResponse:
        try:
            return queue.submit(spec, job_id_from(request))
        except QueueFull as e:
            return error(429, str(e), headers={"Retry-After": str(e.retry_after)}, kind="rate_limit_error")
        except DuplicateJob as e:
            return error(409, str(e), param="X-Job-Id")

    async def run(spec: GenSpec, request: Request) -> Job | JSONResponse:
        """Queue the job and wait for its end; a JSONResponse for anything but success."""
        job = submit(spec, request)
        if isinstance(job, JSONResponse):
            return job
        assert job.future is not None
        await job.future
        if job.status == DONE:
            return job
        if job.status == CANCELLED:
            return error(409, f"job {job.id} was cancelled", kind="cancelled")
        return error(503 if "shutting down" in (job.error or "") else 500, job.error or "failed", kind="server_error")

    # ------------------------------------------------------------------ OpenAI

    @app.post("/v1/images/generations")
    async def openai_generate(body: OpenAIImageRequest, request: Request):
        job = await run(resolver.openai(body), request)
        if isinstance(job, JSONResponse):
            return job
        base = str(request.base_url).rstrip("/")
        data = []
        for i, out in enumerate(job.outputs):
            item: dict = {"seed": out.seed}
            if body.response_format == "b64_json":
                item["b64_json"] = base64.b64encode(out.png).decode()
            else:
                item["url"] = f"{base}/v1/images/{job.id}/{i}.png"
            data.append(item)
        return {"created": int(job.created), "data": data}

    @app.get("/v1/images/{job_id}/{index}.png")
    async def image_file(job_id: str, index: int):
        job = queue.jobs.get(job_id)
        if job is None or job.status != DONE or not 0 <= index < len(job.outputs):
            return error(404, f"no image {index} for job {job_id} (finished jobs are kept for a while only)")
        return Response(job.outputs[index].png, media_type="image/png")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": pipe.name, "object": "model", "created": 0, "owned_by": "t2i"}]}

    # ------------------------------------------------------------------ our job API (the web page)

    def job_json(job: Job, images: bool = True) -> dict:
        out = {"id": job.id, "status": job.status, "progress": job.progress, "step": job.step,
               "steps": job.steps or job.spec.settings.steps, "eta_seconds": job.eta_seconds,
               "position": queue.position(job) if job.active else None, "created": job.created,
               "seed": job.spec.seed, "error": job.error, "warnings": job.warnings}
        if images and job.status == DONE:
            out["images"] = [{"b64_json": base64.b64encode(o.png).decode(), "seed": o.seed,
                              "parameters": o.parameters} for o in job.outputs]
        return out

    @app.post("/v1/jobs", status_code=202)
    async def create_job(body: JobRequest, request: Request):
        job = submit(resolver.job(body), request)
        return job if isinstance(job, JSONResponse) else job_json(job)

    @app.get("/v1/jobs")
    async def list_jobs():
        return {"jobs": [job_json(j, images=False) for j in queue.jobs.values()]}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str):
        job = queue.jobs.get(job_id)
        return error(404, f"no job {job_id}") if job is None else job_json(job)

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        if not queue.cancel(job_id):
            job = queue.jobs.get(job_id)
            return error(404, f"no job {job_id}") if job is None else error(
                409, f"job {job_id} has already ended ({job.status})")
        return job_json(queue.jobs[job_id], images=False)

    @app.get("/v1/info")
    async def info():
        return {"model": pipe.name, "defaults": asdict(pipe.defaults), "limits": asdict(config.limits),
                "size_multiple": resolver.multiple, "max_batch": config.max_batch, "max_queue": config.max_queue,
                "samplers": [{"name": s, "label": A1111_SAMPLER_NAMES.get(s, s)} for s in SAMPLERS]}

    # ------------------------------------------------------------------ AUTOMATIC1111

    async def a1111(body: A1111Txt2Img, request: Request):
        spec = resolver.a1111(body)
        job = await run(spec, request)
        if isinstance(job, JSONResponse):
            return job
        s = spec.settings
        seeds = [o.seed for o in job.outputs]
        n = len(seeds)
        sampler = A1111_SAMPLER_NAMES.get(s.sampler, s.sampler)
        info = {"prompt": spec.prompt, "all_prompts": [spec.prompt] * n, "negative_prompt": spec.negative_prompt,
                "all_negative_prompts": [spec.negative_prompt] * n, "seed": spec.seed, "all_seeds": seeds,
                "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": s.width,
                "height": s.height, "sampler_name": sampler, "scheduler": s.schedule.capitalize(),
                "cfg_scale": s.guidance, "steps": s.steps, "batch_size": body.batch_size, "restore_faces": False,
                "sd_model_name": pipe.name, "denoising_strength": spec.strength, "styles": [],
                "extra_generation_params": {}, "index_of_first_image": 0,
                "infotexts": [o.parameters for o in job.outputs],
                "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": "t2i",
                "warnings": job.warnings}
        parameters = body.model_dump(exclude={"init_images", "mask"})
        return {"images": [base64.b64encode(o.png).decode() for o in job.outputs],
                "parameters": parameters, "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: A1111Txt2Img, request: Request):
        return await a1111(body, request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: A1111Img2Img, request: Request):
        return await a1111(body, request)

    @app.get("/sdapi/v1/progress")
    async def progress():
        job = queue.current()
        waiting = len(queue.pending) + len(queue.running)
        return {"progress": job.progress if job else 0.0, "eta_relative": (job.eta_seconds or 0.0) if job else 0.0,
                "state": {"skipped": False, "interrupted": False, "job": job.id if job else "",
                          "job_count": waiting, "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "job_no": 0,
                          "sampling_step": job.step if job else 0,
                          "sampling_steps": (job.steps or job.spec.settings.steps) if job else 0},
                "current_image": None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        return {"interrupted": queue.interrupt()}

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": pipe.name, "model_name": pipe.name, "hash": None, "sha256": None,
                 "filename": pipe.name, "config": None}]

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": A1111_SAMPLER_NAMES.get(s, s), "aliases": [s], "options": {}} for s in SAMPLERS]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None},
                {"name": "karras", "label": "Karras", "aliases": None}]

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/options")
    async def options():
        return {"sd_model_checkpoint": pipe.name}

    # ------------------------------------------------------------------ health and the page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": pipe.name, "queued": len(queue.pending),
                "running": sum(j.active for j in queue.running)}

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # The guard wraps everything, so a refused request never reaches a route or the queue.
    app.add_middleware(Guard, api_key=config.api_key, cors_origins=config.cors_origins,
                       max_body_bytes=config.limits.max_body_bytes)
    return app
