"""What `t2i generate` writes, and what a PNG it wrote is good for (issues 14 and 15).

- The PNG `parameters` reproduce the image: for every option that changes pixels, the settings
  read back from the file regenerate exactly the same image (and leaving that option out would not).
- Seeds: unset or -1 draws a random seed, printed and stored (A1111).
- Warnings: a size other than the model's native one; words the shapes model never saw.
- Outputs are never overwritten unless --overwrite, refused before the model is even loaded; --out
  on a folder fails first and leaves no temporary file.
- --prompts-file resumes: outputs whose parameters match their line are skipped, an output that
  holds another prompt (the file was edited) is refused, not replaced.

All on tiny random shapes models (16x16) whose U-Net output is scaled by 8, so that every option
moves the pixels (DESIGN.md: a random tiny U-Net barely moves the latents otherwise).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import t2i
from t2i.autoencoders.preview import PREVIEW_DECODER_CONFIGS, PreviewDecoder
from t2i.cli import main
from t2i.data.shapes_vocab import out_of_world_warning, unknown_words
from t2i.imageio import parse_parameters, read_parameters, request_fields, save_png
from t2i.systems.base import GenerationRequest
from t2i.systems.shapes_ldm import write_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _loud(pipe):
    """The pipeline with its U-Net's output scaled by 8, so settings visibly change the image."""
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(8)
        pipe.unet.conv_out.bias.mul_(8)
    return pipe


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def pipes(tiny_path, tmp_path_factory) -> dict:
    """(model name, precision) -> pipeline, as a PNG's Model / Refiner / Precision name them."""
    refiner_path = write_tiny_model(tmp_path_factory.mktemp("models") / "refiner", seed=1)
    base = _loud(t2i.load(tiny_path))
    torch.manual_seed(0)
    base.preview_decoder = PreviewDecoder(PREVIEW_DECODER_CONFIGS["tiny"]).eval()
    return {("tiny", "fp32"): base, ("tiny", "bf16"): _loud(t2i.load(tiny_path, precision="bf16")),
            ("refiner", "fp32"): _loud(t2i.load(refiner_path))}


INIT = Image.new("RGB", (16, 16), (200, 30, 30))
BASE = {"prompt": "a red circle above a blue square", "seed": 11, "steps": 3, "sampler": "ddim"}
# option -> (settings with it, the same settings without it). Leaving the option out of the PNG
# would regenerate the second image, which differs: so each case can fail.
CASES = {
    "negative_prompt": ({"negative_prompt": "a green square"}, {}),
    "seed": ({"seed": 12}, {}),
    "steps": ({"steps": 4}, {}),
    "guidance": ({"guidance": 8.0}, {}),
    "sampler": ({"sampler": "euler_a"}, {}),
    "schedule": ({"sampler": "euler", "schedule": "karras"}, {"sampler": "euler"}),
    "eta": ({"eta": 1.0}, {}),
    "guidance_rescale": ({"guidance_rescale": 1.0}, {}),
    "size": ({"width": 24, "height": 32}, {}),
    "deepcache": ({"deepcache": 2}, {}),
    "strength": ({"init_image": INIT, "strength": 0.5}, {"init_image": INIT}),
    "refiner": ({"refiner": ("refiner", "fp32"), "refiner_start": 0.5}, {"refiner": ("refiner", "fp32")}),
    "preview": ({"preview": True}, {}),
    "precision": ({"precision": "bf16"}, {}),
}


def _run(pipes: dict, settings: dict) -> Image.Image:
    s = {**BASE, **settings}
    pipe = pipes[("tiny", s.pop("precision", "fp32"))]
    if "refiner" in s:
        s["refiner"] = pipes[s["refiner"]]
    return pipe.run(GenerationRequest(**s)).images[0]


@pytest.mark.parametrize("option", list(CASES))
def test_png_parameters_regenerate_the_image_for_every_option_that_changes_pixels(pipes, option, tmp_path):
    settings, without = CASES[option]
    image = _run(pipes, settings)
    assert image.tobytes() != _run(pipes, without).tobytes(), f"{option} does not change the pixels"
    save_png(image, tmp_path / "a.png", image.info["parameters"])

    fields = request_fields(parse_parameters(read_parameters(tmp_path / "a.png")))
    assert fields.pop("model") == "tiny"
    again = {k: v for k, v in fields.items() if v is not None}
    if "refiner" in again:
        again["refiner"] = (again["refiner"], "fp32")
    if "init_image" in settings:  # the input image itself is not metadata: the user gives it again
        again["init_image"] = settings["init_image"]
    assert _run(pipes, again).tobytes() == image.tobytes()


