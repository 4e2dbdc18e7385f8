"""`t2i worker`: runs the jobs that `t2i serve --broker URL` fronts queue, for the models it holds.

    t2i worker --broker redis://host:6379/0 --model PATH [--model PATH2 ...]

One process per machine (or per core group): it loads its models, advertises them (name, family,
defaults, capabilities: what the fronts check requests against) and takes jobs from each model's
dramatiq queue. Each model has the single-process server's `JobQueue` (t2i.serve.jobs): one model
thread, compatible jobs merged into one batch, LoRAs merged around their batch. dramatiq's worker
threads (one per image of a batch) each take one message, hand its job to that queue and wait; so
a worker holds at most `max_batch` messages per model, and the others stay in Redis for the other
workers. A message is acknowledged only once its job's answer is written (t2i.serve.distributed):
a worker killed mid-job leaves its messages unacknowledged and another worker runs them after
`--heartbeat-timeout`.

A reporter thread writes each running job's progress to its record every `report_interval`
seconds, and reads back what the fronts decided: a job answered meanwhile (cancelled) is cancelled
here too (its batch stops within a fraction of a step), an interrupted one answers with its image
as it stood. SIGTERM / Ctrl-C: no new job is taken, the running ones finish, then the process exits; those still
running after `--stop-timeout` are stopped and handed back to the queue (another worker runs them).
Redis calls a job cannot do without (claim, answer) are retried while Redis is away; a job claimed
MAX_ATTEMPTS times (each time its worker died: a job that kills workers) is answered `failed`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import threading
import time

from t2i.serve.distributed import (
    ACTOR,
    CLAIM,
    MAX_ATTEMPTS,
    WORKER_TTL,
    ModelCard,
    answer_fields,
    connect,
    finish,
    key,
    make_broker,
    queue_name,
    read_request,
    send_job,
)
from t2i.serve.jobs import FAILED, SHUTTING_DOWN, Job, JobQueue
from t2i.systems.base import Pipeline

RETRY = 0.5  # seconds between tries of a Redis call that `handle` cannot do without


class Worker:
    """Takes the jobs of `pipes`' models from the broker at `url` and runs them (see the module doc).

    Args:
        heartbeat_timeout: seconds without a heartbeat after which this worker's unacknowledged
            jobs go back to their queues (set the same on every worker of a deployment).
        report_interval: seconds between progress writes and looks at cancellations.
    """

    def __init__(self, url: str, pipes: list[Pipeline], max_batch: int = 4, batch_wait: float = 0.0,
                 lora_dir: str | None = None, heartbeat_timeout: float = 15.0, report_interval: float = 0.2) -> None:
        import dramatiq

        self.url, self.report_interval = url, report_interval
        self.db = connect(url)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.cards = {p.name: ModelCard.of(p) for p in pipes}
        self.loop = asyncio.new_event_loop()
        self.queues = {p.name: JobQueue(p, max_queue=1 << 30, max_batch=max_batch, batch_wait=batch_wait,
                                        retain=4 * max_batch, lora_dir=lora_dir) for p in pipes}
        self.running: dict[str, tuple[JobQueue, Job]] = {}  # job id -> its local queue and job there
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.broker = make_broker(url, heartbeat_timeout)
        names = [queue_name(p.name) for p in pipes]
        dramatiq.Actor(self.handle, broker=self.broker, actor_name=ACTOR, queue_name=names[0], priority=0, options={})
        for name in names:
            self.broker.declare_queue(name)
        self.worker = dramatiq.Worker(self.broker, queues=set(names), worker_threads=max_batch * len(pipes),
                                      worker_timeout=250)
        self.worker.queue_prefetch = max_batch  # per queue: the rest waits in Redis for the other workers
        self.threads = [threading.Thread(target=self.loop.run_forever, daemon=True, name="t2i-loop"),
                        threading.Thread(target=self._report, daemon=True, name="t2i-report")]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Worker:
        self.threads[0].start()
        for q in self.queues.values():
            asyncio.run_coroutine_threadsafe(q.start(), self.loop).result()
        self._advertise()
        self.threads[1].start()
        self.worker.start()
        return self

    def stop(self, timeout: float = 600.0) -> None:
        """Take no new job, let the running ones finish (their answers written and acknowledged), then
        leave: the worker is no longer listed (its models' cards stay for the fronts). Jobs still
        running after `timeout` seconds are stopped and handed back (another worker runs them)."""
        self.worker.stop(timeout=int(timeout * 1000))
        self.stopping.set()
        for q in self.queues.values():
            asyncio.run_coroutine_threadsafe(q.stop(), self.loop).result()
        deadline = time.monotonic() + 5.0  # the handing back (`handle`) before the process exits
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.db.zrem(key("workers"), self.id)
        self.db.delete(key("worker", id=self.id))
        self.broker.close()

    def _advertise(self) -> None:
        per_image = max(q.seconds_per_image for q in self.queues.values())
        pipe = self.db.pipeline()
        pipe.hset(key("models"), mapping={n: c.to_json() for n, c in self.cards.items()})
        pipe.set(key("worker", id=self.id), json.dumps({"id": self.id, "models": sorted(self.cards), "pid": os.getpid(),
                                                        "host": socket.gethostname(),
                                                        "seconds_per_image": per_image,
                                                        "batches": {n: q.batches for n, q in self.queues.items()}}),
                ex=WORKER_TTL)
        pipe.zadd(key("workers"), {self.id: time.time()})
        # A worker killed without stop() leaves its entry; whoever advertises next forgets it.
        pipe.zremrangebyscore(key("workers"), "-inf", time.time() - WORKER_TTL)
        pipe.execute()

    # ------------------------------------------------------------------ one message (a dramatiq thread)

    def handle(self, job_id: str) -> None:
        """Run one job and write its answer. Returning acknowledges the message, so it returns only once
        the job is answered (or was answered elsewhere: cancelled while queued, finished by another)."""
        record = self._redis(self.db.hgetall, key("job", id=job_id))
        model = record.get(b"model", b"").decode()
        if model not in self.queues:  # expired, or a queue shared by mistake: nothing to run
            return
        claimed = self._redis(self.db.eval, CLAIM, 3, key("job", id=job_id), key("waiting", model=model),
                              key("running"), job_id, self.id, repr(time.time()), MAX_ATTEMPTS)
        if claimed == -1:
            error = f"the job was started {MAX_ATTEMPTS} times and each time its worker died; not trying again"
            self._redis(finish, self.db, job_id, model, answer_fields(FAILED, error, [], []))
            return
        if not claimed:
            return
        try:
            request = read_request(record)
            job = asyncio.run_coroutine_threadsafe(self._run(job_id, model, request), self.loop).result()
            if self.stopping.is_set() and job.status == FAILED and SHUTTING_DOWN in (job.error or ""):
                # stop() outlasted its timeout: the job is not failed but handed back, in a new
                # message (returning acknowledges this one) that another worker takes at once
                # (CLAIM takes over a `running` job); this claim does not count towards MAX_ATTEMPTS.
                self._redis(self.db.hincrby, key("job", id=job_id), "attempts", -1)
                send_job(self.broker, model, job_id)
                return
            fields = answer_fields(job.status, job.error, job.outputs, job.warnings)
        except Exception as e:  # noqa: BLE001 - a job that cannot run still gets an answer
            fields = answer_fields(FAILED, f"generation failed: {type(e).__name__}: {e}", [], [])
        finally:
            with self.lock:
                self.running.pop(job_id, None)
        self._redis(finish, self.db, job_id, model, fields)  # a repeat after a lost reply returns False: safe

    def _redis(self, call, *args):
        """`call(*args)`, retried while Redis is unreachable: returning from `handle` acknowledges the
        message, so giving up on a blip would leave its job `queued` or `running` forever. Gives up
        (raises) only once the worker is stopping; the message then stays unacknowledged and comes back."""
        import redis

        while True:
            try:
                return call(*args)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if self.stopping.is_set():
                    raise
                print(f"t2i worker: Redis unreachable ({type(e).__name__}: {e}); retrying", flush=True)
                time.sleep(RETRY)

    async def _run(self, job_id: str, model: str, request) -> Job:
        queue = self.queues[model]
        job = queue.submit(request)
        with self.lock:
            self.running[job_id] = (queue, job)
        assert job.future is not None
        return await job.future

    # ------------------------------------------------------------------ reporter thread

    def _report(self) -> None:
        """Every report_interval: heartbeat and advertisement, each running job's progress out, the
        fronts' cancellations and interruptions in."""
        last_ad = 0.0
        while not self.stopping.wait(self.report_interval):
            try:
                if time.monotonic() - last_ad > 1.0:
                    self._advertise()
                    last_ad = time.monotonic()
                self._sync_jobs()
            except Exception as e:  # noqa: BLE001 - Redis away for a moment: try again next tick
                print(f"t2i worker: report failed: {type(e).__name__}: {e}", flush=True)

    def _sync_jobs(self) -> None:
        with self.lock:
            jobs = list(self.running.items())
        if not jobs:
            return
        pipe = self.db.pipeline()
        for job_id, _ in jobs:
            pipe.hget(key("job", id=job_id), "status")
            pipe.hget(key("job", id=job_id), "interrupted")
        answers = pipe.execute()
        pipe = self.db.pipeline()
        for (job_id, (queue, job)), status, interrupted in zip(jobs, answers[::2], answers[1::2], strict=True):
            if status not in (b"queued", b"running"):  # answered by a front (cancelled) or expired
                self.loop.call_soon_threadsafe(queue.cancel, job.id)
                continue
            if interrupted == b"1":
                job.interrupted = True
            pipe.hset(key("job", id=job_id), mapping={"step": job.step, "steps": job.steps})
        pipe.execute()
