"""The job queue: one worker thread runs the model, a bounded queue in front of it, compatible jobs
merged into one batch.

Threads: the asyncio event loop owns the queue (`submit`, `cancel` and the dispatcher run on it, so
the queue needs no lock); the single worker thread only runs `pipe.generate` for one batch at a
time, because torch on a few CPU cores gains nothing from two generations at once. The worker
writes progress fields on the jobs it runs (plain attribute stores) and answers through the loop
with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image, PngImagePlugin

QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"


@dataclass(frozen=True)
class Settings:
    """Settings a batch shares: jobs with equal Settings (and no init image) can run as one call."""

    steps: int
    guidance: float
    sampler: str
    schedule: str  # "default" or "karras"
    width: int
    height: int
    eta: float | None = None  # DDIM only


@dataclass
class GenSpec:
    """One request, resolved: a concrete seed (never -1) and every setting filled in.

    Image i of the request starts from seed + i, as `t2i generate --num-images` does, so the
    images are the same whether the job runs alone or batched with others."""

    prompt: str
    negative_prompt: str
    seed: int
    n: int
    settings: Settings
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float | None = None

    @property
    def batchable(self) -> bool:
        return self.init_image is None


@dataclass
class Output:
    """One generated image: PNG bytes (with the A1111 `parameters` chunk), its seed and parameters."""

    png: bytes
    seed: int
    parameters: str


@dataclass
class Job:
    id: str
    spec: GenSpec
    created: float = field(default_factory=time.time)
    status: str = QUEUED
    step: int = 0
    steps: int = 0
    started: float | None = None  # perf_counter at the start of its batch
    finished: float | None = None
    outputs: list[Output] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    future: asyncio.Future | None = None

    @property
    def active(self) -> bool:
        return self.status in (QUEUED, RUNNING)

    @property
    def progress(self) -> float:
        """Fraction done in [0, 1] (1 only once the images are encoded)."""
        if self.status == DONE:
            return 1.0
        return 0.0 if not self.steps else min(self.step / self.steps, 0.99)

    @property
    def eta_seconds(self) -> float | None:
        """Remaining sampling time extrapolated from the steps done so far (None before the first)."""
        if self.status != RUNNING or not self.step or self.started is None:
            return None
        elapsed = time.perf_counter() - self.started
        return elapsed / self.step * (self.steps - self.step)


class QueueFull(Exception):
    """The queue holds max_queue waiting jobs. retry_after: suggested wait in whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class DuplicateJob(Exception):
    """A client-chosen job id is already in use by an active job."""


class _Interrupted(Exception):
    """Raised from the step callback to stop a batch whose jobs were all cancelled."""


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with the image's A1111 `parameters` text chunk; deterministic for equal pixels."""
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


