"""`t2i serve` end to end: the real server on a loopback port, driven by the official `openai` client,
the `webuiapi` client (both test-only dependencies) and raw HTTP for bad input, overload, auth,
CORS, cancellation, batching and seed reproducibility. Tiny random SD1-like model, 16-32 px, few steps.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import t2i  # noqa: E402
from t2i.imageio import parse_parameters  # noqa: E402
from t2i.serve.app import create_app  # noqa: E402
from t2i.serve.background import BackgroundServer  # noqa: E402
from t2i.serve.config import Limits, ServeConfig  # noqa: E402
from t2i.serve.jobs import encode_png  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# Named through `name=` so that other test_serve_* files can import them without shadowing.
@pytest.fixture(scope="module", name="model_folder")
def model_folder_fixture(tmp_path_factory):
    from sd_oracles import build_sd1

    folder = tmp_path_factory.mktemp("serve") / "sd1"
    build_sd1(folder)
    return folder


@pytest.fixture(scope="module", name="pipe")
def pipe_fixture(model_folder):
    return t2i.load(model_folder)


@contextmanager
def serve(pipe, **config):
    # A budget far above these tests' jobs: the budget's own tests are in test_serve_limits.py.
    limits = config.pop("limits", Limits(max_width=64, max_height=64, max_steps=200, max_images=4,
                                         max_body_bytes=200_000, max_pixel_steps=10**9))
    app = create_app(pipe, ServeConfig(limits=limits, **config))
    with BackgroundServer(app) as server:
        server.queue = app.state.queue
        yield server


@pytest.fixture(scope="module")
def server(pipe):
    with serve(pipe, max_queue=8, max_batch=4) as s:
        yield s


def request(method: str, url: str, body=None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) for any status, loopback only."""
    assert url.startswith("http://127.0.0.1:")
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read() or b"null")


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# ---------------------------------------------------------------------- the real clients


def test_openai_client_matches_library(server, pipe):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.images.generate(prompt="a red circle", n=2, size="32x32", response_format="b64_json",
                               extra_body={"seed": 7, "steps": 2, "guidance": 5.0, "sampler": "euler",
                                           "negative_prompt": "blue"})
    assert len(r.data) == 2 and r.created > 0
    served = [base64.b64decode(d.b64_json) for d in r.data]
    ref = pipe.generate("a red circle", "blue", seed=7, num_images=2, steps=2, guidance=5.0, sampler="euler",
                        width=32, height=32)
    # The same call through the library gives the same PNG bytes (pixels and parameters).
    assert served == [encode_png(im) for im in ref.images]
    params = [parse_parameters(png(d.b64_json).info["parameters"]) for d in r.data]
    assert [p["Seed"] for p in params] == ["7", "8"]
    assert params[0]["Size"] == "32x32" and params[0]["Sampler"] == "Euler" and params[0]["CFG scale"] == "5.0"
    assert params[0]["negative_prompt"] == "blue"

    # response_format=url (OpenAI's default): the URL serves the same bytes.
    u = client.images.generate(prompt="a red circle", size="32x32", model="dall-e-2",
                               extra_body={"seed": 7, "steps": 2, "guidance": 5.0, "sampler": "euler",
                                           "negative_prompt": "blue"})
    with urllib.request.urlopen(u.data[0].url, timeout=30) as f:
        assert f.read() == served[0]
    assert [m.id for m in client.models.list().data] == [pipe.name]


def test_webuiapi_txt2img_random_seed_is_returned_and_reproducible(server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, steps=2)
    r = api.txt2img(prompt="a cat", negative_prompt="dog", seed=-1, width=32, height=16, batch_size=2,
                    sampler_name="DPM++ 2M Karras", cfg_scale=6)
    seed = r.info["seed"]
    assert 0 <= seed < 2**32 and r.info["all_seeds"] == [seed, seed + 1]
    assert [im.size for im in r.images] == [(32, 16)] * 2
    p = parse_parameters(r.images[1].info["parameters"])
    assert p["Seed"] == str(seed + 1) and p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    assert r.info["sampler_name"] == "DPM++ 2M" and r.info["cfg_scale"] == 6.0 and r.info["steps"] == 2
    # The returned seed reproduces the images byte for byte.
    again = api.txt2img(prompt="a cat", negative_prompt="dog", seed=seed, width=32, height=16, batch_size=2,
                        sampler_name="DPM++ 2M Karras", cfg_scale=6)
    assert [encode_png(a) for a in again.images] == [encode_png(b) for b in r.images]
    assert again.json["images"] == r.json["images"]
    other = api.txt2img(prompt="a cat", negative_prompt="dog", seed=seed + 5, width=32, height=16,
                        sampler_name="DPM++ 2M Karras", cfg_scale=6)
    assert other.json["images"][0] != r.json["images"][0]
    assert "Euler a" in [s["name"] for s in api.get_samplers()]
    assert api.util_get_model_names() == [server.queue.pipe.name]


