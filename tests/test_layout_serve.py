"""The HTTP APIs take a `layout` (issue 17): our jobs API, A1111's txt2img and the OpenAI route read it
on the request's size and hand the model a Layout; the PNG records it; a bad layout is a 422 naming
the object, and a model without layouts refuses the field by name, both before any work."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi")

from test_layout_cli import AT_32, TWO  # noqa: E402
from test_layout_cli import BAD as CLI_BAD  # noqa: E402
from test_layout_spec import LayoutFake  # noqa: E402
from test_serve import png, request  # noqa: E402

from t2i.imageio import parse_parameters, request_fields  # noqa: E402
from t2i.serve.app import create_app  # noqa: E402
from t2i.serve.background import BackgroundServer  # noqa: E402
from t2i.serve.config import ServeConfig  # noqa: E402
from t2i.systems.base import Capabilities  # noqa: E402


@pytest.fixture(scope="module")
def fake():
    return LayoutFake()


@pytest.fixture(scope="module")
def server(fake):
    app = create_app(fake, ServeConfig())
    with BackgroundServer(app) as s:
        s.queue = app.state.queue
        yield s


def finished_job(server, body: dict) -> dict:
    code, _, job = request("POST", server.url + "/v1/jobs", body)
    assert code == 202, job
    deadline = time.monotonic() + 30
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
        job = request("GET", f"{server.url}/v1/jobs/{job['id']}")[2]
    assert job["status"] == "done", job
    return job


def test_jobs_api_takes_a_layout_in_pixels_of_the_request(server, fake):
    job = finished_job(server, {"prompt": "a red circle above a blue square", "seed": 4, "layout": TWO})
    assert fake.requests[-1].layout == AT_32  # no size given: the model's 32x32
    assert request_fields(parse_parameters(job["images"][0]["parameters"]))["layout"] == AT_32
    job = finished_job(server, {"prompt": "x", "width": 64, "height": 64, "seed": 4, "layout": TWO})
    assert fake.requests[-1].layout.objects[0].box == (0.125, 0.0, 0.375, 0.25)
    # Without a layout the model plans one, and the PNG records that one.
    job = finished_job(server, {"prompt": "a green star", "seed": 4})
    assert fake.requests[-1].layout is None
    params = parse_parameters(job["images"][0]["parameters"])
    assert request_fields(params)["layout"].objects[0].phrase == "a green star"


def test_a1111_and_openai_routes_take_a_layout(server, fake):
    fractions = {"units": "fractions", "objects": [{"phrase": "a red circle", "box": [0.25, 0, 0.75, 0.5]},
                                                   {"phrase": "a blue square", "box": [0, 0.5, 1, 1]}]}
    code, _, answer = request("POST", server.url + "/sdapi/v1/txt2img", {"prompt": "x", "seed": 1, "layout": TWO})
    assert code == 200, answer
    assert fake.requests[-1].layout == AT_32
    assert request_fields(parse_parameters(png(answer["images"][0]).info["parameters"]))["layout"] == AT_32
    assert json.loads(answer["info"])["extra_generation_params"]["Layout"] == AT_32.to_json()
    code, _, answer = request("POST", server.url + "/v1/images/generations",
                              {"prompt": "x", "size": "64x64", "response_format": "b64_json", "layout": fractions})
    assert code == 200, answer
    assert fake.requests[-1].layout == AT_32  # fractions: the same at any size


BAD = [*CLI_BAD, (7, "a layout is", "objects"),  # not a dict, list or string
       ([{"phrase": "a" * 4001, "box": [0, 0, 8, 8]}], "layout object 1", "4001 characters; at most 4000")]


@pytest.mark.parametrize("path", ["/v1/jobs", "/sdapi/v1/txt2img", "/v1/images/generations"])
@pytest.mark.parametrize("layout,names,problem", BAD)
def test_bad_layouts_are_422_naming_the_object_before_any_work(server, path, layout, names, problem):
    jobs = len(server.queue.jobs)
    code, _, answer = request("POST", server.url + path, {"prompt": "x", "layout": layout})
    assert code == 422 and answer["error"]["param"] == "layout", answer
    assert names in answer["detail"] and problem in answer["detail"], answer
    assert len(server.queue.jobs) == jobs


class NoLayout(LayoutFake):
    name, family = "plain-fake", "plain_family"
    capabilities = Capabilities(options=LayoutFake.capabilities.options - {"layout"}, samplers=("euler",),
                                native_size=(32, 32))

    def run(self, request):
        raise AssertionError("run() was called although the request must be refused")


def test_a_model_without_layouts_refuses_the_field_by_name():
    app = create_app(NoLayout(), ServeConfig())
    with BackgroundServer(app) as s:
        for path in ("/v1/jobs", "/sdapi/v1/txt2img", "/v1/images/generations"):
            code, _, answer = request("POST", s.url + path, {"prompt": "x", "layout": TWO})
            assert code == 422 and answer["error"]["param"] == "layout", answer
            assert "'layout'" in answer["detail"] and "plain-fake" in answer["detail"], answer
        assert not app.state.queue.jobs
        assert "layout" not in request("GET", s.url + "/v1/info")[2]["capabilities"]["options"]