class JobQueue:
    """Accepts jobs, runs them in batches on one worker thread, answers every accepted job.

    Args:
        pipe: a pipeline with `generate(prompts, negatives, seed=[...], ..., callback)`.
        max_queue: waiting jobs allowed (the running batch is not counted); more -> QueueFull.
        max_batch: images per `generate` call when merging compatible jobs (a bigger job runs alone).
        batch_wait: seconds to wait for companions after the first job of a batch (0: none).
        retain: finished jobs kept for lookups by id.
    """

    def __init__(self, pipe, max_queue: int = 16, max_batch: int = 4, batch_wait: float = 0.0,
                 retain: int = 64) -> None:
        self.pipe = pipe
        self.max_queue, self.max_batch, self.batch_wait, self.retain = max_queue, max_batch, batch_wait, retain
        self.jobs: OrderedDict[str, Job] = OrderedDict()  # every active job and the last `retain` finished
        self.pending: deque[Job] = deque()
        self.running: list[Job] = []
        self.seconds_per_image = 1.0  # running estimate, for Retry-After and the queue ETA
        self.batches = 0  # generate calls made (the benchmark and tests read it)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2i-model")

    # ------------------------------------------------------------------ lifecycle (event loop)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._dispatch())

    async def stop(self) -> None:
        """Answer every waiting job (503-style failure) and stop the dispatcher."""
        while self.pending:
            self._finish(self.pending.popleft(), FAILED, "the server is shutting down")
        for job in self.running:
            self._finish(job, CANCELLED, "the server is shutting down")
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ API (event loop)

    def submit(self, spec: GenSpec, job_id: str | None = None) -> Job:
        if len(self.pending) >= self.max_queue:
            raise QueueFull(self.retry_after())
        if job_id is not None and job_id in self.jobs and self.jobs[job_id].active:
            raise DuplicateJob(f"job id {job_id!r} is already queued or running")
        job = Job(job_id or secrets.token_hex(8), spec)
        job.future = asyncio.get_running_loop().create_future()
        self.jobs.pop(job.id, None)
        self.jobs[job.id] = job
        self.pending.append(job)
        assert self._wake is not None, "JobQueue.start() was not called"
        self._wake.set()
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; its request is answered at once. False if not active."""
        job = self.jobs.get(job_id)
        if job is None or not job.active:
            return False
        if job.status == QUEUED:
            self.pending.remove(job)
        self._finish(job, CANCELLED, "cancelled")
        return True

    def interrupt(self) -> list[str]:
        """Cancel the running batch (A1111's /interrupt). Returns the cancelled job ids."""
        ids = [j.id for j in self.running if j.active]
        for i in ids:
            self.cancel(i)
        return ids

    def position(self, job: Job) -> int:
        """0 for a running job, k for the k-th waiting one."""
        return 0 if job.status != QUEUED else list(self.pending).index(job) + 1

    def retry_after(self) -> int:
        waiting = sum(j.spec.n for j in self.pending) + sum(j.spec.n for j in self.running)
        return max(1, round(waiting * self.seconds_per_image / max(1, self.max_batch) + 0.5))

    # ------------------------------------------------------------------ dispatcher (event loop)

    async def _dispatch(self) -> None:
        assert self._wake is not None and self._loop is not None
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.batch_wait > 0 and self.max_batch > 1:
                await asyncio.sleep(self.batch_wait)
                if not self.pending:  # all cancelled while we waited
                    continue
            batch = self._take_batch()
            self.running = batch
            for job in batch:
                job.status, job.steps, job.started = RUNNING, job.spec.settings.steps, time.perf_counter()
            try:
                await self._loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as e:  # anything the worker did not turn into job failures
                for job in batch:
                    self._finish(job, FAILED, f"generation failed: {e}")
            self.running = []
            self._prune()

    def _take_batch(self) -> list[Job]:
        """The oldest waiting job plus later compatible ones, up to max_batch images in all."""
        first = self.pending.popleft()
        batch, images = [first], first.spec.n
        if not first.spec.batchable:
            return batch
        for job in list(self.pending):
            if images + job.spec.n > self.max_batch:
                continue
            if job.spec.batchable and job.spec.settings == first.spec.settings:
                self.pending.remove(job)
                batch.append(job)
                images += job.spec.n
        return batch

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        if not job.active:  # already answered (e.g. cancelled while its batch ran)
            return
        job.status, job.error, job.finished = status, error, time.time()
        if job.future is not None and not job.future.done():
            job.future.set_result(job)

    def _prune(self) -> None:
        done = [k for k, j in self.jobs.items() if not j.active]
        for k in done[: max(0, len(done) - self.retain)]:
            del self.jobs[k]

    # ------------------------------------------------------------------ worker thread

    def _run_batch(self, batch: list[Job]) -> None:
        """Runs on the worker thread: one `generate` call for the whole batch, then PNG encoding."""
        assert self._loop is not None
        prompts, negatives, seeds = [], [], []
        for job in batch:
            for i in range(job.spec.n):
                prompts.append(job.spec.prompt)
                negatives.append(job.spec.negative_prompt)
                seeds.append(job.spec.seed + i)
        first, s = batch[0].spec, batch[0].spec.settings

        def on_step(step: int, total: int) -> None:
            for job in batch:
                job.step, job.steps = step, total
            if all(not j.active for j in batch):
                raise _Interrupted

        t0 = time.perf_counter()
        try:
            result = self.pipe.generate(
                prompts, negatives, seed=seeds, num_images=1, steps=s.steps, guidance=s.guidance,
                sampler=s.sampler, schedule=s.schedule, eta=s.eta, width=s.width, height=s.height,
                init_image=first.init_image, mask=first.mask, strength=first.strength, callback=on_step)
        except _Interrupted:
            return  # every job was answered by cancel()
        except Exception as e:  # noqa: BLE001 - a failed generation must answer its jobs, not kill the worker
            message = f"generation failed: {type(e).__name__}: {e}"
            for job in batch:
                self._loop.call_soon_threadsafe(self._finish, job, FAILED, message)
            return
        outputs = [Output(encode_png(im), sd, im.info.get("parameters", ""))
                   for im, sd in zip(result.images, result.seeds, strict=True)]
        # Exponential moving average of the cost per image, for Retry-After.
        per_image = (time.perf_counter() - t0) / len(outputs)
        self.seconds_per_image = 0.7 * self.seconds_per_image + 0.3 * per_image
        self.batches += 1
        k = 0
        for job in batch:
            job.outputs, job.warnings = outputs[k: k + job.spec.n], list(result.warnings)
            k += job.spec.n
            self._loop.call_soon_threadsafe(self._finish, job, DONE)

    # ------------------------------------------------------------------ for /progress

    def current(self) -> Job | None:
        return next((j for j in self.running if j.active), None)
