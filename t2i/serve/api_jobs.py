"""Our own API, which the web page uses: jobs (submit, poll, list, cancel), `/v1/info` (the model,
its family and capabilities, the limits), `/health`, and the page itself."""

from __future__ import annotations

import base64
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from t2i.imageio import A1111_SAMPLER_NAMES
from t2i.serve.context import ServeContext, error
from t2i.serve.jobs import DONE, Job
from t2i.serve.schemas import JobRequest

STATIC = Path(__file__).resolve().parent / "static"


def job_json(ctx: ServeContext, job: Job, images: bool = True) -> dict:
    r = job.request
    out = {"id": job.id, "status": job.status, "progress": job.progress, "step": job.step,
           "steps": job.steps or r.steps, "eta_seconds": job.eta_seconds,
           "position": ctx.queue.position(job) if job.active else None, "created": job.created,
           "seed": r.seed, "error": job.error, "warnings": job.warnings}
    if images and job.status == DONE:
        out["images"] = [{"b64_json": base64.b64encode(o.png).decode(), "seed": o.seed,
                          "parameters": o.parameters} for o in job.outputs]
    return out


def info(ctx: ServeContext) -> dict:
    """The model, what it can do and what this server allows (the page sizes its form from it)."""
    caps, limits = ctx.pipe.capabilities, ctx.resolver.limits
    return {"model": ctx.pipe.name, "family": ctx.pipe.family, "defaults": asdict(ctx.pipe.defaults),
            "capabilities": {"options": sorted(caps.options), "samplers": list(caps.samplers),
                             "schedules": list(caps.schedules), "size_multiple": caps.size_multiple,
                             "native_size": list(caps.native_size)},
            "limits": asdict(limits), "size_multiple": ctx.resolver.multiple, "max_batch": ctx.config.max_batch,
            "max_queue": ctx.config.max_queue, "classifiers": sorted(ctx.config.classifiers),
            "samplers": [{"name": s, "label": A1111_SAMPLER_NAMES.get(s, s)} for s in caps.samplers]}


def router(ctx: ServeContext) -> APIRouter:
    api = APIRouter()
    queue = ctx.queue

    @api.post("/v1/jobs", status_code=202)
    async def create_job(body: JobRequest, request: Request):
        job = ctx.submit(await ctx.off_loop(ctx.resolver.job, body), request)
        return job if isinstance(job, JSONResponse) else job_json(ctx, job)

    @api.get("/v1/jobs")
    async def list_jobs():
        return {"jobs": [job_json(ctx, j, images=False) for j in queue.jobs.values()]}

    @api.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str):
        job = queue.jobs.get(job_id)
        return error(404, f"no job {job_id}") if job is None else job_json(ctx, job)

    @api.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        if not queue.cancel(job_id):
            job = queue.jobs.get(job_id)
            return error(404, f"no job {job_id}") if job is None else error(
                409, f"job {job_id} has already ended ({job.status})")
        return job_json(ctx, queue.jobs[job_id], images=False)

    @api.get("/v1/info")
    async def get_info():
        return info(ctx)

    @api.get("/health")
    async def health():
        return {"status": "ok", "model": ctx.pipe.name, "family": ctx.pipe.family, "queued": len(queue.pending),
                "running": sum(j.active for j in queue.running)}

    @api.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return api
