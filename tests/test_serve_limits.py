"""What the server accepts follows the served model: options outside its capabilities are refused by
name on every API, limits derive from its native size, a per-request pixel-step budget; and the
request-level guards: Host names (DNS rebinding), client job ids, random seeds reported and stored."""

from __future__ import annotations

import base64
import http.client
import io
import json
from dataclasses import replace

import pytest
from PIL import Image

pytest.importorskip("fastapi")

from test_serve import model_folder_fixture, pipe_fixture, png, request, serve  # noqa: E402, F401 - shared fixtures, helpers

from t2i.imageio import parse_parameters  # noqa: E402
from t2i.serve.app import create_app  # noqa: E402
from t2i.serve.background import BackgroundServer  # noqa: E402
from t2i.serve.config import Limits, ServeConfig  # noqa: E402
from t2i.systems.base import Capabilities, GenerationRequest  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Narrow:
    """The tiny pipeline as a model of another family that takes fewer options and one sampler."""

    family = "narrow_family"

    def __init__(self, inner) -> None:
        self.inner, self.name, self.defaults = inner, "narrow-model", replace(inner.defaults, sampler="euler")

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(options=frozenset({"steps", "guidance", "width", "height", "sampler"}),
                            samplers=("euler",), schedules=(), size_multiple=8, native_size=(16, 16))

    def run(self, request: GenerationRequest):
        return self.inner.run(request)


def small_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


REFUSED = [
    ("/v1/images/generations", {"prompt": "x", "negative_prompt": "blue"}, "negative_prompt"),
    ("/v1/jobs", {"prompt": "x", "sampler": "heun"}, "sampler"),
    ("/v1/jobs", {"prompt": "x", "schedule": "karras"}, "schedule"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "DPM++ 2M"}, "sampler_name"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "eta": 0.5, "sampler_name": "Euler"}, "eta"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [small_png()]}, "init_images"),
]


def test_options_the_model_cannot_honour_are_refused_naming_option_and_model(pipe):
    app = create_app(Narrow(pipe), ServeConfig())
    with BackgroundServer(app) as s:
        for path, body, field in REFUSED:
            code, _, answer = request("POST", s.url + path, body)
            assert code == 422 and answer["error"]["param"] == field, (path, answer)
            assert "narrow-model" in answer["detail"] and "narrow_family" in answer["detail"], answer
        assert not app.state.queue.jobs  # refused before any work
        info = request("GET", s.url + "/v1/info")[2]
        assert info["family"] == "narrow_family" and info["capabilities"]["samplers"] == ["euler"]
        assert "negative_prompt" not in info["capabilities"]["options"] and info["samplers"][0]["name"] == "euler"
        assert [x["name"] for x in request("GET", s.url + "/sdapi/v1/samplers")[2]] == ["Euler"]
        # What it can do still works, through its own run().
        code, _, answer = request("POST", s.url + "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "seed": 4})
        assert code == 200 and png(answer["images"][0]).size == (16, 16)


def test_limits_follow_the_model_and_the_budget_names_the_field(pipe):
    # The tiny model is native 16x16 at 20 steps: default limits 32x32 and 32 x 16 x 16 x 20 pixel-steps.
    with serve(pipe, limits=Limits(max_body_bytes=200_000)) as s:
        info = request("GET", s.url + "/v1/info")[2]
        assert info["limits"]["max_width"] == 32 and info["limits"]["max_pixel_steps"] == 32 * 16 * 16 * 20
        code, _, answer = request("POST", s.url + "/sdapi/v1/txt2img", {"prompt": "x", "width": 40})
        assert code == 422 and answer["error"]["param"] == "width" and "32" in answer["detail"]
        # 32x32 x 150 steps x 2 images is 1.9x the budget; steps are furthest above the default request.
        over = {"prompt": "x", "width": 32, "height": 32, "steps": 150, "batch_size": 2}
        code, _, answer = request("POST", s.url + "/sdapi/v1/txt2img", over)
        assert code == 422 and answer["error"]["param"] == "steps" and "budget" in answer["detail"], answer
        code, _, answer = request("POST", s.url + "/v1/images/generations",
                                  {"prompt": "x", "size": "32x32", "steps": 150, "n": 2})
        assert code == 422 and answer["error"]["param"] == "steps"
        assert not s.queue.jobs
        code, _, _ = request("POST", s.url + "/sdapi/v1/txt2img", {**over, "batch_size": 1, "steps": 2})
        assert code == 200
    with serve(pipe, limits=Limits(max_pixel_steps=10_000)) as s:  # configurable: 16x16 x 20 steps = 5120 each
        assert request("POST", s.url + "/v1/jobs", {"prompt": "x", "steps": 20})[0] == 202
        code, _, answer = request("POST", s.url + "/sdapi/v1/txt2img", {"prompt": "x", "steps": 20, "batch_size": 2})
        assert code == 422 and answer["error"]["param"] == "batch_size" and "10,000" in answer["detail"]


def raw_get(port: int, path: str, host: str, origin: str | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host)
    if origin:
        conn.putheader("Origin", origin)
    conn.endheaders()
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"null")
    conn.close()
    return out


