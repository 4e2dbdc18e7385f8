"""Classifier guidance through `t2i serve`: a request names a classifier the server was started with
(`--classifier NAME=FILE`) in `classifier` / `classifier_scale` on our jobs API, A1111's routes and the OpenAI
route, and the served DDPM guides with it; a path or an unknown name is a 422 naming the field (clients never
choose which files the server reads), and a model without classifier guidance refuses both fields by name."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")

from test_layout_serve import finished_job  # noqa: E402
from test_serve import request  # noqa: E402

import t2i  # noqa: E402
from t2i.imageio import parse_parameters  # noqa: E402
from t2i.serve.app import create_app  # noqa: E402
from t2i.serve.background import BackgroundServer  # noqa: E402
from t2i.serve.config import ServeConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = {"prompt": "a red circle", "seed": 3, "steps": 3}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny unconditional DDPM file and a decided random classifier (red / blue) of its schedule."""
    from t2i.nets.classifier import NoisyClassifier, NoisyClassifierConfig, save_noisy_classifier
    from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS, PixelUNet
    from t2i.systems.ddpm import DDPMConfig, ddpm_schedule, save_ddpm

    root = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    net_cfg = PIXEL_UNET_PRESETS["tiny_uncond"]
    clf = NoisyClassifier(NoisyClassifierConfig(trunk=net_cfg, num_classes=2))
    with torch.no_grad():
        clf.head.weight.mul_(30.0)  # a random classifier's gradients are tiny
    save_noisy_classifier(clf, root / "colours.safetensors", ["red", "blue"], ddpm_schedule())
    save_ddpm(PixelUNet(net_cfg).eval(), DDPMConfig(net=net_cfg, schedule=ddpm_schedule(), text_encoder=None,
                                                    image_size=16), root / "ddpm.safetensors")
    return root


@pytest.fixture(scope="module")
def server(files):
    app = create_app(t2i.load(files / "ddpm.safetensors"),
                     ServeConfig(classifiers={"colours": str(files / "colours.safetensors")}))
    with BackgroundServer(app) as s:
        yield s


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def job_image(server, body: dict) -> dict:
    return finished_job(server, body)["images"][0]


def test_a_named_classifier_guides_the_served_ddpm_on_every_api(server):
    plain = job_image(server, BASE)
    guided = job_image(server, {**BASE, "classifier": "colours", "classifier_scale": 10})
    assert np.abs(pixels(guided["b64_json"]) - pixels(plain["b64_json"])).max() > 8  # the guidance moved it
    params = parse_parameters(guided["parameters"])
    assert params["Classifier"] == "colours" and float(params["Classifier scale"]) == 10.0
    assert "Classifier" not in parse_parameters(plain["parameters"])
    # A1111 (ours: A1111 has no such fields) and OpenAI routes: the same image for the same settings
    code, _, a1111 = request("POST", server.url + "/sdapi/v1/txt2img",
                             {**BASE, "classifier": "colours", "classifier_scale": 10})
    assert code == 200, a1111
    assert np.array_equal(pixels(a1111["images"][0]), pixels(guided["b64_json"]))
    code, _, openai = request("POST", server.url + "/v1/images/generations",
                              {**BASE, "classifier": "colours", "classifier_scale": 10, "response_format": "b64_json"})
    assert code == 200, openai
    assert np.array_equal(pixels(openai["data"][0]["b64_json"]), pixels(guided["b64_json"]))
    assert request("GET", server.url + "/v1/info")[2]["classifiers"] == ["colours"]


@pytest.mark.parametrize("path", ["/v1/jobs", "/sdapi/v1/txt2img", "/v1/images/generations"])
def test_only_the_servers_names_are_accepted(server, files, path):
    for name in (str(files / "colours.safetensors"), "../colours.safetensors", "nope"):
        code, _, answer = request("POST", server.url + path, {**BASE, "classifier": name})
        assert code == 422 and answer["error"]["param"] == "classifier", answer
        assert "unknown classifier" in answer["error"]["message"] and "colours" in answer["error"]["message"]
    code, _, answer = request("POST", server.url + path, {**BASE, "classifier": "colours",
                                                          "classifier_scale": float("inf")})
    assert code == 422 and answer["error"]["param"] == "classifier_scale", answer


