"""DreamBooth with prior preservation as `t2i train lora --class-prompt` (issue 21): the class images are
the frozen model's own draws (seed i for image i), drawn once and reused on resume; the step loss is
instance + lambda * prior (DreamBooth eq. 2); lambda 0 is the plain run bit for bit and lambda 1 moves
the weights; a half-given prior is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import t2i
from t2i.adapters.lora import read_lora
from t2i.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

CLASS = "a square"
SIZE = 16


def train(model, data, out, *extra: str):
    args = ["train", "lora", "--model", str(model), "--data", "folder", "--data-path", str(data), "--out", str(out),
            "--image-every", "0", "--log-every", "1", "--batch-size", "2", "--sample-steps", "2",
            "--instance-prompt", "a sks square", *extra]
    assert main(args) == 0
    return out / "lora.safetensors"


def test_class_images_are_the_frozen_models_draws_and_are_reused(sd1_folder, tmp_path):
    model, data = sd1_folder
    out = tmp_path / "run"
    prior = ("--class-prompt", CLASS, "--class-images", "3", "--ckpt-every", "2", "--lr", "1e-2")
    train(model, data, out, "--steps", "2", *prior)
    files = sorted((out / "class_images").glob("*.png"))
    assert [f.name for f in files] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert (out / "class_images" / "class_00001.txt").read_text().strip() == CLASS
    expected = t2i.load(model).generate(CLASS, seed=1, steps=2, width=SIZE, height=SIZE).images[0]
    assert np.array_equal(np.asarray(Image.open(files[1])), np.asarray(expected))
    before = {f: f.stat().st_mtime_ns for f in files}
    train(model, data, out, "--steps", "4", "--resume")
    assert {f: f.stat().st_mtime_ns for f in sorted((out / "class_images").glob("*.png"))} == before


def test_the_step_loss_is_instance_plus_lambda_prior(sd1_folder, tmp_path):
    model, data = sd1_folder
    train(model, data, tmp_path / "run", "--steps", "2", "--class-prompt", CLASS, "--class-images", "2",
          "--prior-weight", "0.5")
    lines = [dict(kv.split("=") for kv in line.split()[2:]) for line in (tmp_path / "run" / "log.txt").read_text()
             .splitlines() if "lora/prior_loss=" in line]
    assert len(lines) == 2
    for row in lines:
        inst, prior, total = (float(row[k]) for k in ("lora/instance_loss", "lora/prior_loss", "lora/loss"))
        assert prior > 0 and total == pytest.approx(inst + 0.5 * prior, rel=1e-4)


def test_lambda_zero_is_the_plain_run_and_the_prior_term_moves_the_weights(sd1_folder, tmp_path):
    """With lambda 0 the class batch changes nothing (same bits as a run without a prior: the class images
    take no random numbers from the instance term); with lambda 1 its gradient moves the LoRA."""
    model, data = sd1_folder
    common = ("--steps", "3", "--lr", "1e-2")
    prior = ("--class-prompt", CLASS, "--class-images", "2")
    runs = {name: read_lora(train(model, data, tmp_path / name, *common, *extra))[0]
            for name, extra in (("none", ()), ("zero", (*prior, "--prior-weight", "0")),
                                ("one", (*prior, "--prior-weight", "1")))}
    ups = {name: torch.cat([layer.up.flatten() for layer in layers.values()]) for name, layers in runs.items()}
    assert ups["none"].abs().max() > 0  # trained: up starts at zero
    assert torch.equal(ups["zero"], ups["none"])
    assert (ups["one"] - ups["none"]).abs().max() > 1e-3 * ups["none"].abs().max()


@pytest.mark.parametrize(("extra", "message"), [
    (("--class-images", "3"), "--class-images needs --class-prompt"),
    (("--class-prompt", CLASS), "--class-prompt needs --class-images"),
])
def test_a_half_given_prior_is_refused(sd1_folder, tmp_path, capsys, extra, message):
    model, data = sd1_folder
    args = ["train", "lora", "--model", str(model), "--data", "folder", "--data-path", str(data),
            "--out", str(tmp_path / "run"), "--steps", "1", *extra]
    assert main(args) != 0
    assert message in capsys.readouterr().err
    assert torch.get_num_threads() == 1
