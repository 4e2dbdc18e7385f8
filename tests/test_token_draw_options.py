"""Token models' draws as request settings (issue 19): temperature, top_k and top_p from the Python
API, `t2i generate` and the server, recorded in the PNG, refused with a clear error where invalid or
where the model draws no tokens."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image
from test_families import _post

from t2i.cli import main
from t2i.systems.base import GenerationRequest, UnsupportedOption, check_request
from t2i.systems.registry import system

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["dalle", "maskgit", "amused", "parti", "muse"])
def tiny(request, tmp_path_factory):
    fam = system(request.param)
    path = fam.write_tiny(tmp_path_factory.mktemp(request.param), 0)
    return path, fam.load(path)


def test_greedy_and_top_1_draws_ignore_the_seed_and_are_recorded(tiny):
    _, pipe = tiny
    plain = [pipe.run(GenerationRequest("a red circle", seed=s)) for s in (1, 2)]
    assert not torch.equal(plain[0].sample, plain[1].sample)  # sampling at temperature 1 depends on the seed
    if pipe.family == "dalle":  # one token per step: argmax or the top-1 cut alone fix every token
        greedy = [pipe.run(GenerationRequest("a red circle", seed=s, temperature=0.0)).sample for s in (1, 2)]
        top1 = pipe.run(GenerationRequest("a red circle", seed=7, top_k=1))
        assert torch.equal(*greedy) and torch.equal(top1.sample, greedy[0])
        assert "Top k: 1" in top1.images[0].info["parameters"]
    hot = pipe.run(GenerationRequest("a red circle", seed=1, temperature=0.5, top_p=0.9))
    assert not torch.equal(hot.sample, plain[0].sample)
    params = hot.images[0].info["parameters"]
    assert "Temperature: 0.5" in params and "Top p: 0.9" in params
    assert "Temperature" not in plain[0].images[0].info["parameters"]  # the default is not written
    again = pipe.run(GenerationRequest("a red circle", seed=1, temperature=0.5, top_p=0.9))
    assert torch.equal(again.sample, hot.sample)
    assert pipe.temperature == 1.0 and pipe.top_k is None  # a request never changes the pipeline's own


@pytest.mark.parametrize("bad, word", [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"),
                                       ({"top_p": 1.5}, "top_p"), ({"temperature": float("nan")}, "temperature")])
def test_invalid_draws_are_refused_naming_the_setting(tiny, bad, word):
    _, pipe = tiny
    with pytest.raises(ValueError, match=word):
        pipe.run(GenerationRequest("a red circle", seed=0, **bad))


def test_a_diffusion_model_refuses_token_draws_by_name(tmp_path):
    pipe = system("shapes_ldm").load(system("shapes_ldm").write_tiny(tmp_path, 0))
    with pytest.raises(UnsupportedOption) as e:
        check_request(pipe, GenerationRequest("a red circle", top_p=0.9))
    assert e.value.option == "top_p"


def test_cli_takes_the_draws_and_refuses_bad_ones_in_one_line(tiny, tmp_path, capsys):
    path, pipe = tiny
    out = tmp_path / "t.png"
    assert main(["generate", "a red circle", "--model", str(path), "--out", str(out), "--seed", "3",
                 "--precision", "fp32", "--temperature", "0.7", "--top-k", "5"]) == 0
    api = pipe.run(GenerationRequest("a red circle", seed=3, temperature=0.7, top_k=5)).images[0]
    with Image.open(out) as im:
        assert im.convert("RGB").tobytes() == api.tobytes()
        assert "Temperature: 0.7" in im.info["parameters"] and "Top k: 5" in im.info["parameters"]
    capsys.readouterr()
    assert main(["generate", "a red circle", "--model", str(path), "--out", str(tmp_path / "no.png"),
                 "--top-p", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--top-p" in err[0] and not (tmp_path / "no.png").exists()


def test_server_takes_the_draws_and_answers_bad_ones_with_a_4xx(tiny):
    pytest.importorskip("fastapi")
    from t2i.serve.app import create_app
    from t2i.serve.background import BackgroundServer
    from t2i.serve.config import ServeConfig

    _, pipe = tiny
    with BackgroundServer(create_app(pipe, ServeConfig())) as server:
        status, reply = _post(server.url + "/sdapi/v1/txt2img",
                              {"prompt": "a red circle", "seed": 4, "temperature": 0.6, "top_p": 0.8})
        assert status == 200, reply
        image = Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))).convert("RGB")
        want = pipe.run(GenerationRequest("a red circle", seed=4, temperature=0.6, top_p=0.8)).images[0]
        assert image.tobytes() == want.tobytes()
        for body in ({"top_k": 0}, {"temperature": -0.1}, {"top_p": 2}):
            status, reply = _post(server.url + "/v1/jobs", {"prompt": "a red circle", **body})
            assert status == 422 and next(iter(body)) in json.dumps(reply)


def test_a_png_reads_back_the_temperature_it_was_drawn_at_whatever_the_model_default(tiny):
    from t2i.imageio import parse_parameters, request_fields

    _, pipe = tiny
    pipe.temperature = 0.8  # a model whose own default is not 1
    try:
        image = pipe.run(GenerationRequest("a red circle", seed=2, temperature=1.0)).images[0]
        plain = pipe.run(GenerationRequest("a red circle", seed=2)).images[0]
    finally:
        pipe.temperature = 1.0
    assert request_fields(parse_parameters(image.info["parameters"]))["temperature"] == 1.0
    assert request_fields(parse_parameters(plain.info["parameters"]))["temperature"] == 0.8


def test_dalle_greedy_refuses_draw_settings_it_would_ignore(tmp_path):
    fam = system("dalle")
    pipe = fam.load(fam.write_tiny(tmp_path, 0))
    with pytest.raises(ValueError, match="greedy.*top_k"):
        pipe.run(GenerationRequest("a red circle", seed=0, sampler="greedy", top_k=3))