def test_parse_parameters_inverts_format_parameters_for_a1111_text():
    text = ("a (red:1.2) circle, on a gray background\nNegative prompt: blurry, dark\n"
            'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x48, '
            'Model: "my, model", Eta: 0.3, Denoising strength: 0.6')
    fields = request_fields(parse_parameters(text))
    assert fields == {"prompt": "a (red:1.2) circle, on a gray background", "negative_prompt": "blurry, dark",
                      "steps": 20, "sampler": "dpmpp_2m", "schedule": "karras", "guidance": 7.5, "seed": 42,
                      "width": 64, "height": 48, "model": "my, model", "eta": 0.3, "strength": 0.6,
                      "precision": "fp32"}


# ----------------------------------------------------------------------------- the CLI

def _generate(tiny_path: Path, *args: str) -> int:
    return main(["generate", "--model", str(tiny_path), "--steps", "1", "--precision", "fp32", "--quiet", *args])


def test_without_seed_or_with_minus_one_a_random_seed_is_printed_and_stored(tiny_path, tmp_path, capsys):
    seeds = []
    for i, extra in enumerate([[], ["--seed", "-1"], []]):
        assert _generate(tiny_path, "a red circle", "--out", str(tmp_path / f"{i}.png"), *extra) == 0
        printed = re.search(r"seed (\d+) \(random\)", capsys.readouterr().err)
        assert printed, "the random seed is not printed"
        stored = parse_parameters(read_parameters(tmp_path / f"{i}.png"))["Seed"]
        assert stored == printed.group(1)
        seeds.append(stored)
    assert len(set(seeds)) == 3  # 2**32 seeds: three draws never collide in practice


def test_a_size_other_than_the_native_one_is_warned_naming_the_native_size(tiny_path, tmp_path, capsys):
    assert _generate(tiny_path, "a red circle", "--width", "32", "--height", "32",
                     "--out", str(tmp_path / "big.png"), "--seed", "1") == 0
    err = capsys.readouterr().err
    assert "32x32" in err and "16x16" in err and "native" in err
    assert _generate(tiny_path, "a red circle", "--out", str(tmp_path / "native.png"), "--seed", "1") == 0
    assert "warning" not in capsys.readouterr().err


def test_out_of_world_words_are_named():
    assert unknown_words("a photo of a cat") == ["photo", "cat"]
    assert unknown_words("(a red:1.3) circle BREAK two crosses to the left of a square, on a gray background") == []
    assert unknown_words("there are three small green triangles in the top right corner") == []
    warning = out_of_world_warning("a photo of a cat")
    assert "'photo'" in warning and "'cat'" in warning
    assert out_of_world_warning("a red circle above a blue square") is None


def test_an_out_of_world_prompt_is_warned_on_the_shapes_model(tiny_path, tmp_path, capsys):
    """Needs the shapes family to return `out_of_world_warning` among result.warnings (the lead's line)."""
    assert _generate(tiny_path, "a photo of a cat", "--out", str(tmp_path / "cat.png"), "--seed", "1") == 0
    err = capsys.readouterr().err
    assert "warning" in err and "'cat'" in err and "'photo'" in err


@pytest.fixture
def no_loading(monkeypatch):
    """t2i.load fails the test: what is checked here must be refused before any model is loaded."""

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(t2i, "load", refuse)


def test_existing_outputs_are_refused_before_loading_the_model(tiny_path, tmp_path, capsys, no_loading):
    out = tmp_path / "a.png"
    out.write_bytes(b"precious")
    assert _generate(tiny_path, "x", "--out", str(out)) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"precious"
    # numbered files and --save-latents too
    (tmp_path / "b-1.png").write_bytes(b"precious")
    assert _generate(tiny_path, "x", "--out", str(tmp_path / "b.png"), "--num-images", "2") == 2
    assert "b-1.png" in capsys.readouterr().err
    (tmp_path / "lat.safetensors").write_bytes(b"precious")
    assert _generate(tiny_path, "x", "--out", str(tmp_path / "c.png"), "--save-latents",
                     str(tmp_path / "lat.safetensors")) == 2
    assert "lat.safetensors" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b-1.png", "lat.safetensors"]


