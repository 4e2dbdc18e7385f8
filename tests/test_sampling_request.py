"""One request check for the diffusion families (`t2i.systems.base.check_sampling_request`): each setting it
refuses is named, and the pixel / transformer diffusion families that call it refuse the same bad request with
the same message before any work."""

from __future__ import annotations

import math

import pytest

import t2i
from t2i.systems.base import GenerationRequest, check_sampling_request
from t2i.systems.registry import system

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = GenerationRequest("a red circle", sampler="ddim", schedule="default", steps=2, guidance=3.0, width=32,
                         height=32)


@pytest.mark.parametrize("change, message", [
    ({"sampler": "nope"}, "unknown sampler 'nope'; choose one of ddim, euler"),
    ({"schedule": "nope"}, "unknown schedule 'nope'; choose one of default, karras"),
    ({"steps": 0}, "steps must be at least 1, got 0"),
    ({"width": 24}, "width must be a positive multiple of 16, got 24"),
    ({"height": 0}, "height must be a positive multiple of 16, got 0"),
    ({"guidance": math.inf}, "guidance must be a finite number, got inf"),
    ({"classifier_scale": math.nan}, "classifier_scale must be a finite number, got nan"),
])
def test_each_bad_setting_is_named(change, message):
    from dataclasses import replace

    check_sampling_request(GOOD, ("ddim", "euler"), ("default", "karras"), 16)  # the good request passes
    with pytest.raises(ValueError) as e:
        check_sampling_request(replace(GOOD, **change), ("ddim", "euler"), ("default", "karras"), 16)
    assert str(e.value) == message


def test_a_family_without_schedules_or_sizes_skips_those_checks():
    check_sampling_request(GenerationRequest("x", sampler="ddim", schedule="anything", width=7, height=5, steps=1,
                                             guidance=1.0), ("ddim",))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: t2i.load(system(f).write_tiny(root / f, 0)) for f in ("ddpm", "glide", "deepfloyd_if", "dit", "unclip")}


@pytest.mark.parametrize("family", ["ddpm", "glide", "deepfloyd_if", "dit", "unclip"])
@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps must be at least 1, got 0"),  # was each plan's own (">= 1"; unCLIP's "at least 2")
    ({"guidance": math.nan}, "guidance must be a finite number, got nan"),
    ({"classifier_scale": math.inf}, "classifier_scale must be a finite number, got inf"),  # was GLIDE's only
    ({"sampler": "nope"}, "unknown sampler 'nope'; choose one of "),  # unCLIP said "samples with"
])
def test_the_diffusion_families_refuse_a_bad_request_alike(pipes, family, change, message):
    pipe = pipes[family]
    prompt = next(iter(sorted(pipe.labels))) if family == "dit" and pipe.labels else "a red circle"
    with pytest.raises(ValueError) as e:
        pipe.generate(prompt, seed=0, **change)
    assert str(e.value).startswith(message)


@pytest.fixture(scope="module")
def latent_pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_families")
    return {f: t2i.load(system(f).write_tiny(root / f, 0)) for f in ("shapes_ldm", "pixart", "ediffi")}


@pytest.mark.parametrize("family", ["shapes_ldm", "pixart", "ediffi"])
@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps must be at least 1, got 0"),  # was taken as "unset": the default steps ran
    ({"guidance": math.nan}, "guidance must be a finite number, got nan"),
    ({"sampler": "nope"}, "unknown sampler 'nope'; choose one of "),
    ({"schedule": "nope"}, "unknown schedule 'nope'; choose one of default, karras"),
])
def test_the_latent_families_refuse_a_bad_request_alike(latent_pipes, family, change, message):
    with pytest.raises(ValueError) as e:
        latent_pipes[family].generate("a red circle", seed=0, **change)
    assert str(e.value).startswith(message)
