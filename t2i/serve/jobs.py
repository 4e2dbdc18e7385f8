"""The job queue: one worker thread runs the model, a bounded queue in front of it, compatible jobs
merged into one batch.

Threads: the asyncio event loop owns the queue (`submit`, `cancel` and the dispatcher run on it, so
the queue needs no lock); the single worker thread only runs `pipe.run` for one batch at a time,
because torch on a few CPU cores gains nothing from two generations at once. The worker writes
progress fields on the jobs it runs (plain attribute stores), reads their status through the
request's `should_stop` (polled between network blocks, so a cancelled batch stops within a
fraction of a step) and answers through the loop with `call_soon_threadsafe`.

LoRAs named by a prompt's `<lora:name:w>` tags (resolved to files at submit time, `Job.loras`) are
merged by the worker around its batch's run and unmerged right after; only jobs with the same LoRA
set share a batch, so no job ever runs on another's LoRAs.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch
from PIL import Image, PngImagePlugin

from t2i.adapters.lora import apply_loras, keep_tags, prompt_loras
from t2i.imageio import format_parameters
from t2i.layout.spec import Layout
from t2i.serve.networks import LoraSet, prompt_lora_files
from t2i.systems.base import GenerationRequest, GenerationResult, Interrupted, Pipeline

QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"
SHUTTING_DOWN = "the server is shutting down"
# Pipelines report their current estimate through `GenerationRequest.on_sample` where base.py has it.


@dataclass
class Output:
    """One generated image: PNG bytes (with the A1111 `parameters` chunk), its seed and parameters."""

    png: bytes
    seed: int
    parameters: str


@dataclass
class Job:
    """One accepted request. `request` is resolved (a concrete seed, the model's defaults filled in,
    inputs already at the job's size); it loses its init image and mask once the job ends."""

    id: str
    request: GenerationRequest
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
    interrupted: bool = False  # A1111's /interrupt: stop now and answer with the image as it stood
    loras: LoraSet = ()  # the files its prompt's <lora:...> tags name, merged for its batch only

    @property
    def n(self) -> int:
        return self.request.num_images

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
    """A client-chosen job id is already taken (by any job the server still knows)."""


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with the image's A1111 `parameters` text chunk; deterministic for equal pixels."""
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def batch_key(r: GenerationRequest) -> GenerationRequest | None:
    """Jobs with equal keys run as one call (one prompt, negative prompt and seed per image); None:
    the job runs alone (its inputs are its own)."""
    if r.init_image is not None or r.mask is not None or r.refiner is not None:
        return None
    return replace(r, prompt="", negative_prompt="", seed=0, num_images=1)


def sketch(sample: torch.Tensor, size: tuple[int, int]) -> Image.Image | None:
    """A cheap picture of the first image of a (N, C, h, w) sample for live previews: its first three
    channels (one as grey), each stretched to 0..255 and scaled to `size` (nearest). For pixel models
    this is the image; for latent models a sketch of the layout, at no decoder cost. None for
    samples that are not images (token codes)."""
    if sample.ndim != 4:
        return None
    x = sample[0, :3].detach().float()  # (<=3, h, w)
    x = x if x.shape[0] == 3 else x[:1].expand(3, -1, -1)
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    rgb = ((x - lo) / (hi - lo).clamp_min(1e-6) * 255).round().to(torch.uint8)  # (3, h, w)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy()).resize(size, Image.NEAREST)


class JobQueue:
    """Accepts jobs, runs them in batches on one worker thread, answers every accepted job.

    Args:
        pipe: the served Pipeline; each batch is one `pipe.run(GenerationRequest)`.
        max_queue: waiting jobs allowed (the running batch is not counted); more -> QueueFull.
        max_batch: images per call when merging compatible jobs (a bigger job runs alone).
        batch_wait: seconds to wait for companions after the first job of a batch (0: none).
        retain: finished jobs kept for lookups by id.
        lora_dir: where a prompt's `<lora:name:w>` tags find their files (None: tags are refused).
    """

    def __init__(self, pipe: Pipeline, max_queue: int = 16, max_batch: int = 4, batch_wait: float = 0.0,
                 retain: int = 64, lora_dir: str | None = None) -> None:
        self.pipe, self.lora_dir = pipe, lora_dir
        self.max_queue, self.max_batch, self.batch_wait, self.retain = max_queue, max_batch, batch_wait, retain
        self.jobs: OrderedDict[str, Job] = OrderedDict()  # every active job and the last `retain` finished
        self.pending: deque[Job] = deque()
        self.running: list[Job] = []
        self.sample: torch.Tensor | None = None  # the running batch's current estimate (N, ...), if reported
        self.seconds_per_image = 1.0  # running estimate, for Retry-After and the queue ETA
        self.batches = 0  # model calls made (the benchmark and tests read it)
        self.closing = False  # set by close(): the worker stops and nothing new is accepted
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2i-model")

    # ------------------------------------------------------------------ lifecycle (event loop)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._dispatch())

    def close(self) -> None:
        """Shutdown, first step: answer every job at once and stop the running batch.

        Jobs accepted but not started fail with 503 ("not started: send it again"): this
        single-process server keeps no queue across restarts. The running batch stops within a
        fraction of a step (its `should_stop` reads `closing`) and its jobs fail with 503 too."""
        self.closing = True
        while self.pending:
            self._finish(self.pending.popleft(), FAILED, f"{SHUTTING_DOWN}; the job was not started: send it again")
        for job in self.running:
            self._finish(job, FAILED, f"{SHUTTING_DOWN}; the job was stopped: send it again")

    async def stop(self) -> None:
        """close(), then stop the dispatcher; the worker thread ends with its (stopping) batch."""
        self.close()
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ API (event loop)

    def submit(self, request: GenerationRequest, job_id: str | None = None) -> Job:
        """Queue a resolved request. A client-chosen `job_id` must be new: ids the server knows
        (active or finished) are never replaced, so one client cannot take over another's job.
        The prompt's `<lora:...>` tags are looked up first (FieldError naming a tag without a file)."""
        loras = prompt_lora_files(request.prompt, self.lora_dir)
        if self.closing:
            raise QueueFull(1)
        if len(self.pending) >= self.max_queue:
            raise QueueFull(self.retry_after())
        if job_id is not None and job_id in self.jobs:
            raise DuplicateJob(f"job id {job_id!r} is already taken; leave X-Job-Id out to get a fresh one")
        while job_id is None or job_id in self.jobs:
            job_id = secrets.token_hex(8)
        job = Job(job_id, request, loras=loras)
        job.future = asyncio.get_running_loop().create_future()
        self.jobs[job.id] = job
        self.pending.append(job)
        assert self._wake is not None, "JobQueue.start() was not called"
        self._wake.set()
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; its request is answered at once and its images dropped
        (the batch stops when none of its jobs is left). False if not active."""
        job = self.jobs.get(job_id)
        if job is None or not job.active:
            return False
        if job.status == QUEUED:
            self.pending.remove(job)
        self._finish(job, CANCELLED, "cancelled")
        return True

    def interrupt(self) -> list[str]:
        """A1111's /interrupt: stop the running batch now; its jobs are answered with the images as
        they stood (when the pipeline reports its current estimate; else they end cancelled).
        Returns the interrupted job ids."""
        jobs = [j for j in self.running if j.active]
        for job in jobs:
            job.interrupted = True
        return [j.id for j in jobs]

    def position(self, job: Job) -> int:
        """0 for a running job, k for the k-th waiting one."""
        return 0 if job.status != QUEUED else list(self.pending).index(job) + 1

    def retry_after(self) -> int:
        waiting = sum(j.n for j in self.pending) + sum(j.n for j in self.running)
        return max(1, round(waiting * self.seconds_per_image / max(1, self.max_batch) + 0.5))

    def current(self) -> Job | None:
        """The first running job still active (for /progress)."""
        return next((j for j in self.running if j.active), None)

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
            self.running, self.sample = batch, None
            for job in batch:
                job.status, job.steps, job.started = RUNNING, job.request.steps or 0, time.perf_counter()
            try:
                await self._loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as e:  # anything the worker did not turn into job failures
                for job in batch:
                    self._finish(job, FAILED, f"generation failed: {e}")
            self.running, self.sample = [], None
            self._prune()

    def _take_batch(self) -> list[Job]:
        """The oldest waiting job plus later compatible ones (the same settings and LoRA set), up to
        max_batch images in all."""
        first = self.pending.popleft()
        key = batch_key(first.request)
        batch, images = [first], first.n
        if key is None:
            return batch
        for job in list(self.pending):
            if images + job.n <= self.max_batch and batch_key(job.request) == key and job.loras == first.loras:
                self.pending.remove(job)
                batch.append(job)
                images += job.n
        return batch

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        if not job.active:  # already answered (e.g. cancelled while its batch ran)
            return
        job.status, job.error, job.finished = status, error, time.time()
        # A finished job keeps its answer, not its inputs.
        job.request = replace(job.request, init_image=None, mask=None)
        if job.future is not None and not job.future.done():
            job.future.set_result(job)

    def _prune(self) -> None:
        done = [k for k, j in self.jobs.items() if not j.active]
        for k in done[: max(0, len(done) - self.retain)]:
            del self.jobs[k]

    # ------------------------------------------------------------------ worker thread

    def _answer(self, job: Job, status: str, error: str | None = None) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._finish, job, status, error)

    def _run_batch(self, batch: list[Job]) -> None:
        """Runs on the worker thread: one `pipe.run` for the whole batch, then PNG encoding."""
        request = self._batch_request(batch)
        t0 = time.perf_counter()
        try:
            result = self._run_model(request, batch[0].loras)
        except Interrupted:
            self._answer_interrupted(batch, request)
            return
        except Exception as e:  # noqa: BLE001 - a failed generation must answer its jobs, not kill the worker
            for job in batch:
                self._answer(job, FAILED, f"generation failed: {type(e).__name__}: {e}")
            return
        outputs = [Output(encode_png(im), sd, im.info.get("parameters", ""))
                   for im, sd in zip(result.images, result.seeds, strict=True)]
        # Exponential moving average of the cost per image, for Retry-After.
        per_image = (time.perf_counter() - t0) / len(outputs)
        self.seconds_per_image = 0.7 * self.seconds_per_image + 0.3 * per_image
        self.batches += 1
        self._deliver(batch, outputs, list(result.warnings))

    def _run_model(self, request: GenerationRequest, loras: LoraSet) -> GenerationResult:
        """`pipe.run(request)` with the batch's LoRAs merged for this run only (unmerged bit-exactly on
        leaving, also when the run fails or stops). The networks see the prompts without their tags;
        each image's `parameters` keep its prompt as written, tags included, as A1111 writes them."""
        if not loras:
            return self.pipe.run(request)
        prompts = [prompt_loras(p)[0] for p in request.prompt]
        with apply_loras(self.pipe, loras):
            result = self.pipe.run(replace(request, prompt=prompts))
        return keep_tags(result, request.prompt, prompts)

    def _batch_request(self, batch: list[Job]) -> GenerationRequest:
        """The batch as one request: one prompt, negative prompt and seed per image (image i of a job
        with seed s has seed s + i, as alone), progress written on the jobs, stopping when no job of
        the batch still wants its images (cancelled, interrupted, or the server closing)."""
        prompts = [j.request.prompt for j in batch for _ in range(j.n)]
        negatives = [j.request.negative_prompt for j in batch for _ in range(j.n)]
        seeds = [j.request.seed + i for j in batch for i in range(j.n)]

        def on_step(step: int, total: int) -> None:
            for job in batch:
                job.step, job.steps = step, total

        def should_stop() -> bool:
            return self.closing or all(not j.active or j.interrupted for j in batch)

        return replace(batch[0].request, prompt=prompts, negative_prompt=negatives, seed=seeds, num_images=1,
                       callback=on_step, should_stop=should_stop, on_sample=self._keep_sample)

    def _keep_sample(self, step: int, total: int, sample: torch.Tensor) -> None:
        self.sample = sample

    def _deliver(self, batch: list[Job], outputs: list[Output], warnings: list[str]) -> None:
        """Hand each job its images (jobs answered meanwhile, e.g. cancelled, drop theirs)."""
        k = 0
        for job in batch:
            if job.active:
                job.outputs, job.warnings = outputs[k: k + job.n], warnings
                self._answer(job, DONE)
            k += job.n

    def _answer_interrupted(self, batch: list[Job], request: GenerationRequest) -> None:
        """A stopped batch: cancelled jobs were answered already; interrupted ones get the images as
        they stood (the last reported estimate, decoded), or end cancelled when there is none."""
        waiting = [j for j in batch if j.active and j.interrupted]
        decode = getattr(self.pipe, "decode", None)
        sample = self.sample
        if not waiting:
            return
        if sample is None or decode is None:
            for job in waiting:
                self._answer(job, CANCELLED, "interrupted before the model reported an image")
            return
        step = max(j.step for j in batch)
        images = decode(sample)
        outputs = []
        for im, prompt, negative, seed in zip(images, request.prompt, request.negative_prompt, request.seed,
                                              strict=True):
            layout = request.layout
            if layout is None and hasattr(self.pipe, "planned_layout"):  # the layout it was drawing
                layout = self.pipe.planned_layout(prompt, seed)
            im.info["parameters"] = interrupted_parameters(request, prompt, negative, seed, self.pipe.name, layout)
            outputs.append(Output(encode_png(im), seed, im.info["parameters"]))
        self._deliver(batch, outputs, [f"interrupted after step {step} of {batch[0].steps}"])


def interrupted_parameters(r: GenerationRequest, prompt: str, negative: str, seed: int, model: str,
                           layout: Layout | None = None) -> str:
    """A1111 `parameters` of an image taken from an interrupted run (its settings as asked; `layout`:
    the one it was drawn from, given or planned)."""
    return format_parameters(prompt, negative, steps=r.steps, sampler=r.sampler, schedule=r.schedule,
                             guidance=r.guidance, seed=seed, width=r.width, height=r.height, model=model,
                             layout=None if layout is None else layout.to_json(), interrupted="true")
