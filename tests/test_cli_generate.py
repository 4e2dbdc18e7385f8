"""`t2i generate` on a tiny random diffusers folder: PNG with A1111 parameters, saved latents, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from safetensors.torch import load_file
from sd_oracles import build_sd1

from t2i.cli import main
from t2i.imageio import parse_parameters


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
           "--save-latents", str(lat)]
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
    import t2i

    again = t2i.load(sd1_folder).generate("a red circle", "blurry, dark", seed=5, steps=3, guidance=4,
                                          sampler="dpmpp_2m", schedule="karras", width=24, height=16)
    # equal up to float rounding: the subprocess may run on another number of threads
    assert ((latents - again.latents).abs().max() / again.latents.std()).item() < 1e-4


def test_num_images_writes_numbered_files(sd1_folder, tmp_path):
    out = tmp_path / "b.png"
    assert main(["generate", "x", "--model", str(sd1_folder), "--steps", "1", "--width", "16", "--height", "16",
                 "--num-images", "2", "--out", str(out), "--quiet"]) == 0
    seeds = [parse_parameters(Image.open(tmp_path / f"b-{i}.png").info["parameters"])["Seed"] for i in range(2)]
    assert seeds == ["0", "1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "20"], "multiple of 8"),
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--steps", "0"], "--steps must be at least 1"),
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
