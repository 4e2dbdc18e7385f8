"""The HTTP app: OpenAI Images and AUTOMATIC1111 routes, our job API, and the web page.

    app = create_app(pipe, ServeConfig(max_queue=8, api_key="secret"))
    build_server(app, app.state.config).run()     # t2i.serve.server: timeouts, limits, shutdown

Every generation route turns its body into a `GenerationRequest` (t2i.serve.schemas: checked
against the model's capabilities and the limits, a 4xx naming the field otherwise), submits it to
the `JobQueue` (429 + Retry-After when full) and answers when the job ends: 200 with the images,
409 if it was cancelled, 500 if it failed, 503 if the server shut down first. The routes of each
API live in their own module (api_openai, api_a1111, api_jobs); this file assembles them.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from t2i.serve import api_a1111, api_jobs, api_openai
from t2i.serve.api_jobs import STATIC
from t2i.serve.config import ServeConfig
from t2i.serve.context import ServeContext, error
from t2i.serve.guard import Guard
from t2i.serve.schemas import FieldError
from t2i.systems.base import Pipeline


async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's refusal as a 422 naming the field (`body` for a body that is not JSON)."""
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # A JSON syntax error's loc is ("body", character offset): the field is the body itself.
    field = "body" if first.get("type") == "json_invalid" else ".".join(loc) or "body"
    return error(422, f"{field}: {first.get('msg')}", param=field)


async def bad_field(_request: Request, exc: FieldError) -> JSONResponse:
    return error(exc.status, str(exc), param=exc.field)


async def broker_away(_request: Request, exc: Exception) -> JSONResponse:
    """`t2i serve --broker`: Redis unreachable (or timing out) is the service being unavailable for
    a moment, not a server bug: 503 + Retry-After, as a client retries it."""
    return error(503, f"the job broker is unreachable, try again shortly ({type(exc).__name__}: {exc})",
                 headers={"Retry-After": "5"}, kind="server_error")


def create_app(pipe: Pipeline, config: ServeConfig | None = None) -> FastAPI:
    """The app for one pipeline. The job queue starts and stops with the app (its lifespan)."""
    ctx = ServeContext.create(pipe, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await ctx.queue.start()
        yield
        await ctx.queue.stop()
        ctx.close()

    app = FastAPI(title="t2i", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.queue, app.state.config, app.state.context = ctx.queue, ctx.config, ctx
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(FieldError, bad_field)
    if ctx.config.broker is not None:
        import redis

        app.add_exception_handler(redis.RedisError, broker_away)
    for api in (api_openai, api_a1111, api_jobs):
        app.include_router(api.router(ctx))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # The guard wraps everything, so a refused request never reaches a route or the queue.
    c = ctx.config
    app.add_middleware(Guard, api_key=c.api_key, cors_origins=c.cors_origins, max_body_bytes=c.limits.max_body_bytes,
                       host_names=[c.host, *c.allowed_hosts], body_timeout=c.body_timeout)
    return app
