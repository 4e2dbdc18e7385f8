"""Stopping work: a cancelled job stops within a fraction of a step and the next one starts at once; a
batch keeps running for the jobs still in it; a client that disconnects cancels its job; A1111's
interrupt and progress; SIGTERM stops `t2i serve` within seconds while a long job runs.
Tiny random SD1-like model (a 64x64 step takes ~0.3 s on one thread), real server on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")

from test_serve import model_folder_fixture, pipe_fixture, png, request, serve, wait_for  # noqa: E402, F401 - shared fixtures, helpers

from t2i.serve.jobs import sketch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = {"prompt": "slow", "steps": 200, "width": 64, "height": 64, "seed": 1}


def job_of(server, job_id):
    return server.queue.jobs[job_id]


def test_cancel_stops_within_a_fraction_of_a_step_and_the_next_job_starts(pipe):
    with serve(pipe, max_queue=8, max_batch=1) as s:
        code, _, first = request("POST", s.url + "/v1/jobs", LONG)
        assert code == 202
        _, _, second = request("POST", s.url + "/v1/jobs", {"prompt": "next", "steps": 1, "width": 16, "height": 16})
        a = job_of(s, first["id"])
        wait_for(lambda: a.step >= 2, what="two steps of the long job")
        step_seconds = (time.perf_counter() - a.started) / a.step  # an upper bound: includes the prompt encoding
        t0 = time.perf_counter()
        assert request("DELETE", s.url + f"/v1/jobs/{first['id']}")[0] == 200
        b = job_of(s, second["id"])
        wait_for(lambda: b.started is not None, timeout=10, what="the next job to start")
        delay = b.started - t0
        print(f"step {step_seconds * 1000:.0f} ms; next job started {delay * 1000:.0f} ms after the cancel")
        assert delay < 0.5 * step_seconds, (delay, step_seconds)
        assert a.step < 200
        wait_for(lambda: b.status == "done", timeout=30, what="the next job to finish")


def test_a_cancelled_job_leaves_its_batch_running_for_the_others(pipe):
    body = {"prompt": "batch", "steps": 40, "width": 32, "height": 32}
    with serve(pipe, max_queue=8, max_batch=4, batch_wait=0.5) as s, ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(request, "POST", s.url + "/sdapi/v1/txt2img", {**body, "seed": sd},
                               {"X-Job-Id": f"b{sd}"}) for sd in (1, 2, 3)]
        wait_for(lambda: len(s.queue.running) == 3 and s.queue.running[0].step >= 1, what="the batch of three")
        assert request("DELETE", s.url + "/v1/jobs/b2")[0] == 200
        results = [f.result(timeout=120) for f in futures]
        assert [c for c, _, _ in results] == [200, 409, 200]
        assert s.queue.batches == 1 and not s.queue.jobs["b2"].outputs  # one call; the cancelled job's images dropped
        assert [json.loads(r["info"])["all_seeds"] for _, _, r in (results[0], results[2])] == [[1], [3]]

        # A batch whose jobs are all cancelled stops.
        for sd in (4, 5):
            request("POST", s.url + "/v1/jobs", {**body, "seed": sd, "steps": 200}, {"X-Job-Id": f"b{sd}"})
        wait_for(lambda: len(s.queue.running) == 2 and s.queue.running[0].step >= 1, what="the batch of two")
        for sd in (4, 5):
            assert request("DELETE", s.url + f"/v1/jobs/b{sd}")[0] == 200
        wait_for(lambda: not s.queue.running, timeout=5, what="the batch to stop")
        assert s.queue.jobs["b4"].step < 200 and s.queue.batches == 1


def test_a_client_that_disconnects_cancels_its_job(pipe):
    with serve(pipe, max_queue=8, max_batch=1) as s:
        body = json.dumps(LONG).encode()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"X-Job-Id: gone\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: "gone" in s.queue.jobs and s.queue.jobs["gone"].step >= 1, what="the job to run")
        sock.close()
        job = s.queue.jobs["gone"]
        t0 = time.monotonic()
        wait_for(lambda: job.status == "cancelled", timeout=5, what="the job to be cancelled")
        wait_for(lambda: not s.queue.running, timeout=5, what="the worker to stop")
        assert time.monotonic() - t0 < 2 and job.step < 200


def test_progress_job_timestamp_is_stable_per_job(pipe):
    with serve(pipe, max_queue=8, max_batch=1) as s:
        code, _, first = request("POST", s.url + "/v1/jobs", LONG)
        wait_for(lambda: job_of(s, first["id"]).step >= 1, what="the job to run")
        polls = []
        for _ in range(3):
            polls.append(request("GET", s.url + "/sdapi/v1/progress")[2]["state"]["job_timestamp"])
            time.sleep(1.1)  # the timestamp has one-second resolution: a clock-based one would change
        assert len(set(polls)) == 1 and len(polls[0]) == 14, polls
        request("DELETE", s.url + f"/v1/jobs/{first['id']}")


def test_interrupt_answers_with_the_image_as_it_stood_and_progress_shows_it(pipe):
    with serve(pipe, max_queue=8, max_batch=1) as s, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(request, "POST", s.url + "/sdapi/v1/txt2img", LONG)
        wait_for(lambda: s.queue.running and s.queue.running[0].step >= 2, what="two steps")
        progress = request("GET", s.url + "/sdapi/v1/progress")[2]
        assert png(progress["current_image"]).size == (64, 64)
        assert request("POST", s.url + "/sdapi/v1/interrupt")[0] == 200
        code, _, answer = waiting.result(timeout=30)
        assert code == 200, answer
        image = png(answer["images"][0])
        assert image.size == (64, 64) and "interrupted" in json.loads(answer["info"])["warnings"][0]


def test_sketch_shows_the_sample_channels_as_a_picture():
    import numpy as np
    import torch

    ramp = torch.linspace(-3, 3, 8)
    sample = torch.stack([ramp[None, :].expand(8, 8), ramp[:, None].expand(8, 8), torch.zeros(8, 8),
                          torch.ones(8, 8)])[None]  # (1, 4, 8, 8): left-right, top-bottom, flat, ignored
    rgb = np.asarray(sketch(sample, (16, 16)), dtype=int)  # (16, 16, 3)
    assert rgb.shape == (16, 16, 3)
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and rgb[0, 0, 1] == 0 and rgb[-1, 0, 1] == 255
    assert (rgb[..., 2] == 0).all() and sketch(torch.zeros(2, 77), (16, 16)) is None  # token codes: none


# ---------------------------------------------------------------------- SIGTERM


def test_sigterm_stops_the_server_within_seconds_while_a_long_job_runs(model_folder, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "t2i.cli", "serve", "--model", str(model_folder),
                             "--port", str(port), "--max-size", "64", "--max-steps", "200",
                             "--max-pixel-steps", str(10**9), "--max-batch", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: proc.poll() is None and _up(url), timeout=90, what="t2i serve to start")
        code, _, running = request("POST", url + "/v1/jobs", LONG)
        assert code == 202
        _, _, queued = request("POST", url + "/v1/jobs", {**LONG, "seed": 2})
        wait_for(lambda: request("GET", url + f"/v1/jobs/{running['id']}")[2]["step"] >= 1, what="the long job")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(request, "POST", url + "/sdapi/v1/txt2img", {**LONG, "seed": 3})
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
            elapsed = time.monotonic() - t0
            code, _, answer = waiting.result(timeout=5)
        print(f"t2i serve exited {elapsed:.2f} s after SIGTERM (code {proc.returncode})")
        assert elapsed < 5, elapsed
        # The request that waited behind the long job was answered, not dropped: 503, not started.
        assert code == 503 and "shutting down" in answer["detail"] and "not started" in answer["detail"]
        assert proc.returncode in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _up(url: str) -> bool:
    try:
        return request("GET", url + "/health", timeout=2)[0] == 200
    except OSError:
        return False