def test_webuiapi_img2img(server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, steps=4)
    init = Image.fromarray(np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 1, 3)))
    keep = api.img2img(images=[init], prompt="x", seed=3, denoising_strength=0.0, width=32, height=32)
    full = api.img2img(images=[init], prompt="x", seed=3, denoising_strength=1.0, width=32, height=32)
    p = parse_parameters(keep.image.info["parameters"])
    assert p["Denoising strength"] == "0.0" and keep.info["all_seeds"] == [3]
    # strength 0 returns the input through the autoencoder, strength 1 ignores it: the first is
    # much closer to the input (a random tiny VAE only roughly reconstructs it).
    err = [np.abs(np.asarray(r.image, dtype=float) - np.asarray(init, dtype=float)).mean() for r in (keep, full)]
    assert err[0] < err[1]


# ---------------------------------------------------------------------- bad input


BAD = [
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 36}, "width", 422),  # not a multiple of 8
    ("/sdapi/v1/txt2img", {"prompt": "x", "height": 128}, "height", 422),  # over the configured 64
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, "steps", 422),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 201}, "steps", 422),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 2}, "batch_size", 422),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": float("nan")}, "cfg_scale", 422),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": float("inf")}, "cfg_scale", 422),
    ("/sdapi/v1/txt2img", {"prompt": "x", "seed": -2}, "seed", 422),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Nope"}, "sampler_name", 422),
    ("/sdapi/v1/txt2img", {"prompt": "x", "scheduler": "Nope"}, "scheduler", 422),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, "enable_hr", 422),
    ("/sdapi/v1/txt2img", {"prompt": "x" * 4001}, "prompt", 422),
    ("/sdapi/v1/txt2img", {"prompt": "x", "negative_prompt": "y" * 4001}, "negative_prompt", 422),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["%%%not base64"]}, "init_images", 422),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(b"not an image").decode()]},
     "init_images", 422),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": []}, "init_images", 422),
    ("/v1/images/generations", {"prompt": "x", "size": "32x33"}, "size", 422),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, "size", 422),
    ("/v1/images/generations", {"prompt": "x", "n": 0}, "n", 422),
    ("/v1/images/generations", {"prompt": "x", "n": 5}, "n", 422),
    ("/v1/images/generations", {"prompt": ""}, "prompt", 422),
    ("/v1/images/generations", {"prompt": "x", "response_format": "jpeg"}, "response_format", 422),
    ("/v1/images/generations", {"prompt": "x", "sedd": 1}, "sedd", 422),  # typo: unknown field
    ("/v1/images/generations", {"prompt": "x", "model": "other"}, "model", 404),
    ("/v1/images/generations", {"prompt": "x", "guidance": 51}, "guidance", 422),
    ("/v1/jobs", {"prompt": "x", "width": "wide"}, "width", 422),
]


