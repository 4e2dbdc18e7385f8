"""The Stable Diffusion family module: its tiny model, its defaults per layout, and `t2i convert` through
the registry (issue 16)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

import t2i
from t2i.checkpoints.io import load_state_dict
from t2i.cli import main
from t2i.systems.registry import resolve, system
from t2i.systems.stable_diffusion import SYSTEM, generation_defaults, parts_of


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return SYSTEM.write_tiny(tmp_path_factory.mktemp("sd"), seed=3)


def test_tiny_model_is_a_diffusers_folder_the_registry_finds_and_generates(tiny):
    assert (tiny / "model_index.json").is_file()
    assert resolve(tiny) == (SYSTEM, tiny)
    pipe = t2i.load(tiny)
    assert pipe.family == "stable_diffusion"
    assert (pipe.defaults.width, pipe.defaults.steps, pipe.defaults.guidance, pipe.defaults.sampler) == (
        32, 20, 7.5, "euler")
    images = [np.asarray(pipe("a red circle", seed=s, steps=3)[0], dtype=float) for s in (0, 1)]
    assert images[0].shape == (32, 32, 3)
    assert np.abs(images[0] - images[1]).mean() > 1  # the seed changes the picture
    # same seed, same folder: the same weights (write_tiny is deterministic in its seed)
    again = SYSTEM.write_tiny(tiny.parent / "again", seed=3)
    a, b = load_state_dict(tiny / "unet" / "diffusion_pytorch_model.safetensors"), load_state_dict(
        again / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_defaults_follow_the_layout_the_scheduler_and_the_stored_settings(tiny):
    parts = parts_of(t2i.load(tiny))
    xl = generation_defaults(dataclasses.replace(parts, layout="sdxl", scheduler_class="DDIMScheduler", defaults={}))
    assert (xl.steps, xl.guidance, xl.sampler) == (30, 5.0, "ddim")
    pndm = generation_defaults(dataclasses.replace(parts, scheduler_class="PNDMScheduler", defaults={}))
    assert (pndm.steps, pndm.guidance, pndm.sampler) == (20, 7.5, "euler")
    stored = generation_defaults(dataclasses.replace(parts, defaults={"steps": 7, "sampler": "heun", "other": 1}))
    assert (stored.steps, stored.sampler) == (7, "heun")
    for bad in ({"steps": "many"}, {"steps": 0}, {"guidance": float("nan")}, {"width": True}):
        with pytest.raises(ValueError, match="stored default"):
            generation_defaults(dataclasses.replace(parts, defaults=bad))


def test_scheduler_class_of_the_folder_sets_the_sampler(tiny, tmp_path):
    folder = tmp_path / "ddim"
    shutil.copytree(tiny, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "DDIMScheduler"}))
    assert t2i.load(folder).defaults.sampler == "ddim"


def test_convert_refuses_a_family_that_cannot_export(tmp_path, capsys):
    shapes = system("shapes_ldm").write_tiny(tmp_path / "shapes", 0)
    assert main(["convert", str(shapes), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shapes_ldm" in err[0] and "cannot export" in err[0]
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_round_trip_of_the_tiny_model(tiny, tmp_path):
    assert main(["convert", str(tiny), str(tmp_path / "m.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back")]) == 0
    src, back = (load_state_dict(f / "unet" / "diffusion_pytorch_model.safetensors") for f in (tiny, tmp_path / "back"))
    assert src.keys() == back.keys() and all(np.array_equal(src[k].numpy(), back[k].numpy()) for k in src)