def test_only_the_bound_host_names_are_answered(server_with_extra_host):
    s = server_with_extra_host
    for host in (f"127.0.0.1:{s.port}", f"localhost:{s.port}", "LOCALHOST", f"[::1]:{s.port}", "192.168.1.20:80",
                 "studio.lan", "studio.lan:8000"):
        assert raw_get(s.port, "/v1/jobs", host)[0] == 200, host
    # A rebinding page: its own domain as Host, and as Origin (so it looks same-origin).
    code, answer = raw_get(s.port, "/v1/jobs", "evil.example:8000", origin="http://evil.example:8000")
    assert code == 421 and answer["error"]["param"] == "Host" and "--allowed-host" in answer["detail"]
    assert raw_get(s.port, "/sdapi/v1/progress", "localhost.evil.example")[0] == 421


@pytest.fixture(scope="module")
def server_with_extra_host(pipe):
    with serve(pipe, allowed_hosts=["studio.lan"]) as s:
        yield s


def test_a_client_job_id_never_replaces_another_job(server_with_extra_host):
    s = server_with_extra_host
    body = {"prompt": "mine", "steps": 1, "width": 16, "height": 16, "seed": 1}
    code, _, first = request("POST", s.url + "/sdapi/v1/txt2img", body, headers={"X-Job-Id": "alice-1"})
    assert code == 200 and s.queue.jobs["alice-1"].status == "done"
    code, _, answer = request("POST", s.url + "/sdapi/v1/txt2img", {**body, "prompt": "theirs", "seed": 2},
                              headers={"X-Job-Id": "alice-1"})
    assert code == 409 and answer["error"]["param"] == "X-Job-Id"
    mine = request("GET", s.url + "/v1/jobs/alice-1")[2]
    assert mine["seed"] == 1 and mine["images"][0]["b64_json"] == first["images"][0]


def test_unset_or_minus_one_seed_is_random_reported_and_stored(server_with_extra_host):
    s = server_with_extra_host
    body = {"prompt": "x", "steps": 1}
    seeds = []
    for extra in ({}, {"seed": -1}):
        _, _, a = request("POST", s.url + "/sdapi/v1/txt2img", {**body, **extra, "width": 16})
        info = json.loads(a["info"])
        assert parse_parameters(png(a["images"][0]).info["parameters"])["Seed"] == str(info["seed"])
        _, _, o = request("POST", s.url + "/v1/images/generations",
                          {**body, **extra, "size": "16x16", "response_format": "b64_json"})
        assert parse_parameters(png(o["data"][0]["b64_json"]).info["parameters"])["Seed"] == str(o["data"][0]["seed"])
        _, _, j = request("POST", s.url + "/v1/jobs", {**body, **extra})
        seeds += [info["seed"], o["data"][0]["seed"], j["seed"]]
    assert all(0 <= sd < 2**32 for sd in seeds) and len(set(seeds)) == len(seeds), seeds
    # Every image's seed (seed + i) must be one the pipelines take: refused before any work otherwise.
    for seed, n in ((2**32, 1), (2**32 - 1, 2)):
        code, _, answer = request("POST", s.url + "/sdapi/v1/txt2img", {**body, "seed": seed, "batch_size": n})
        assert code == 422 and answer["error"]["param"] == "seed", answer


def test_img2img_inputs_are_resized_at_once_and_dropped_when_the_job_ends(server_with_extra_host):
    s = server_with_extra_host
    big = io.BytesIO()
    Image.new("RGB", (512, 256), (200, 30, 30)).save(big, format="PNG")
    body = {"prompt": "x", "steps": 2, "width": 16, "height": 16, "seed": 3,
            "init_images": [base64.b64encode(big.getvalue()).decode()], "mask": small_png()}
    seen = []
    original = s.queue.submit

    def spy(req, job_id=None):
        seen.append((req.init_image.size, req.mask.size, req.mask.mode))
        return original(req, job_id)

    s.queue.submit = spy
    try:
        code, _, answer = request("POST", s.url + "/sdapi/v1/img2img", body, headers={"X-Job-Id": "i2i"})
    finally:
        s.queue.submit = original
    assert code == 200 and seen == [((16, 16), (16, 16), "L")]
    assert s.queue.jobs["i2i"].request.init_image is None and s.queue.jobs["i2i"].request.mask is None
