"""`t2i serve`: the HTTP API and web page for one model, on 127.0.0.1 by default."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from t2i.systems.base import Pipeline


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI and AUTOMATIC1111 APIs, web page)",
                       description="Serve a model: OpenAI Images API (/v1/images/generations), "
                                   "AUTOMATIC1111 API (/sdapi/v1/...), a job API and a web page at /. "
                                   "SIGTERM or Ctrl-C stops the running job within a fraction of a step "
                                   "and answers waiting jobs 503 (they are not kept); with --broker, jobs live in "
                                   "Redis and go on (`t2i worker` runs them).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model name or path (default: the built-in shapes model); with --broker, the name of a "
                        "model the workers hold (default: the only one they hold)")
    p.add_argument("--broker", default=None, metavar="URL",
                   help="Redis URL (redis://host:6379/0): queue the jobs there for `t2i worker` processes on any "
                        "machine instead of running the model here; queued jobs outlive a restart of this front")
    p.add_argument("--embedding-dir", default=None, metavar="DIR",
                   help="textual-inversion embeddings (A1111 .pt/.safetensors) usable by name in every prompt")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="A1111's LoRA folder: <lora:name:weight> in a prompt merges name.safetensors (subfolders "
                        "too) for that request only")
    p.add_argument("--classifier", action="append", default=[], metavar="NAME=FILE",
                   help="a classifier-guidance model requests may name (`classifier`: NAME, with `classifier_scale`): "
                        "an ADM classifier (`t2i train classifier`) for pixel DDPMs, a noise-aware CLIP "
                        "(`t2i train noisy-clip`) for GLIDE (repeatable); clients name files only this way")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=16, help="waiting jobs allowed; more get 429 + Retry-After")
    p.add_argument("--max-batch", type=int, default=4,
                   help="images per model call when merging compatible requests (1: no batching)")
    p.add_argument("--batch-wait", type=float, default=0.0,
                   help="seconds to wait for more requests before starting a batch")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page's files")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow cross-origin requests from ORIGIN (repeatable; '*' for any)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a host name clients may reach the server by, besides loopback names, IP addresses "
                        "and --host (repeatable; '*' for any, which allows DNS rebinding)")
    p.add_argument("--max-size", type=int, default=None,
                   help="largest width and height in pixels (default: twice the model's native size)")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-pixel-steps", type=int, default=None,
                   help="budget per request: width x height x steps x images (default: 32 images at the "
                        "model's native size and default steps)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a request's headers")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds a request has to send its body")
    p.add_argument("--keep-alive", type=int, default=5, help="seconds an idle connection stays open")
    p.add_argument("--max-connections", type=int, default=128,
                   help="open connections at once; more are answered 503 and closed")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "int8", "compact"])
    p.set_defaults(func=run)


def classifier_files(specs: list[str]) -> dict[str, str]:
    """`--classifier NAME=FILE` options -> {NAME: FILE}; UserError for a malformed or repeated name or a
    missing file."""
    from t2i.cli import UserError

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise UserError(f"--classifier {spec!r}: expected NAME=FILE")
        if name in out:
            raise UserError(f"--classifier: the name {name!r} is given twice")
        if not os.path.isfile(path):
            raise UserError(f"--classifier {name}: no such file: {path}")
        out[name] = path
    return out


def check_classifiers(pipe: Pipeline, classifiers: dict[str, str]) -> None:
    """Load and check each `--classifier` file with the served pipeline's `check_classifier` (the right kind of
    file for the family, the model's noise schedule) before serving, so that a wrong one stops the start with a
    one-line UserError naming NAME, not every request that names it (whose error would show clients the path)."""
    from t2i.cli import UserError

    check = getattr(pipe, "check_classifier", None)
    for name, path in classifiers.items():
        try:
            if check is not None:
                check(path)
        except (ValueError, OSError) as e:
            raise UserError(f"--classifier {name}: {' '.join(str(e).split())}") from None


def run(args: argparse.Namespace) -> int:
    from t2i.cli import UserError

    try:
        import uvicorn  # noqa: F401 - only to tell the user what to install
    except ModuleNotFoundError:
        raise UserError("t2i serve needs FastAPI and uvicorn: pip install 't2i[serve]'") from None
    for name in ("max_queue", "max_batch", "max_size", "max_steps", "max_images", "max_pixel_steps",
                 "max_connections", "keep_alive"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    import t2i
    from t2i.serve.app import create_app
    from t2i.serve.config import Limits, ServeConfig
    from t2i.serve.server import build_server

    if args.lora_dir and not os.path.isdir(args.lora_dir):
        raise UserError(f"--lora-dir: no such folder: {args.lora_dir}")
    if args.lora_dir and args.precision == "int8":
        raise UserError("--lora-dir: LoRAs merge into float weights; use --precision fp32, bf16 or auto")
    classifiers = classifier_files(args.classifier)
    if classifiers and args.broker:
        raise UserError("--classifier: not with --broker (the workers would need the files)")
    if args.broker:
        try:
            import dramatiq  # noqa: F401 - only to tell the user what to install
        except ModuleNotFoundError:
            raise UserError("t2i serve --broker needs dramatiq and redis: pip install 't2i[distributed]'") from None
        if args.embedding_dir:
            raise UserError("--embedding-dir: with --broker, give it to each `t2i worker`")
        from t2i.serve.distributed import wait_for_model

        pipe = wait_for_model(args.broker, args.model)
    else:
        pipe = t2i.load(args.model, precision=args.precision, quantizable=args.lora_dir is None)
    if classifiers and not pipe.capabilities.accepts("classifier"):
        raise UserError(f"--classifier: {pipe.name} ({pipe.family}) does not take classifier guidance")
    check_classifiers(pipe, classifiers)
    limits = Limits(max_width=args.max_size, max_height=args.max_size, max_steps=args.max_steps,
                    max_images=args.max_images, max_pixel_steps=args.max_pixel_steps)
    config = ServeConfig(max_queue=args.max_queue, max_batch=args.max_batch, batch_wait=args.batch_wait,
                         api_key=args.api_key, cors_origins=args.cors_origin, limits=limits, host=args.host,
                         allowed_hosts=args.allowed_host, header_timeout=args.header_timeout,
                         body_timeout=args.body_timeout, keep_alive=args.keep_alive,
                         max_connections=args.max_connections, lora_dir=args.lora_dir,
                         embedding_dir=args.embedding_dir, broker=args.broker, classifiers=classifiers)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"t2i serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    build_server(create_app(pipe, config), config, port=args.port).run()
    return 0