def test_out_on_a_folder_fails_first_and_leaves_no_temp_file(tiny_path, tmp_path, capsys, no_loading):
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert _generate(tiny_path, "x", "--out", str(folder)) == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["pictures"]


def test_save_png_never_replaces_without_overwrite_and_leaves_no_temp_file(tmp_path):
    image = Image.new("RGB", (4, 4))
    (tmp_path / "a.png").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        save_png(image, tmp_path / "a.png", "p", overwrite=False)
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        save_png(image, tmp_path / "d", "p")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "d"]
    assert (tmp_path / "a.png").read_bytes() == b"precious"


def test_overwrite_allows_replacing(tiny_path, tmp_path):
    out = tmp_path / "a.png"
    out.write_bytes(b"old")
    assert _generate(tiny_path, "x", "--out", str(out), "--seed", "3", "--overwrite") == 0
    assert parse_parameters(read_parameters(out))["Seed"] == "3"


def _count_runs(monkeypatch) -> list[str]:
    """Record the prompt of every pipeline run."""
    from t2i.systems.latent_diffusion import LatentDiffusionPipeline

    prompts: list[str] = []
    real = LatentDiffusionPipeline.run

    def run(self, request):
        prompts.append(request.prompt)
        return real(self, request)

    monkeypatch.setattr(LatentDiffusionPipeline, "run", run)
    return prompts


def test_prompts_file_resumes_and_never_renames_another_prompts_image(tiny_path, tmp_path, capsys, monkeypatch):
    lines, out = tmp_path / "prompts.txt", tmp_path / "out"
    lines.write_text("a red circle\na blue square\n")
    args = ["--prompts-file", str(lines), "--out-dir", str(out), "--seed", "4"]
    runs = _count_runs(monkeypatch)
    assert _generate(tiny_path, *args) == 0
    assert runs == ["a red circle", "a blue square"]
    made = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sorted(made) == ["0000.png", "0001.png"]

    # Interrupted after the first line: only the second is generated again.
    (out / "0001.png").unlink()
    runs.clear()
    assert _generate(tiny_path, *args) == 0
    assert runs == ["a blue square"] and (out / "0000.png").stat().st_mtime_ns == made["0000.png"]
    assert "1 prompt(s) already done" in capsys.readouterr().err

    # Everything done: nothing runs.
    runs.clear()
    assert _generate(tiny_path, *args) == 0 and runs == []

    # Other settings are not "done": refused like another prompt.
    assert _generate(tiny_path, *args[:-1], "7") == 2
    assert "another prompt or other settings" in capsys.readouterr().err and runs == []

    # A line inserted at the top: 0000.png would now mean another prompt: refused before any work.
    lines.write_text("a green cross\na red circle\na blue square\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _generate(tiny_path, *args) == 2
    assert "0000.png" in capsys.readouterr().err and runs == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # --overwrite: the user says so; every file then holds its own line's prompt.
    assert _generate(tiny_path, *args, "--overwrite") == 0
    assert [parse_parameters(read_parameters(out / f"000{i}.png"))["prompt"] for i in range(3)] == [
        "a green cross", "a red circle", "a blue square"]


def test_prompts_file_without_seed_resumes_whatever_seed_was_drawn(tiny_path, tmp_path, monkeypatch):
    lines, out = tmp_path / "prompts.txt", tmp_path / "out"
    lines.write_text("a red circle\n")
    runs = _count_runs(monkeypatch)
    assert _generate(tiny_path, "--prompts-file", str(lines), "--out-dir", str(out)) == 0
    assert _generate(tiny_path, "--prompts-file", str(lines), "--out-dir", str(out)) == 0
    assert runs == ["a red circle"]



def test_a_file_that_appears_while_generating_is_not_replaced(tiny_path, tmp_path, capsys, monkeypatch):
    from t2i.systems.latent_diffusion import LatentDiffusionPipeline

    out = tmp_path / "a.png"
    real = LatentDiffusionPipeline.run

    def run(self, request):  # another process writes the output meanwhile
        out.write_bytes(b"theirs")
        return real(self, request)

    monkeypatch.setattr(LatentDiffusionPipeline, "run", run)
    assert _generate(tiny_path, "x", "--out", str(out), "--seed", "1") == 2
    assert "appeared while generating" in capsys.readouterr().err
    assert out.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
