"""What `t2i serve` allows: queue and batch sizes, auth, CORS and the limits every request is checked
against before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Limits:
    """Per-request limits. Sizes in pixels; every violation is a 4xx naming the field."""

    max_width: int = 1024
    max_height: int = 1024
    max_steps: int = 150
    max_images: int = 8  # images per request (OpenAI `n`, A1111 `batch_size * n_iter`)
    max_prompt_chars: int = 4000
    max_guidance: float = 50.0
    max_body_bytes: int = 16 * 1024 * 1024  # img2img bodies carry base64 images
    max_init_pixels: int = 4096 * 4096  # decoded init image / mask, against decompression bombs


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
    """

    max_queue: int = 16
    max_batch: int = 4
    batch_wait: float = 0.0
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    retain_jobs: int = 64
    limits: Limits = field(default_factory=Limits)