@pytest.mark.parametrize("path,body,field,status", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_4xx_naming_the_field_before_any_work(server, path, body, field, status):
    batches, jobs = server.queue.batches, len(server.queue.jobs)
    code, _, answer = request("POST", server.url + path, body)
    assert code == status, answer
    assert answer["error"]["param"] == field and field in answer["detail"]
    assert (server.queue.batches, len(server.queue.jobs)) == (batches, jobs)  # nothing was queued


def test_malformed_body_and_body_size(server):
    code, _, answer = request("POST", server.url + "/sdapi/v1/txt2img", raw=b'{"prompt": ')
    assert code == 422 and answer["error"]["param"] == "body"
    big = json.dumps({"prompt": "x", "init_images": ["A" * 250_000]}).encode()
    code, _, answer = request("POST", server.url + "/sdapi/v1/img2img", raw=big)
    assert code == 413 and answer["error"]["param"] == "body"
    # Chunked (no Content-Length): counted while it streams in.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/sdapi/v1/img2img")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for _ in range(30):
        chunk = b"A" * 10_000
        conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["param"] == "body"
    conn.close()


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------- overload


def test_overload_12_concurrent_on_a_queue_of_2(pipe):
    with serve(pipe, max_queue=2, max_batch=1) as s:
        body = {"prompt": "busy", "steps": 12, "width": 32, "height": 32, "seed": 1}
        start = threading.Barrier(12)

        def one(i):
            start.wait(timeout=30)
            return request("POST", s.url + "/sdapi/v1/txt2img", {**body, "seed": i}, timeout=120)

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        codes = [c for c, _, _ in results]
        assert set(codes) <= {200, 429}, codes
        assert 200 in codes and 429 in codes, codes
        for code, headers, answer in results:
            if code == 429:
                assert int(headers["retry-after"]) >= 1 and "queue is full" in answer["detail"]
            else:
                assert len(answer["images"]) == 1
        # Every accepted request was answered, nothing is left, and the server still works.
        wait_for(lambda: not s.queue.pending and not s.queue.running, timeout=10, what="an idle queue")
        assert request("GET", s.url + "/health")[0] == 200
        code, _, answer = request("POST", s.url + "/sdapi/v1/txt2img", {**body, "steps": 1})
        assert code == 200 and len(answer["images"]) == 1


# ---------------------------------------------------------------------- auth and CORS


def test_api_key(pipe):
    from openai import AuthenticationError, OpenAI

    with serve(pipe, api_key="s3cret") as s:
        assert request("GET", s.url + "/health")[0] == 200
        for path in ("/v1/models", "/sdapi/v1/samplers", "/sdapi/v1/progress", "/v1/jobs", "/v1/info"):
            code, headers, _ = request("GET", s.url + path)
            assert code == 401 and headers["www-authenticate"] == "Bearer", path
            assert request("GET", s.url + path, headers={"Authorization": "Bearer wrong"})[0] == 401
            assert request("GET", s.url + path, headers={"Authorization": "Bearer s3cret"})[0] == 200
        body = {"prompt": "x", "steps": 1, "width": 16, "height": 16}
        assert request("POST", s.url + "/sdapi/v1/txt2img", body)[0] == 401
        assert not s.queue.jobs  # refused before it reached the queue
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
        r = OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0).images.generate(
            prompt="x", size="16x16", response_format="b64_json", extra_body={"steps": 1})
        assert png(r.data[0].b64_json).size == (16, 16)

        import webuiapi

        api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port, steps=1)
        with pytest.raises(RuntimeError, match="401"):
            api.txt2img(prompt="x", width=16, height=16)
        api.session.headers["Authorization"] = "Bearer s3cret"
        assert api.txt2img(prompt="x", width=16, height=16).image.size == (16, 16)


def test_cross_origin_posts_refused_unless_configured(server, pipe):
    body = {"prompt": "x", "steps": 1, "width": 16, "height": 16}
    evil = {"Origin": "http://evil.example"}
    code, _, answer = request("POST", server.url + "/sdapi/v1/txt2img", body, headers=evil)
    assert code == 403 and "cross-origin" in answer["detail"]
    preflight = {**evil, "Access-Control-Request-Method": "POST"}
    assert request("OPTIONS", server.url + "/v1/jobs", headers=preflight)[0] == 403
    # Same origin (the page itself) is fine.
    same = {"Origin": server.url}
    assert request("POST", server.url + "/sdapi/v1/txt2img", body, headers=same)[0] == 200
    with serve(pipe, cors_origins=["http://good.example"]) as s:
        good = {"Origin": "http://good.example"}
        code, headers, _ = request("POST", s.url + "/sdapi/v1/txt2img", body, headers=good)
        assert code == 200 and headers["access-control-allow-origin"] == "http://good.example"
        code, headers, _ = request("OPTIONS", s.url + "/v1/jobs",
                                headers={**good, "Access-Control-Request-Method": "POST"})
        assert code == 204 and "Authorization" in headers["access-control-allow-headers"]
        assert request("POST", s.url + "/sdapi/v1/txt2img", body, headers=evil)[0] == 403


# ---------------------------------------------------------------------- progress and cancellation


