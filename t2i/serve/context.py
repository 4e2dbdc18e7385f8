"""What every route shares: the served pipeline, the config, the job queue and the request resolver,
with the two steps every generation route takes (resolve the body off the event loop, then queue
the job and wait for its end) and the one error shape every client understands."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse

from t2i.serve.config import ServeConfig
from t2i.serve.jobs import CANCELLED, DONE, SHUTTING_DOWN, DuplicateJob, Job, JobQueue, QueueFull
from t2i.serve.networks import load_embedding_listing
from t2i.serve.schemas import FieldError, Resolver
from t2i.systems.base import GenerationRequest, Pipeline

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DISCONNECT_POLL = 0.1  # seconds between checks that the client of a waiting request is still there
T = TypeVar("T")


def error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None,
          kind: str = "invalid_request_error") -> JSONResponse:
    """OpenAI's error object plus FastAPI/A1111's `detail`, so every client shows the message."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status},
                         "detail": message}, status_code=status, headers=headers)


@dataclass
class ServeContext:
    """One served model. `decoder` runs request resolution (base64 + image decoding) off the event
    loop; two threads bound how many full-size uploads are decoded at once. `embeddings`:
    `/sdapi/v1/embeddings`' answer (the embeddings of `config.embedding_dir`, added at creation)."""

    pipe: Pipeline
    config: ServeConfig
    queue: JobQueue  # or t2i.serve.distributed.RedisJobQueue, which has the same methods
    resolver: Resolver
    decoder: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="t2i-decode"))
    embeddings: dict[str, dict[str, Any]] = field(default_factory=lambda: {"loaded": {}, "skipped": {}})

    @classmethod
    def create(cls, pipe: Pipeline, config: ServeConfig) -> ServeContext:
        """With `config.broker`, the queue is Redis's and `pipe` the workers' model (a RemotePipeline)."""
        if config.broker is not None:
            from t2i.serve.distributed import RedisJobQueue

            queue = RedisJobQueue(config.broker, pipe.name, config.max_queue, config.max_batch, config.retain_jobs,
                                  config.lora_dir)
        else:
            queue = JobQueue(pipe, config.max_queue, config.max_batch, config.batch_wait, config.retain_jobs,
                             config.lora_dir)
        ctx = cls(pipe, config, queue, Resolver(pipe, config.limits, config.classifiers))
        if config.embedding_dir:
            ctx.embeddings = load_embedding_listing(pipe, config.embedding_dir)
        return ctx

    async def off_loop(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on the decode threads: request resolution (base64 and image decoding) and
        previews, which would otherwise stall every other request (FieldError passes through)."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)

    def submit(self, request: GenerationRequest, http: Request) -> Job | JSONResponse:
        """Queue the job (429 + Retry-After when full, 409 for a taken X-Job-Id, 422 naming a
        `<lora:...>` tag whose file is not in the LoRA folder)."""
        job_id = http.headers.get("x-job-id")
        if job_id is not None and not JOB_ID_RE.match(job_id):
            raise FieldError("X-Job-Id", "1-64 characters from A-Z a-z 0-9 _ . -")
        try:
            return self.queue.submit(request, job_id)
        except QueueFull as e:
            if self.queue.closing:
                return error(503, SHUTTING_DOWN, kind="server_error")
            return error(429, str(e), headers={"Retry-After": str(e.retry_after)}, kind="rate_limit_error")
        except DuplicateJob as e:
            return error(409, str(e), param="X-Job-Id")

    async def run(self, request: GenerationRequest, http: Request) -> Job | JSONResponse:
        """Queue the job and wait for its end; a JSONResponse for anything but success. A client that
        disconnects while waiting cancels its job (the batch stops if no one else wants it)."""
        job = self.submit(request, http)
        if isinstance(job, JSONResponse):
            return job
        assert job.future is not None
        while not job.future.done():
            await asyncio.wait([job.future], timeout=DISCONNECT_POLL)
            if not job.future.done() and await http.is_disconnected():
                self.queue.cancel(job.id)
        if job.status == DONE:
            return job
        if job.status == CANCELLED:
            return error(409, f"job {job.id} was cancelled", kind="cancelled")
        status = 503 if SHUTTING_DOWN in (job.error or "") else 500
        return error(status, job.error or "failed", kind="server_error")

    def close(self) -> None:
        self.decoder.shutdown(wait=False, cancel_futures=True)
