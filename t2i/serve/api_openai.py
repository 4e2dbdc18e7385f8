"""OpenAI's Images API: `POST /v1/images/generations` (b64_json or URLs), the image URLs, `/v1/models`."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from t2i.serve.context import ServeContext, error
from t2i.serve.jobs import DONE
from t2i.serve.schemas import OpenAIImageRequest


def router(ctx: ServeContext) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/images/generations")
    async def generate(body: OpenAIImageRequest, request: Request):
        job = await ctx.run(await ctx.off_loop(ctx.resolver.openai, body), request)
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

    @api.get("/v1/images/{job_id}/{index}.png")
    async def image_file(job_id: str, index: int):
        job = ctx.queue.jobs.get(job_id)
        if job is None or job.status != DONE or not 0 <= index < len(job.outputs):
            return error(404, f"no image {index} for job {job_id} (finished jobs are kept for a while only)")
        return Response(job.outputs[index].png, media_type="image/png")

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": ctx.pipe.name, "object": "model", "created": 0,
                                            "owned_by": "t2i"}]}

    return api