def test_progress_and_cancel_by_job_id(server):
    long = {"prompt": "slow", "steps": 200, "width": 64, "height": 64, "seed": 1}
    code, _, job = request("POST", server.url + "/v1/jobs", long)
    assert code == 202 and job["status"] in ("queued", "running")
    # A second job waits behind it and is cancelled while queued.
    code, _, queued = request("POST", server.url + "/v1/jobs", {**long, "sampler": "heun"})
    assert queued["position"] == 1

    def running():
        j = request("GET", server.url + f"/v1/jobs/{job['id']}")[2]
        return j if j["status"] == "running" and j["step"] >= 2 else None

    j = wait_for(running, what="the job to run two steps")
    assert 0 < j["progress"] < 1 and j["steps"] == 200 and j["eta_seconds"] > 0
    p = request("GET", server.url + "/sdapi/v1/progress")[2]
    assert p["state"]["job"] == job["id"] and 0 < p["progress"] < 1 and p["eta_relative"] > 0
    assert p["state"]["sampling_steps"] == 200 and p["state"]["job_count"] == 2

    code, _, cancelled = request("DELETE", server.url + f"/v1/jobs/{queued['id']}")
    assert code == 200 and cancelled["status"] == "cancelled"
    code, _, cancelled = request("DELETE", server.url + f"/v1/jobs/{job['id']}")
    assert code == 200 and cancelled["status"] == "cancelled"
    assert request("DELETE", server.url + f"/v1/jobs/{job['id']}")[0] == 409  # already ended
    # The worker stops the run at its next step and takes the next job.
    wait_for(lambda: not server.queue.running, timeout=30, what="the worker to stop")
    stopped = request("GET", server.url + f"/v1/jobs/{job['id']}")[2]
    assert stopped["status"] == "cancelled" and stopped["step"] < 200
    code, _, ok = request("POST", server.url + "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "width": 16})
    assert code == 200 and len(ok["images"]) == 1


def test_interrupt_and_cancel_a_waiting_request(pipe):
    # Long enough that the first run is still going when the interrupt arrives, on a fast machine
    # too (200 steps of the tiny model could end first); the interrupt ends it early.
    limits = Limits(max_width=64, max_height=64, max_steps=500, max_images=4, max_body_bytes=200_000,
                    max_pixel_steps=10**9)
    long = {"prompt": "slow", "steps": 500, "width": 64, "height": 64}
    with serve(pipe, max_queue=8, max_batch=4, limits=limits) as server, ThreadPoolExecutor(2) as pool:
        first = pool.submit(request, "POST", server.url + "/sdapi/v1/txt2img", long)
        wait_for(lambda: server.queue.running and server.queue.running[0].step >= 1, what="the run")
        second = pool.submit(request, "POST", server.url + "/sdapi/v1/txt2img", {**long, "seed": 9},
                             headers={"X-Job-Id": "mine-1"})
        wait_for(lambda: "mine-1" in server.queue.jobs, what="the second job")
        assert request("DELETE", server.url + "/v1/jobs/mine-1")[0] == 200
        code, _, answer = second.result(timeout=30)
        assert code == 409 and "cancelled" in answer["detail"]
        code, _, answer = request("POST", server.url + "/sdapi/v1/interrupt")
        assert code == 200 and len(answer["interrupted"]) == 1
        code, _, answer = first.result(timeout=30)
        # A1111's answer: the image as it stood (test_serve_cancel.py checks it)
        assert code == 200 and len(answer["images"]) == 1
        assert request("POST", server.url + "/v1/jobs", {"prompt": "x"}, headers={"X-Job-Id": "bad id!"})[0] == 422


# ---------------------------------------------------------------------- batching


def test_compatible_requests_are_batched(pipe):
    with serve(pipe, max_queue=8, max_batch=4, batch_wait=1.0) as s:
        body = {"prompt": "batch", "steps": 2, "width": 32, "height": 32, "sampler_name": "Euler"}
        seeds = [11, 12, 13]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(request, "POST", s.url + "/sdapi/v1/txt2img", {**body, "seed": sd}) for sd in seeds]
            # a request with other settings is not merged into that batch
            odd = pool.submit(request, "POST", s.url + "/sdapi/v1/txt2img", {**body, "seed": 14, "steps": 3})
            results = [f.result(timeout=60) for f in futures]
            odd_result = odd.result(timeout=60)
        assert [c for c, _, _ in results] == [200, 200, 200] and odd_result[0] == 200
        assert s.queue.batches == 2  # the three compatible jobs ran as one call, the odd one alone
        for sd, (_, _, answer) in zip(seeds, results, strict=True):
            assert json.loads(answer["info"])["all_seeds"] == [sd]
            alone = pipe.generate("batch", seed=sd, steps=2, width=32, height=32, sampler="euler",
                                  guidance=7.5).images[0]
            got = np.asarray(png(answer["images"][0]), dtype=int)
            # Batched and single runs differ only by float rounding in the model (CPU kernels
            # are not batch-invariant): at most one 8-bit level per pixel.
            assert np.abs(got - np.asarray(alone, dtype=int)).max() <= 1


# ---------------------------------------------------------------------- the rest of the surface


def test_health_info_and_page(server):
    code, _, health = request("GET", server.url + "/health")
    assert code == 200 and health["status"] == "ok"
    info = request("GET", server.url + "/v1/info")[2]
    assert info["defaults"]["sampler"] == server.queue.pipe.defaults.sampler
    assert info["limits"]["max_width"] == 64 and {"name": "euler_a", "label": "Euler a"} in info["samplers"]
    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        page = r.read().decode()
        assert r.headers["content-type"].startswith("text/html")
    assert 'id="prompt"' in page and "/static/app.js" in page
    with urllib.request.urlopen(server.url + "/static/app.js", timeout=10) as r:
        assert b"/v1/jobs" in r.read()

