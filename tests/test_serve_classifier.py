"""Classifier guidance through `t2i serve`: a request names a classifier the server was started with
(`--classifier NAME=FILE`) in `classifier` / `classifier_scale` on our jobs API, A1111's routes and the OpenAI
route, and the served DDPM guides with it; a path or an unknown name is a 422 naming the field (clients never
choose which files the server reads), and a model without classifier guidance refuses both fields by name."""

from __future__ import annotations

import base64
import io

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
    from t2i.systems.dalle import SPECIALS
    from t2i.systems.glide import GlideConfig, GlideNets, glide_schedule, save_glide, shapes_words

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
    assert np.abs(pixels(guided["b64_json"]) - pixels(plain["b64_json"])).max() > 8  # measured: 197
    assert parse_parameters(guided["parameters"])["Classifier"] == "clip"  # the file's name, as `t2i generate`
