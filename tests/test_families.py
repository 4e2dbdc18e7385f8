"""Every registered family, through every door: its tiny random model is written in the family's own
layout, found by the registry, and generates through the Python API, `t2i generate`, `t2i serve` and
`t2i eval`; an option it cannot honour is refused before any work, naming the option. A new family
gets these checks by registering."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from dataclasses import fields

import pytest
from PIL import Image

import t2i
from t2i.cli import main
from t2i.systems.base import GenerationRequest, Pipeline, UnsupportedOption, check_request
from t2i.systems.registry import FAMILY_MODULES, resolve, systems

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = [s.name for s in systems()]


def test_every_family_module_registers_one_system_with_a_unique_name():
    assert len(FAMILIES) == len(FAMILY_MODULES) == len(set(FAMILIES))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family name, path of its tiny model, the loaded pipeline)."""
    family = next(s for s in systems() if s.name == request.param)
    path = family.write_tiny(tmp_path_factory.mktemp(family.name), 0)
    return family.name, path, t2i.load(path)


def _small(pipe: Pipeline) -> dict:
    """Settings for a fast run: few steps at the model's native size."""
    w, h = pipe.capabilities.native_size
    settings = {"width": w, "height": h}
    if pipe.capabilities.accepts("steps"):
        settings["steps"] = 2
    return settings


def test_the_registry_detects_the_tiny_model_as_its_own_family(tiny):
    name, path, pipe = tiny
    assert resolve(path)[0].name == name
    assert [s.name for s in systems() if s.detect(path)] == [name]  # no other family claims it: order is free
    assert isinstance(pipe, Pipeline) and pipe.family == name


def test_python_api_generates_reproducibly(tiny):
    _, _, pipe = tiny
    request = GenerationRequest(["a red circle", "a blue square"], seed=[3, 7], num_images=2, **_small(pipe))
    first, again = pipe.run(request), pipe.run(request)
    assert len(first.images) == 4 and first.seeds == [3, 4, 7, 8]
    assert first.images[0].size == pipe.capabilities.native_size
    assert first.sample.shape[0] == 4
    assert [im.tobytes() for im in first.images] == [im.tobytes() for im in again.images]
    assert first.images[0].tobytes() != first.images[1].tobytes()  # seeds 3 and 4 differ
    assert "a red circle" in first.images[0].info["parameters"]


def _unsupported(pipe: Pipeline) -> tuple[str, dict]:
    """An option this pipeline cannot honour, as request settings: an option outside its
    capabilities if it has one, else a sampler name it does not list."""
    caps = pipe.capabilities
    probe = {"eta": 0.5, "deepcache": 2, "preview": True, "refiner_start": 0.5, "guidance_rescale": 0.5,
             "negative_prompt": "x", "strength": 0.5}
    for f in fields(GenerationRequest):
        if f.name in probe and not caps.accepts(f.name):
            return f.name, {f.name: probe[f.name]}
    assert caps.samplers, "a pipeline that takes every option must list its samplers"
    return "sampler", {"sampler": "no_such_sampler"}


def test_an_option_the_model_cannot_honour_is_refused_naming_it(tiny):
    _, _, pipe = tiny
    option, settings = _unsupported(pipe)
    with pytest.raises(UnsupportedOption) as e:
        check_request(pipe, GenerationRequest("a red circle", **settings))
    assert e.value.option == option and option in str(e.value) and pipe.name in str(e.value)


def test_cli_generates_and_refuses_what_the_model_cannot_do(tiny, tmp_path, capsys):
    _, path, pipe = tiny
    out = tmp_path / "cli.png"
    size = _small(pipe)
    args = ["generate", "a red circle", "--model", str(path), "--out", str(out), "--seed", "5", "--precision", "fp32",
            "--width", str(size["width"]), "--height", str(size["height"])]
    if "steps" in size:
        args += ["--steps", "2"]
    assert main(args) == 0
    with Image.open(out) as im:
        assert im.size == pipe.capabilities.native_size
        cli_pixels = im.convert("RGB").tobytes()
    api = pipe.run(GenerationRequest("a red circle", seed=5, **size)).images[0]
    assert cli_pixels == api.tobytes()  # the CLI is the API

    option, settings = _unsupported(pipe)
    flag = {"sampler": ["--sampler", "no_such_sampler"], "eta": ["--eta", "0.5"], "deepcache": ["--deepcache", "2"],
            "negative_prompt": ["--negative-prompt", "x"], "guidance_rescale": ["--guidance-rescale", "0.5"]}
    if option not in flag:
        pytest.skip(f"no CLI flag for {option}")
    capsys.readouterr()
    assert main(["generate", "a red circle", "--model", str(path), "--out", str(tmp_path / "no.png"),
                 *flag[option]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("no_such_sampler" in err[0] or option in err[0])
    assert not (tmp_path / "no.png").exists()


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_generates_and_refuses_what_the_model_cannot_do(tiny):
    pytest.importorskip("fastapi")
    from t2i.serve.app import create_app
    from t2i.serve.background import BackgroundServer
    from t2i.serve.config import Limits, ServeConfig

    _, _, pipe = tiny
    size = _small(pipe)
    with BackgroundServer(create_app(pipe, ServeConfig())) as server:
        body = {"prompt": "a red circle", "seed": 5, "width": size["width"], "height": size["height"],
                "steps": size.get("steps")}
        status, reply = _post(server.url + "/sdapi/v1/txt2img", body)
        assert status == 200, reply
        image = Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))).convert("RGB")
        assert image.tobytes() == pipe.run(GenerationRequest("a red circle", seed=5, **size)).images[0].tobytes()

        status, reply = _post(server.url + "/v1/jobs", {"prompt": "a red circle", "sampler": "no_such_sampler"})
        assert 400 <= status < 500 and "no_such_sampler" in json.dumps(reply)
    top = pipe.capabilities.max_steps
    if top is None:
        return
    # more steps than the schedule has, on a server whose own limits allow them: a 4xx naming steps, not a 500
    generous = ServeConfig(limits=Limits(max_steps=10 * top, max_pixel_steps=10**15))
    with BackgroundServer(create_app(pipe, generous)) as server:
        status, reply = _post(server.url + "/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": top + 1})
    assert 400 <= status < 500 and "steps" in json.dumps(reply) and "schedule" in json.dumps(reply), reply


def test_eval_shapes_judges_the_model(tiny, tmp_path):
    _, path, pipe = tiny
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("single\ta red circle\n")
    args = ["eval", "shapes", "--model", str(path), "--prompts", str(prompts), "--out", str(tmp_path / "eval"),
            "--precision", "fp32"]
    if pipe.capabilities.accepts("steps"):
        args += ["--steps", "2"]
    assert main(args) == 0
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["n"] == 1 and 0.0 <= report["overall"] <= 1.0


def test_an_unset_or_minus_one_seed_is_random_and_reported(tiny):
    """A1111: no seed, or -1, draws a fresh seed; the result and the PNG say which, and it reproduces."""
    _, _, pipe = tiny
    size = _small(pipe)
    first, second = pipe.run(GenerationRequest("a red circle", **size)), pipe.run(
        GenerationRequest("a red circle", seed=-1, num_images=2, **size))
    seed = first.seeds[0]
    assert seed != second.seeds[0] and second.seeds[1] == second.seeds[0] + 1
    assert f"Seed: {seed}," in first.images[0].info["parameters"]
    again = pipe.run(GenerationRequest("a red circle", seed=seed, **size))
    assert again.images[0].tobytes() == first.images[0].tobytes()
