"""What `t2i serve` allows: queue and batch sizes, auth, CORS, host names, timeouts, and the limits every
request is checked against before any work starts.

Limits follow the served model unless set: the largest size is twice the model's native width and
height, and a request may cost (width x height x steps x images) as much as 32 images at the native
size and the model's default steps. `Limits.for_model` turns the unset ones into numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Unset limits, as multiples of what the model was made for (its native size and default steps).
SIZE_FACTOR = 2  # largest width (height): this many times the native width (height)
BUDGET_IMAGES = 32  # pixel-step budget: this many default images at the native size


@dataclass
class Limits:
    """Per-request limits. Sizes in pixels; every violation is a 4xx naming the field.

    max_width, max_height: None = SIZE_FACTOR x the model's native size.
    max_pixel_steps: width * height * steps * images a request may ask for (its estimated cost);
        None = BUDGET_IMAGES x native width x native height x the model's default steps.
    """

    max_width: int | None = None
    max_height: int | None = None
    max_steps: int = 150
    max_images: int = 8  # images per request (OpenAI `n`, A1111 `batch_size * n_iter`)
    max_pixel_steps: int | None = None
    max_prompt_chars: int = 4000
    max_guidance: float = 50.0
    max_body_bytes: int = 16 * 1024 * 1024  # img2img bodies carry base64 images
    max_init_pixels: int = 4096 * 4096  # decoded init image / mask, against decompression bombs

    def for_model(self, native_size: tuple[int, int], default_steps: int) -> Limits:
        """These limits with every unset one derived from the model's native (width, height) and steps."""
        w, h = native_size
        return replace(self, max_width=self.max_width or SIZE_FACTOR * w,
                       max_height=self.max_height or SIZE_FACTOR * h,
                       max_pixel_steps=self.max_pixel_steps or BUDGET_IMAGES * w * h * default_steps)


@dataclass
class ServeConfig:
    """Server settings (the `t2i serve` options).

    max_queue: jobs that may wait (not counting the batch running); beyond it a request gets 429.
    max_batch: images per model call when compatible jobs are merged; 1 turns batching off.
    batch_wait: seconds the dispatcher waits after the first job of a batch for companions to
        arrive; 0 takes only what is already queued (the queue fills while the model runs).
    api_key: when set, every route but /health (and the static page itself) needs
        `Authorization: Bearer KEY`.
    cors_origins: origins allowed to make cross-origin requests ("*" for any); without one, a
        cross-origin POST is refused with 403.
    retain_jobs: finished jobs kept for `GET /v1/jobs/{id}` and image URLs (oldest dropped first).
    host: the address the server is bound to; its name is allowed in `Host` headers.
    allowed_hosts: further names clients may reach the server by (`Host` header; "*" for any).
        Loopback names and IP addresses are always allowed: DNS rebinding needs a domain name.
    header_timeout: seconds a connection has to deliver a request's headers (from connecting, or
        from the end of its previous response); then it is closed.
    body_timeout: seconds a request has to deliver its whole body once the headers are in; then 408.
    keep_alive: seconds an idle keep-alive connection stays open.
    max_connections: open connections at once; one more is answered 503 and closed at once, so slow
        clients cannot use up the process's file descriptors.
    lora_dir: A1111's LoRA folder: a prompt's `<lora:name:w>` merges `name.safetensors` (found under
        it, subfolders too) for that request only; without it a tag is refused (422).
    embedding_dir: textual-inversion embeddings added to the model when the app is made, usable by
        name in every prompt (`/sdapi/v1/embeddings` lists them).
    broker: a Redis URL: jobs go to `t2i worker` processes through it (t2i.serve.distributed) and the
        served pipeline is the workers' model as they advertise it; None: the model runs in this
        process (the default).
    classifiers: name -> file of the classifier-guidance models (ADM classifiers, GLIDE's noise-aware
        CLIP) a request may name in its `classifier` field; the only files a client can make the server read.
    """

    max_queue: int = 16
    max_batch: int = 4
    batch_wait: float = 0.0
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    retain_jobs: int = 64
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"
    allowed_hosts: list[str] = field(default_factory=list)
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive: int = 5
    max_connections: int = 128
    lora_dir: str | None = None
    embedding_dir: str | None = None
    broker: str | None = None
    classifiers: dict[str, str] = field(default_factory=dict)
