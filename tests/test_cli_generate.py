"""`t2i generate` on a tiny random diffusers folder: PNG with A1111 parameters, saved latents, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from safetensors.torch import load_file
from sd_oracles import build_sd1

import t2i
from t2i.cli import main
from t2i.imageio import parse_parameters
from t2i.systems.base import Capabilities, GenerationDefaults, GenerationRequest
from t2i.systems.shapes_ldm import write_tiny_model


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "tiny-sd1"
    build_sd1(folder)
    return folder


def test_generate_writes_png_with_parameters_and_latents(sd1_folder, tmp_path):
    out, lat = tmp_path / "a.png", tmp_path / "lat.safetensors"
    # A real process through the console entry point, as a user runs it.
    cmd = [sys.executable, "-m", "t2i.cli", "generate", "a red circle", "--model", str(sd1_folder),
           "--sampler", "dpmpp_2m", "--schedule", "karras", "--steps", "3", "--guidance", "4", "--seed", "5",
           "--width", "24", "--height", "16", "--negative-prompt", "blurry, dark", "--out", str(out),
           "--save-latents", str(lat), "--precision", "fp32"]  # auto would pick bf16 on a bf16 CPU
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    image = Image.open(out)
    assert image.size == (24, 16)
    params = parse_parameters(image.info["parameters"])
    assert params["prompt"] == "a red circle"
    assert params["negative_prompt"] == "blurry, dark"
    assert (params["Steps"], params["Sampler"], params["Schedule type"]) == ("3", "DPM++ 2M", "Karras")
    assert (params["CFG scale"], params["Seed"], params["Size"]) == ("4.0", "5", "24x16")
    latents = load_file(lat)["latents"]
    assert latents.shape == (1, 4, 8, 12)
    # The saved latents are the ones the image was decoded from.
    again = t2i.load(sd1_folder).generate("a red circle", "blurry, dark", seed=5, steps=3, guidance=4,
                                          sampler="dpmpp_2m", schedule="karras", width=24, height=16)
    # equal up to float rounding: the subprocess may run on another number of threads
    assert ((latents - again.latents).abs().max() / again.latents.std()).item() < 1e-4


def test_num_images_writes_numbered_files(sd1_folder, tmp_path):
    out = tmp_path / "b.png"
    assert main(["generate", "x", "--model", str(sd1_folder), "--steps", "1", "--width", "16", "--height", "16",
                 "--num-images", "2", "--out", str(out), "--quiet", "--seed", "0"]) == 0
    seeds = [parse_parameters(Image.open(tmp_path / f"b-{i}.png").info["parameters"])["Seed"] for i in range(2)]
    assert seeds == ["0", "1"]


def test_an_empty_prompt_generates_unconditionally(sd1_folder, tmp_path):
    out = tmp_path / "empty.png"  # "" is a prompt (unconditional; unCLIP variations take one), not a missing one
    assert main(["generate", "", "--model", str(sd1_folder), "--steps", "1", "--width", "16", "--height", "16",
                 "--out", str(out), "--quiet", "--seed", "0"]) == 0
    assert Image.open(out).size == (16, 16)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "20"], "multiple of 8"),
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--guidance", "-3"], "--guidance must be 0 or more"),
        (["--guidance", "nan"], "--guidance must be 0 or more"),
        (["--seed", "-2"], "--seed must be -1 (random) or at least 0"),
    ],
)
def test_bad_settings_are_one_line_errors(sd1_folder, tmp_path, capsys, args, message):
    code = main(["generate", "x", "--model", str(sd1_folder), "--out", str(tmp_path / "c.png"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_missing_and_malformed_model_folders(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "nowhere")]) == 2
    assert "model not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert main(["generate", "x", "--model", str(broken)]) == 2
    assert "missing" in capsys.readouterr().err
    (broken / "model_index.json").write_text("{not json")
    assert main(["generate", "x", "--model", str(broken)]) == 2
    assert "malformed JSON" in capsys.readouterr().err


class NoEta:
    """A Pipeline whose family takes no eta (as a token model would not): `t2i generate` must refuse
    --eta by name before any work, through the protocol alone."""

    name, family = "no-eta-model", "test_family"
    defaults = GenerationDefaults(width=16, height=16)
    capabilities = Capabilities(options=frozenset({"steps", "width", "height"}), native_size=(16, 16))

    def run(self, request):
        raise AssertionError("run() was called although the request must be refused")


def test_an_option_the_model_cannot_honour_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    loaded = []
    monkeypatch.setattr(t2i, "load", lambda model=None, **k: loaded.append(model) or NoEta())
    for flag, option in ((["--eta", "0.5"], "'eta'"), (["--refiner", "some/refiner"], "'refiner'")):
        assert main(["generate", "a red circle", *flag, "--out", str(tmp_path / "a.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and option in err[0] and "no-eta-model" in err[0]
    assert loaded == [None, None]  # the model only: the refiner is refused before it is loaded
    assert list(tmp_path.iterdir()) == []


def test_model_by_shipped_name(tmp_path):
    """--model NAME: the built-in model by its shipped name, the same image as the Python API's."""
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--model", "t2i-shapes", "--steps", "2", "--seed", "3",
                 "--precision", "fp32", "--out", str(out), "--quiet"]) == 0
    api = t2i.load("t2i-shapes").run(GenerationRequest("a red circle", seed=3, steps=2)).images[0]
    assert Image.open(out).convert("RGB").tobytes() == api.tobytes()
    assert parse_parameters(Image.open(out).info["parameters"])["Model"] == "t2i-shapes"


def test_prompts_file_and_a_prompt_together_is_an_error(tmp_path, capsys):
    lines = tmp_path / "p.txt"
    lines.write_text("a red circle\n")
    assert main(["generate", "a blue square", "--prompts-file", str(lines), "--out-dir", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    # options of the other mode are refused too, not silently ignored
    for extra in (["--out", str(tmp_path / "a.png")], ["--save-latents", str(tmp_path / "l.safetensors")]):
        assert main(["generate", "--prompts-file", str(lines), "--out-dir", str(tmp_path / "o"), *extra]) == 2
        assert extra[0] in capsys.readouterr().err
    assert main(["generate", "a blue square", "--out-dir", str(tmp_path / "o")]) == 2
    assert "--out-dir is for --prompts-file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [lines]


def test_prompts_file_prints_the_truncation_warning_per_prompt(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "tiny")  # a 32-token text window
    lines = tmp_path / "p.txt"
    lines.write_text("a red circle\n" + " ".join(["a red circle and a blue square"] * 6) + "\n")
    assert main(["generate", "--model", str(model), "--prompts-file", str(lines), "--out-dir", str(tmp_path / "o"),
                 "--steps", "1", "--seed", "0", "--quiet"]) == 0
    cut = [ln for ln in capsys.readouterr().err.splitlines() if "was cut" in ln]
    assert len(cut) == 1 and "line 2" in cut[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"t2i {t2i.__version__}"
