"""Every sampler draws pictures with the built-in model (issue 14 item 1).

ddim and ddpm once gave coloured noise: the model's schedule left clip_sample unset, so
diffusers' DDIM/DDPM default (clip x0 to +-1) applied to latents that reach +-3.6. The
smoke test's three counts do not see all of it (DDPM's noise keeps a dominant background
colour and the named colour somewhere), so the judge's stray objects are counted too:
measured at these settings, 0-3 per image for every sampler, 5-26 with clipping.
"""

from __future__ import annotations

import pytest
from test_default_model import SMOKE_FLOORS, SMOKE_N, _first

import t2i
from t2i.diffusion.schedules import ScheduleConfig
from t2i.samplers import SAMPLERS, prepare_sampling
from t2i.systems.shapes_ldm import ShapesLDMConfig

N = 3  # prompts of each family per sampler (the smoke test's floors scaled down, rounded down)
STEPS = 10
MAX_STRAY = 3 * 2 * N  # detections beyond the objects the prompts name, over all 2N images


@pytest.fixture(scope="module")
def pipe():
    return t2i.load()


def smoke_scores(images, singles: list[str], backgrounds: list[str]) -> dict[str, int]:
    """The judge smoke test's three counts: backgrounds named, requested colours present, full
    verdicts on single objects (images: the singles' images, then the backgrounds'); and
    "stray": objects found beyond those the prompts name, summed over the images."""
    from t2i.data.shapes.prompts import parse_prompt
    from t2i.eval.shapes_judge import analyse, judge

    n = len(singles)
    found = [analyse(im) for im in images]
    return {
        "background": sum(bg == parse_prompt(p).background for (bg, _), p in zip(found[n:], backgrounds, strict=True)),
        "colour": sum(any(d.colour == parse_prompt(p).objects[0].colour for d in dets)
                      for (_, dets), p in zip(found[:n], singles, strict=True)),
        "judge": sum(judge(im, p).ok for im, p in zip(images[:n], singles, strict=True)),
        "stray": sum(max(len(dets) - sum(o.count for o in parse_prompt(p).objects), 0)
                     for (_, dets), p in zip(found, singles + backgrounds, strict=True)),
    }


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_passes_the_smoke_floor(pipe, sampler):
    singles, backgrounds = _first("single", N), _first("background", N)
    images = pipe.generate(singles + backgrounds, seed=[0] * (2 * N), steps=STEPS, sampler=sampler).images
    scores = smoke_scores(images, singles, backgrounds)
    floors = {k: v * N // SMOKE_N for k, v in SMOKE_FLOORS.items()}
    print(sampler, scores)
    assert all(scores[k] >= floors[k] for k in floors), (sampler, scores, floors)
    assert scores["stray"] <= MAX_STRAY, (sampler, scores)


def test_t2i_schedules_state_every_sampler_setting():
    """A t2i model's schedule never leaves a setting to a diffusers class default, and an older
    file that stored None for them reads as t2i's explicit choice (no clipping)."""
    cfg = ShapesLDMConfig().schedule
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.thresholding, cfg.steps_offset) == (False, True, False, 0)
    assert cfg.timestep_spacing == "trailing" and cfg.final_sigmas_type == "zero"
    old = dict(ShapesLDMConfig().to_dict()["schedule"], clip_sample=None, set_alpha_to_one=None,
               final_sigmas_type=None)
    old.pop("class_defaults")
    again = ScheduleConfig(**old)
    assert again == cfg
    for sampler in ("ddim", "ddpm"):
        assert prepare_sampling(again, sampler, 10).x0_limit is None


def test_ddim_is_euler_on_the_built_in_model(pipe):
    """Without clipping, DDIM (eta 0) is the Euler step in sigma space: on the same trailing
    sigmas the two differ only by the start (sqrt(1 + sigma_max^2) vs sigma_max, 2e-5 apart)."""
    args = dict(seed=5, steps=10, guidance=4.0, width=64, height=64)
    ddim = pipe.generate("a red circle on a white background", sampler="ddim", **args).latents
    euler = pipe.generate("a red circle on a white background", sampler="euler", **args).latents
    err = ((ddim - euler).abs().max() / euler.std()).item()
    assert err < 1e-3, err
