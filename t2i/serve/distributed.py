"""The job queue on Redis, for `t2i serve --broker URL` (the HTTP front) and `t2i worker` (the model).

Delivery is dramatiq's (its Redis broker): one message per job on one queue per model, taken by
the workers that hold that model. A worker moves a message it takes into its own "acks" set and
acknowledges it only once the job's answer is written; a worker that dies (SIGKILL, power loss)
stops sending heartbeats, and after `heartbeat_timeout` the next worker polling that queue puts
its unacknowledged messages back (dramatiq's queue maintenance, here on every poll). So a job
accepted by the front is finished by some worker as long as one holding its model runs.

What dramatiq does not model lives here, in plain Redis keys beside its own (`KEYS`): the job
record (status, progress, answer: what `GET /v1/jobs/{id}` shows, from any front, also after a
front restart), the waiting set that bounds the queue (429 beyond `max_queue`, as in one
process), the models the workers hold (their name, family, defaults and capabilities: the front
checks requests against them without loading the model) and the workers' liveness. Every status
change is one Lua script, so an answer is written once: a job cancelled by the front stays
cancelled, and of two workers that ran the same job (one presumed dead that was only slow) the
first to finish answers and the other's result is dropped.

    front:  RedisJobQueue(url, model).submit(request)  -> record + waiting set + dramatiq message
    worker: t2i.serve.worker: message -> claim -> local JobQueue (batching, LoRAs) -> finish -> ack
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

from PIL import Image

from t2i.diffusion.paint_with_words import as_regions, regions_to_json
from t2i.layout.spec import Layout
from t2i.serve.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SHUTTING_DOWN, DuplicateJob, Job, Output, QueueFull
from t2i.serve.networks import prompt_lora_files
from t2i.systems.base import Capabilities, GenerationDefaults, GenerationRequest

ACTOR = "t2i_generate"  # the one dramatiq actor: its argument is a job id
PREFIX = "t2i:"
KEYS = {
    "job": PREFIX + "job:{id}",  # hash: the job record (REQUEST_FIELDS below, status, progress, answer)
    "jobs": PREFIX + "jobs",  # zset id -> created: every job the fronts list
    "waiting": PREFIX + "waiting:{model}",  # zset id -> created: accepted, not started (the queue bound)
    "running": PREFIX + "running",  # set of ids being run by some worker
    "models": PREFIX + "models",  # hash name -> JSON card (ModelCard)
    "workers": PREFIX + "workers",  # zset worker id -> last heartbeat (unix seconds)
    "worker": PREFIX + "worker:{id}",  # JSON: models, pid, host, seconds per image
}
RESULT_TTL = 3600  # seconds a finished job's record (and images) stays fetchable
WORKER_TTL = 30  # seconds after its last heartbeat a worker is no longer listed
POLL = 0.05  # seconds between the front's checks of the jobs its open requests wait for
REDIS_TIMEOUT = 5.0  # seconds a Redis call may take before it raises (a broker outage is an error, not a hang)
RESEND_AFTER = 5.0  # seconds after which a front re-sends a waiting job whose message was never sent
RESEND_EVERY = 1.0  # seconds between the front's looks for such jobs
MAX_ATTEMPTS = 3  # claims of one job (each worker died running it) before it is answered `failed`

# One status change each, atomic. Claim: a worker starts a queued job, or takes over a running one
# (redelivered: its first worker died); -1 once it has been claimed ARGV[4] times (a job that kills
# every worker that runs it: its worker answers it `failed` instead of running it again). The -1 leaves
# `attempts` alone, so a duplicate message (two fronts re-sending one job) read before that answer is
# written gets the same -1 and the count stays the number of real starts.
# Finish: only an active job gets an answer. Submit also forgets listed ids older than RESULT_TTL
# (their records have expired), so the listing does not grow forever.
CLAIM = """
local s = redis.call('hget', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return 0 end
if tonumber(redis.call('hget', KEYS[1], 'attempts') or '0') >= tonumber(ARGV[4]) then return -1 end
redis.call('hincrby', KEYS[1], 'attempts', 1)
redis.call('hset', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'started', ARGV[3], 'step', 0)
redis.call('zrem', KEYS[2], ARGV[1])
redis.call('sadd', KEYS[3], ARGV[1])
return 1
"""
FINISH = """
local s = redis.call('hget', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return 0 end
redis.call('hdel', KEYS[1], 'init_image', 'mask')
for i = 3, #ARGV, 2 do redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('zrem', KEYS[2], ARGV[1])
redis.call('srem', KEYS[3], ARGV[1])
redis.call('expire', KEYS[1], ARGV[2])
return 1
"""
SUBMIT = f"""
redis.call('zremrangebyscore', KEYS[2], '-inf', tonumber(ARGV[3]) - {RESULT_TTL})
if redis.call('exists', KEYS[1]) == 1 then return -2 end
if redis.call('zcard', KEYS[3]) >= tonumber(ARGV[1]) then return -1 end
for i = 4, #ARGV, 2 do redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('zadd', KEYS[2], ARGV[3], ARGV[2])
redis.call('zadd', KEYS[3], ARGV[3], ARGV[2])
return 1
"""


def key(name: str, **kw: str) -> str:
    return KEYS[name].format(**kw)


def queue_name(model: str) -> str:
    """The dramatiq queue of a model: its name made safe for queue names, plus a hash so that two
    names that differ only in unsafe characters get different queues."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", model)[:40]
    return f"t2i.{slug}.{hashlib.sha1(model.encode()).hexdigest()[:8]}"


def make_broker(url: str, heartbeat_timeout: float = 15.0, maintenance: bool = True):
    """dramatiq's Redis broker with no middleware (no retries: a job's failure is its answer; no
    time limit: a generation takes what it takes) and queue maintenance on every poll, so a dead
    worker's messages come back `heartbeat_timeout` seconds after its last heartbeat.

    maintenance=False (the fronts): no sweeping at all. Maintenance requeues the messages of workers
    silent for longer than *this* broker's heartbeat_timeout, so only the workers, which all run with
    the deployment's --heartbeat-timeout, may do it; a front's would use the default."""
    from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker

    return RedisBroker(url=url, middleware=[], heartbeat_timeout=int(heartbeat_timeout * 1000),
                       maintenance_chance=MAINTENANCE_SCALE if maintenance else 0, namespace="t2i-dramatiq",
                       socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)


def send_job(broker, model: str, job_id: str) -> None:
    """The dramatiq message that has a worker holding `model` run the job `job_id`."""
    from dramatiq import Message

    broker.enqueue(Message(queue_name=queue_name(model), actor_name=ACTOR, args=(job_id,), kwargs={}, options={}))


def connect(url: str):
    """A client whose calls raise redis.TimeoutError after REDIS_TIMEOUT instead of hanging on a
    broker that is away (the front answers 503, the worker retries)."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)


# ---------------------------------------------------------------------- what crosses the wire

REQUEST_FIELDS = ("prompt", "negative_prompt", "seed", "num_images", "steps", "guidance", "guidance_rescale",
                  "sampler", "schedule", "eta", "width", "height", "strength", "region_weight", "temperature",
                  "top_k", "top_p")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def request_fields(r: GenerationRequest) -> dict[str, bytes | str]:
    """A resolved request as job-record fields: its settings as JSON, its images as PNG bytes."""
    out: dict[str, bytes | str] = {"request": json.dumps({
        **{k: getattr(r, k) for k in REQUEST_FIELDS},
        "layout": None if r.layout is None else r.layout.to_json(),  # type: ignore[union-attr]
        "regions": None if not r.regions else regions_to_json(as_regions(r.regions, r.width or 0, r.height or 0))})}
    if r.init_image is not None:
        out["init_image"] = png_bytes(r.init_image)
    if r.mask is not None:
        out["mask"] = png_bytes(r.mask)
    return out


def read_request(record: dict[bytes, bytes]) -> GenerationRequest:
    """The request of a job record (request_fields' inverse; images only while the job is active)."""
    data = json.loads(record[b"request"])
    layout, regions = data.pop("layout"), data.pop("regions", None)
    width, height = data.get("width") or 0, data.get("height") or 0
    images = {name: Image.open(io.BytesIO(record[name.encode()])) for name in ("init_image", "mask")
              if name.encode() in record}
    return GenerationRequest(**data, **images,
                             layout=None if layout is None else Layout.from_json(layout, width, height),
                             regions=as_regions(regions, width, height))


class RemoteJob(Job):
    """A job read from Redis; `started` is a unix time (the worker's), not this process's clock."""

    @property
    def eta_seconds(self) -> float | None:
        if self.status != RUNNING or not self.step or self.started is None:
            return None
        return max(0.0, time.time() - self.started) / self.step * (self.steps - self.step)


def read_job(job_id: str, record: dict[bytes, bytes]) -> RemoteJob:
    text = {k.decode(): v.decode() for k, v in record.items() if k not in (b"init_image", b"mask")}
    outputs = [Output(base64.b64decode(o["png"]), o["seed"], o["parameters"])
               for o in json.loads(text.get("outputs", "[]"))]
    started = text.get("started")
    return RemoteJob(job_id, read_request(record), created=float(text["created"]), status=text["status"],
                     step=int(text.get("step", 0)), steps=int(text.get("steps", 0)),
                     started=float(started) if started else None,
                     finished=float(text["finished"]) if text.get("finished") else None, outputs=outputs,
                     warnings=json.loads(text.get("warnings", "[]")), error=text.get("error") or None,
                     interrupted=text.get("interrupted") == "1")


def answer_fields(status: str, error: str | None, outputs: list[Output], warnings: list[str]) -> dict[str, str]:
    return {"status": status, "error": error or "", "finished": repr(time.time()), "warnings": json.dumps(warnings),
            "outputs": json.dumps([{"png": base64.b64encode(o.png).decode(), "seed": o.seed,
                                    "parameters": o.parameters} for o in outputs])}


def finish(db, job_id: str, model: str, fields_: dict[str, str], ttl: int = RESULT_TTL) -> bool:
    """Answer an active job (False: it had an answer already, e.g. cancelled, or finished by a worker
    that was presumed dead)."""
    args = [job_id, ttl, *[x for kv in fields_.items() for x in kv]]
    return bool(db.eval(FINISH, 3, key("job", id=job_id), key("waiting", model=model), key("running"), *args))


@dataclass(frozen=True)
class ModelCard:
    """What a worker tells the fronts about a model it holds: enough to check requests against it
    (t2i.serve.schemas.Resolver) without loading it."""

    name: str
    family: str
    defaults: GenerationDefaults
    capabilities: Capabilities
    max_objects: int | None = None

    @classmethod
    def of(cls, pipe) -> ModelCard:
        return cls(pipe.name, pipe.family, pipe.defaults, pipe.capabilities, getattr(pipe, "max_objects", None))

    def to_json(self) -> str:
        caps = {f.name: getattr(self.capabilities, f.name) for f in fields(Capabilities)}
        caps["options"], caps["required"] = sorted(caps["options"]), sorted(caps["required"])
        return json.dumps({"name": self.name, "family": self.family, "defaults": asdict(self.defaults),
                           "capabilities": caps, "max_objects": self.max_objects})

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        d = json.loads(text)
        c = d["capabilities"]
        caps = Capabilities(frozenset(c["options"]), tuple(c["samplers"]), tuple(c["schedules"]), c["size_multiple"],
                            tuple(c["native_size"]), frozenset(c.get("required", ())), c.get("max_steps"))
        return cls(d["name"], d["family"], GenerationDefaults(**d["defaults"]), caps, d["max_objects"])


class RemotePipeline:
    """A model held by the workers, as the front sees it: a Pipeline for checking requests (name,
    family, defaults, capabilities); it never runs (the workers do)."""

    preview_decoder = None

    def __init__(self, card: ModelCard) -> None:
        self.name, self.family, self.defaults = card.name, card.family, card.defaults
        self.capabilities, self.max_objects = card.capabilities, card.max_objects

    def run(self, request: GenerationRequest):
        raise RuntimeError(f"{self.name} runs on the workers; the front only queues its jobs")


def wait_for_model(url: str, model: str | None, timeout: float = 600.0, say=print) -> RemotePipeline:
    """The card of `model` (None: the only model any worker advertises), waiting for a worker to
    advertise it; ValueError after `timeout` seconds, or when several models are held and none named."""
    db = connect(url)
    deadline, told = time.monotonic() + timeout, False
    while True:
        cards = {k.decode(): v for k, v in db.hgetall(key("models")).items()}
        if model is None and len(cards) > 1:
            raise ValueError(f"the workers hold several models ({', '.join(sorted(cards))}): name one with --model")
        name = model if model is not None else next(iter(cards), None)
        if name in cards:
            return RemotePipeline(ModelCard.from_json(cards[name]))
        if time.monotonic() > deadline:
            raise ValueError(f"no worker advertised {model or 'a model'} on {url} within {timeout:g} s")
        if not told:
            say(f"t2i serve: waiting for a worker holding {model or 'a model'} (t2i worker --broker {url} --model ...)")
            told = True
        time.sleep(0.5)


# ---------------------------------------------------------------------- the front's queue


class RemoteJobs:
    """`JobQueue.jobs` for the routes: jobs read from Redis by id, and the listing."""

    def __init__(self, db, listed: int) -> None:
        self.db, self.listed = db, listed

    def get(self, job_id: str) -> RemoteJob | None:
        record = self.db.hgetall(key("job", id=job_id))
        return read_job(job_id, record) if record else None

    def __getitem__(self, job_id: str) -> RemoteJob:
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def __contains__(self, job_id: str) -> bool:
        return bool(self.db.exists(key("job", id=job_id)))

    def values(self) -> Iterator[RemoteJob]:
        """The latest `listed` jobs, oldest first; ids whose record expired are forgotten."""
        ids = [i.decode() for i in self.db.zrange(key("jobs"), -self.listed, -1)]
        pipe = self.db.pipeline()
        for i in ids:
            pipe.hgetall(key("job", id=i))
        gone = []
        for i, record in zip(ids, pipe.execute(), strict=True):
            if record:
                yield read_job(i, record)
            else:
                gone.append(i)
        if gone:
            self.db.zrem(key("jobs"), *gone)


class RedisJobQueue:
    """The front's job queue: what the routes call on `JobQueue` (submit, cancel, interrupt, jobs,
    position, current, pending, running), with the jobs in Redis and the model on the workers.

    The front holds no job: a restarted front (or another one) answers for every job by id. Its
    open requests wait on futures that a poller resolves when their jobs end; on shutdown they are
    answered 503 while their jobs go on (fetch them by id)."""

    def __init__(self, url: str, model: str, max_queue: int = 16, max_batch: int = 4, listed: int = 64,
                 lora_dir: str | None = None) -> None:
        self.url, self.model, self.max_queue, self.max_batch = url, model, max_queue, max_batch
        self.lora_dir = lora_dir  # the front checks <lora:...> tags as in one process; the workers merge them
        self.db = connect(url)
        self.broker = make_broker(url, maintenance=False)
        self.queue = queue_name(model)
        self.broker.declare_queue(self.queue)
        self.jobs = RemoteJobs(self.db, listed)
        self.sample = None  # live previews stay on the worker
        self.closing = False
        self._waiting: dict[str, RemoteJob] = {}  # jobs whose requests are open here
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    def close(self) -> None:
        """Open requests are answered 503 (their jobs go on; the message says where to fetch them)."""
        self.closing = True
        for job in self._waiting.values():
            job.status, job.error = FAILED, f"{SHUTTING_DOWN}; the job goes on: GET /v1/jobs/{job.id}"
            if job.future is not None and not job.future.done():
                job.future.set_result(job)
        self._waiting.clear()

    async def stop(self) -> None:
        self.close()
        if self._task is not None:
            self._task.cancel()
        self.broker.close()

    async def _poll(self) -> None:
        """Resolve the futures of jobs that ended. Redis is read off the event loop (a broker that
        is away blocks no route); any failure (the broker restarting, a malformed record) is logged
        and the next tick tries again, so the poller never dies and leaves requests unanswered."""
        last_resend = 0.0
        while True:
            await asyncio.sleep(POLL)
            try:
                if time.monotonic() - last_resend > RESEND_EVERY:
                    last_resend = time.monotonic()
                    await asyncio.to_thread(self.resend_unsent)
                ids = list(self._waiting)
                if ids:
                    self._resolve(await asyncio.to_thread(self._ended, ids))
            except Exception as e:  # noqa: BLE001 - see the docstring
                print(f"t2i serve: polling the broker failed: {type(e).__name__}: {e}", flush=True)
                await asyncio.sleep(0.5)

    def _ended(self, ids: list[str]) -> dict[str, RemoteJob | str]:
        """The jobs among `ids` that are no longer active, read afresh, or why they cannot be read."""
        pipe = self.db.pipeline()
        for i in ids:
            pipe.hget(key("job", id=i), "status")
        out: dict[str, RemoteJob | str] = {}
        for i, status in zip(ids, pipe.execute(), strict=True):
            if status is not None and status.decode() in (QUEUED, RUNNING):
                continue
            try:
                out[i] = self.jobs.get(i) or "the job's record expired"  # an answer all the same
            except (ValueError, KeyError, TypeError) as e:  # a malformed record: answer it, not every tick
                out[i] = f"the job's record is unreadable: {type(e).__name__}: {e}"
        return out

    def _resolve(self, ended: dict[str, RemoteJob | str]) -> None:
        for i, fresh in ended.items():
            job = self._waiting.pop(i, None)
            if job is None:  # answered by close() meanwhile
                continue
            if isinstance(fresh, str):
                job.status, job.error = FAILED, fresh
            else:  # in place: the route holds this object
                for f in ("status", "step", "steps", "started", "finished", "outputs", "warnings", "error"):
                    setattr(job, f, getattr(fresh, f))
            if job.future is not None and not job.future.done():
                job.future.set_result(job)

    def resend_unsent(self, age: float = RESEND_AFTER) -> list[str]:
        """Send the message of every job of this model waiting for over `age` seconds whose record
        lacks `enqueued` (its front died, or Redis dropped, between SUBMIT and the enqueue): without
        this it would hold a place in the queue bound forever. Harmless if the message did go out
        (CLAIM runs a job once). Returns the ids sent."""
        ids = [i.decode() for i in self.db.zrangebyscore(key("waiting", model=self.model), "-inf", time.time() - age)]
        if not ids:
            return []
        pipe = self.db.pipeline()
        for i in ids:
            pipe.hget(key("job", id=i), "enqueued")
        unsent = [i for i, sent in zip(ids, pipe.execute(), strict=True) if sent is None]
        for i in unsent:
            self._enqueue(i)
        return unsent

    def _enqueue(self, job_id: str) -> None:
        send_job(self.broker, self.model, job_id)
        self.db.hset(key("job", id=job_id), "enqueued", 1)

    # ------------------------------------------------------------------ what the routes call

    def submit(self, request: GenerationRequest, job_id: str | None = None) -> RemoteJob:
        prompt_lora_files(request.prompt, self.lora_dir)  # FieldError (422) naming a tag without a file
        if self.closing:
            raise QueueFull(1)
        job_id = job_id or secrets.token_hex(8)
        created = time.time()
        record = {"model": self.model, "status": QUEUED, "created": repr(created), "step": 0,
                  "steps": request.steps or 0, **request_fields(request)}
        args = [self.max_queue, job_id, repr(created), *[x for kv in record.items() for x in kv]]
        accepted = self.db.eval(SUBMIT, 3, key("job", id=job_id), key("jobs"), key("waiting", model=self.model),
                                *args)
        if accepted == -2:
            raise DuplicateJob(f"job id {job_id!r} is already taken; leave X-Job-Id out to get a fresh one")
        if accepted == -1:
            raise QueueFull(self.retry_after())
        try:
            self._enqueue(job_id)
        except Exception:
            self.db.delete(key("job", id=job_id))
            self.db.zrem(key("waiting", model=self.model), job_id)
            raise
        job = RemoteJob(job_id, request, created=created, steps=request.steps or 0)
        job.future = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = job
        return job

    def cancel(self, job_id: str) -> bool:
        """Answer a queued or running job `cancelled` now; the worker running it stops its batch
        when it next looks (within its report interval). False if not active."""
        model = self.db.hget(key("job", id=job_id), "model")
        if model is None:
            return False
        return finish(self.db, job_id, model.decode(), answer_fields(CANCELLED, "cancelled", [], []))

    def interrupt(self) -> list[str]:
        """A1111's /interrupt: every running job of this model stops and answers with its image as it
        stood (the worker decodes it)."""
        ids = []
        for raw in self.db.smembers(key("running")):
            i = raw.decode()
            if self.db.hget(key("job", id=i), "model") == self.model.encode():
                self.db.hset(key("job", id=i), "interrupted", "1")
                ids.append(i)
        return ids

    def position(self, job: Job) -> int:
        rank = self.db.zrank(key("waiting", model=self.model), job.id)
        return 0 if rank is None else rank + 1

    def retry_after(self) -> int:
        waiting = self.db.zcard(key("waiting", model=self.model))
        workers = max(1, len(self.workers()))
        per_image = max([w.get("seconds_per_image", 1.0) for w in self.workers()] or [1.0])
        return max(1, round(waiting * per_image / (max(1, self.max_batch) * workers) + 0.5))

    def workers(self) -> list[dict]:
        """The live workers holding this model (their advertisement)."""
        cutoff = time.time() - WORKER_TTL
        ids = [i.decode() for i in self.db.zrangebyscore(key("workers"), cutoff, "+inf")]
        out = []
        for raw in self.db.mget([key("worker", id=i) for i in ids]) if ids else []:
            if raw is not None and self.model in json.loads(raw)["models"]:
                out.append(json.loads(raw))
        return out

    @property
    def pending(self) -> list[str]:
        return [i.decode() for i in self.db.zrange(key("waiting", model=self.model), 0, -1)]

    @property
    def running(self) -> list[RemoteJob]:
        jobs = (self.jobs.get(i.decode()) for i in self.db.smembers(key("running")))
        return [j for j in jobs if j is not None and j.active and self._model_of(j.id) == self.model]

    def _model_of(self, job_id: str) -> str | None:
        m = self.db.hget(key("job", id=job_id), "model")
        return None if m is None else m.decode()

    def current(self) -> RemoteJob | None:
        return next(iter(self.running), None)