@pytest.mark.parametrize("path", ["/v1/jobs", "/sdapi/v1/txt2img", "/v1/images/generations"])
def test_a_model_without_classifier_guidance_refuses_the_fields_by_name(tmp_path_factory, path):
    from t2i.systems.registry import system

    dit = t2i.load(system("dit").write_tiny(tmp_path_factory.mktemp("dit"), 0))
    with BackgroundServer(create_app(dit, ServeConfig(classifiers={"colours": "unused"}))) as s:
        for field, body in (("classifier", {"classifier": "colours"}), ("classifier_scale", {"classifier_scale": 2})):
            code, _, answer = request("POST", s.url + path, {**BASE, **body})
            assert code == 422 and answer["error"]["param"] == field, answer
            assert "does not support the option" in answer["error"]["message"]


def test_serve_classifier_option(files):
    from t2i.cli import UserError
    from t2i.serve.cli import classifier_files

    path = str(files / "colours.safetensors")
    assert classifier_files([f"colours={path}", f" other ={path}"]) == {"colours": path, "other": path}
    for bad, message in (([path], "NAME=FILE"), ([f"={path}"], "NAME=FILE"), (["c=/no/such.st"], "no such file"),
                         ([f"c={path}", f"c={path}"], "given twice")):
        with pytest.raises(UserError, match=message):
            classifier_files(bad)


def test_glide_takes_its_noise_aware_clip_by_name(tmp_path):
    """GLIDE's CLIP guidance is the same field: the served tiny base guided by the named noise-aware CLIP."""
    from t2i.eval.shapes_clip import ShapesCLIP
    from t2i.nets.glide import preset
    from t2i.nets.glide_clip import from_clean, save_noisy_clip
    from t2i.systems.glide import GlideConfig, GlideNets, glide_schedule, save_glide, shapes_words
    from t2i.text.words import SPECIALS

    torch.manual_seed(0)
    cfg = GlideConfig(base=preset("tiny_base", len(SPECIALS) + len(shapes_words())))
    save_glide(GlideNets(cfg).base, None, cfg, tmp_path / "glide.safetensors")
    save_noisy_clip(from_clean(ShapesCLIP.load(), 16), glide_schedule(), tmp_path / "clip.safetensors")
    app = create_app(t2i.load(tmp_path / "glide.safetensors"),
                     ServeConfig(classifiers={"shapes-clip": str(tmp_path / "clip.safetensors")}))
    with BackgroundServer(app) as s:
        body = {**BASE, "guidance": 1.0}
        plain = job_image(s, body)
        guided = job_image(s, {**body, "classifier": "shapes-clip", "classifier_scale": 10})
        # the PNG names the classifier as the server knows it, never the file: a client can send it back
        params = parse_parameters(guided["parameters"])
        assert params["Classifier"] == "shapes-clip" and float(params["Classifier scale"]) == 10.0
        again = job_image(s, {**body, "classifier": params["Classifier"], "classifier_scale": 10})
    assert np.abs(pixels(guided["b64_json"]) - pixels(plain["b64_json"])).max() > 8  # measured: 197
    assert np.array_equal(pixels(again["b64_json"]), pixels(guided["b64_json"]))


