"""An SDXL folder ships an EulerDiscreteScheduler config; sampled with --sampler ddim it must
land where diffusers' `DDIMScheduler.from_config(that config)` lands (issue 16).

That config states no clip_sample, so diffusers' DDIM takes its class default and clips x0 to
+-1, and so must we. With the 8x-scaled random U-Net the x0 estimates reach +-60, so clipping
collapses the final latents into [-1, 1] (std 0.7 instead of 17.6 without clipping) while
float32 rounding of the x0 estimates stays what it is without clipping (~2e-4 absolute,
measured: 1.9e-4 unclipped, 3.5e-4 clipped, seed 3). Relative to the clipped latents' std that
reads 4.9e-4 here (1.7e-3 in the issue's run), which is no settings gap: the settings agree to
6e-7 with an analytic network (test_samplers_parity.test_parity_with_a_config_saved_by_another_
scheduler). The check is therefore absolute, on latents the clip bounds to [-1, 1].
"""

from __future__ import annotations

import json

import pytest
from sd_oracles import build_sdxl, reference_latents

import t2i

pytest.importorskip("diffusers")

TOLERANCE = 1e-3  # max |ours - diffusers| on latents in [-1, 1]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "model"
    reference = build_sdxl(folder)
    return folder, reference, t2i.load(folder)


def test_ddim_on_an_euler_config_matches_diffusers(sdxl, seed=3):
    folder, reference, ours = sdxl
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EulerDiscreteScheduler" and "clip_sample" not in saved
    prompt, steps, guidance = "a red circle above a blue square", 8, 5.0
    expected = reference_latents(reference, prompt, "ddim", False, steps, guidance, seed, 16)
    assert reference.scheduler.config.clip_sample  # DDIM's class default
    got = ours.generate(prompt, seed=seed, steps=steps, guidance=guidance, sampler="ddim", width=16,
                        height=16).latents
    assert expected.abs().max() == 1.0 and got.abs().max() == 1.0  # both clipped
    err = (got - expected).abs().max().item()
    print(f"seed {seed}: max abs error {err:.2e}, relative to std {err / expected.std().item():.2e}")
    assert err < TOLERANCE