def test_a_prompt_the_classifier_cannot_guide_is_a_422_and_fails_no_other_job(files):
    """A prompt naming none (or two) of the classifier's classes is refused when the request is resolved, a 422
    naming `prompt`, on every route; it used to fail inside its job (500) and, batched with other clients' jobs
    (the batch key leaves prompts out), their whole batch with it. Sent together, a good job still gets its image,
    whose PNG names the classifier as the server knows it ("tint"), not by the file's stem."""
    app = create_app(t2i.load(files / "ddpm.safetensors"),
                     ServeConfig(batch_wait=0.5, classifiers={"tint": str(files / "colours.safetensors")}))
    guided = {**BASE, "classifier": "tint", "classifier_scale": 10}
    with BackgroundServer(app) as s:
        for path in ("/v1/jobs", "/sdapi/v1/txt2img", "/v1/images/generations"):
            for prompt, found in (("a circle", 0), ("a red and blue circle", 2)):
                code, _, answer = request("POST", s.url + path, {**guided, "prompt": prompt})
                assert code == 422 and answer["error"]["param"] == "prompt", answer
                assert f"exactly one of red, blue; prompt {prompt!r} names {found}" in answer["error"]["message"]
        answers: dict[str, tuple] = {}

        def send(key: str, prompt: str) -> None:
            answers[key] = request("POST", s.url + "/sdapi/v1/txt2img", {**guided, "prompt": prompt})

        threads = [threading.Thread(target=send, args=a) for a in (("good", "a red circle"), ("bad", "a circle"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert answers["bad"][0] == 422, answers["bad"]
    code, _, good = answers["good"]
    assert code == 200, good
    params = parse_parameters(json.loads(good["info"])["infotexts"][0])
    assert params["Classifier"] == "tint"


@pytest.mark.parametrize("path", ["/v1/jobs", "/sdapi/v1/txt2img", "/v1/images/generations"])
def test_a_classifier_scale_without_a_classifier_is_a_422(server, path):
    """It used to be ignored: an unguided image (200) whose PNG kept quiet about the scale."""
    code, _, answer = request("POST", server.url + path, {**BASE, "classifier_scale": 10})
    assert code == 422 and answer["error"]["param"] == "classifier_scale", answer
    assert "classifier_scale needs classifier" in answer["error"]["message"]


def test_serve_checks_its_classifier_files_at_startup(files, tmp_path, monkeypatch, capsys):
    """`t2i serve --classifier NAME=FILE` loads and checks each file with the served model before serving: a file
    of the wrong kind (a noise-aware CLIP for a DDPM, an ADM classifier for GLIDE) or of another noise schedule stops
    the start with one line naming NAME (it used to make every request naming it a 500 that showed the client the
    server's path); good files start the server."""
    import t2i.serve.server
    from t2i.cli import main
    from t2i.eval.shapes_clip import ShapesCLIP
    from t2i.nets.classifier import NoisyClassifier, NoisyClassifierConfig, save_noisy_classifier
    from t2i.nets.glide import preset
    from t2i.nets.glide_clip import from_clean, save_noisy_clip
    from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS
    from t2i.systems.ddpm import ddpm_schedule
    from t2i.systems.glide import GlideConfig, GlideNets, glide_schedule, save_glide, shapes_words
    from t2i.text.words import SPECIALS

    started = []
    monkeypatch.setattr(t2i.serve.server, "build_server",
                        lambda app, config, port: type("Server", (), {"run": lambda self: started.append(1)})())
    torch.manual_seed(0)
    cfg = GlideConfig(base=preset("tiny_base", len(SPECIALS) + len(shapes_words())))
    save_glide(GlideNets(cfg).base, None, cfg, tmp_path / "glide.safetensors")
    save_noisy_clip(from_clean(ShapesCLIP.load(), 16), glide_schedule(), tmp_path / "clip.safetensors")
    clf = NoisyClassifier(NoisyClassifierConfig(trunk=PIXEL_UNET_PRESETS["tiny_uncond"], num_classes=2))
    save_noisy_classifier(clf, tmp_path / "cosine.safetensors", ["red", "blue"], ddpm_schedule("squaredcos_cap_v2"))
    ddpm, glide, good = files / "ddpm.safetensors", tmp_path / "glide.safetensors", files / "colours.safetensors"
    right = {ddpm: good, glide: tmp_path / "clip.safetensors"}
    for model, file, problem in ((ddpm, tmp_path / "clip.safetensors", "classifier"),
                                 (ddpm, tmp_path / "cosine.safetensors", "another noise schedule"),
                                 (glide, good, "noise-aware CLIP"),
                                 (glide, tmp_path / "cosine.safetensors", "noise-aware CLIP")):
        capsys.readouterr()
        assert main(["serve", "--model", str(model), "--classifier", f"ok={right[model]}", "--classifier",
                     f"wrong={file}"]) == 2
        err = capsys.readouterr().err
        assert "--classifier wrong: " in err and problem in err and len(err.strip().splitlines()) == 1, err
    assert not started
    for model, file in right.items():
        assert main(["serve", "--model", str(model), "--classifier", f"c={file}"]) == 0
    assert len(started) == 2
