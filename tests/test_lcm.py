"""Latent consistency models (issue 20): the multistep LCM sampler, LCMScheduler's timesteps, the
U-Net's guidance-scale input, and diffusers' `LatentConsistencyModelPipeline` layout, each against
diffusers from the same seed."""

from __future__ import annotations

import pytest
import torch
from sd_oracles import build_lcm, build_sd1
from test_samplers_parity import SD1, SD2, AnalyticNet

import t2i
from t2i.checkpoints.diffusers_nets import unet_config_from_diffusers, unet_config_to_diffusers
from t2i.checkpoints.diffusers_scheduler import SchedulerConfigError, scheduler_config_from_dict
from t2i.nets.unet import UNet, guidance_scale_embedding
from t2i.samplers import SAMPLERS, prepare_sampling
from t2i.samplers.sampling import consistency_boundary_scalings, sample_lcm
from t2i.systems.stable_diffusion import export

diffusers = pytest.importorskip("diffusers")

SHAPE, SEED = (1, 4, 6, 6), 1234
TOLERANCE = 2e-4  # max |ours - diffusers| relative to the std of diffusers' final latents
PROMPT, SIZE = "a red circle above a blue square", 16


# ------------------------------------------------------------------ the sampler and its plan


def _lcm_scheduler(config: dict, steps: int):
    sched = diffusers.LCMScheduler.from_config(config)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 8, 50])
def test_timesteps_match_lcm_scheduler(steps):
    plan = prepare_sampling(scheduler_config_from_dict(SD1), "lcm", steps)
    expected = _lcm_scheduler(SD1, steps).timesteps
    assert plan.timesteps.tolist() == expected.float().tolist()
    assert plan.sigmas[-1] == 0 and plan.steps == steps
    if steps == 4:
        assert plan.timesteps.tolist() == [999, 759, 499, 259]


def _run_diffusers(config: dict, steps: int):
    sched = _lcm_scheduler(config, steps)
    net = AnalyticNet(sched.alphas_cumprod, config["prediction_type"])
    g = torch.Generator().manual_seed(SEED)
    latents = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        latents, denoised = sched.step(net(latents, t), t, latents, generator=g, return_dict=False)
    return denoised, net.seen


def _run_ours(config: dict, steps: int):
    cfg = scheduler_config_from_dict(config)
    plan = prepare_sampling(cfg, "lcm", steps)
    net = AnalyticNet(plan.alphas_cumprod, cfg.prediction_type)
    g = torch.Generator().manual_seed(SEED)
    x = plan.run(plan.limit_x0(plan.denoiser(net)), plan.start(torch.randn(SHAPE, generator=g)), generator=g)
    return plan.finish(x), net.seen


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("config", [SD1, SD2, dict(SD2, clip_sample=True, clip_sample_range=0.6)],
                         ids=["eps", "v", "v_clipped"])
def test_sampler_matches_lcm_scheduler(config, steps):
    """The analytic network through LCMScheduler's loop and through plan + sample_lcm: the same
    timesteps seen, the same final x0 (the re-noising draws from the same generator)."""
    ref, ref_t = _run_diffusers(config, steps)
    ours, our_t = _run_ours(config, steps)
    assert our_t == ref_t
    err = ((ours - ref).abs().max() / ref.std()).item()
    assert err < 1e-5, f"{steps} steps: relative error {err:.2e}"


def test_boundary_scalings_and_their_use():
    """c_skip -> 1, c_out -> 0 at t = 0 (the identity at the boundary); LCM's at t >= 19 are nearly
    (0, 1). sample_lcm applies c_skip to the VP latent x / sqrt(1 + sigma^2)."""
    c_skip, c_out = consistency_boundary_scalings(torch.tensor([0, 19, 999]))
    assert c_skip.tolist()[0] == 1.0 and c_out.tolist()[0] == 0.0
    assert 0 < c_skip[1] < 1e-5 and abs(c_out[1] - 1) < 1e-5
    x, sigma = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 0.0])

    def denoiser(x, s):
        return 0.1 * x + 1.0

    got = sample_lcm(denoiser, x, sigma, c_skip=torch.tensor([0.5]), c_out=torch.tensor([0.25]))
    torch.testing.assert_close(got, 0.25 * (0.1 * x + 1.0) + 0.5 * x / 10**0.5)
    # a later step re-noises to its sigma: x0 + sigma_next * z with z from the generator
    x0 = sample_lcm(denoiser, x, torch.tensor([3.0, 2.0]), generator=torch.Generator().manual_seed(5))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x0, 0.1 * x + 1.0 + 2.0 * z)


def test_lcm_settings_the_sampler_does_not_read_are_refused():
    with pytest.raises(SchedulerConfigError, match="original_inference_steps"):
        scheduler_config_from_dict(dict(SD1, original_inference_steps=25))
    with pytest.raises(SchedulerConfigError, match="timestep_scaling"):
        scheduler_config_from_dict(dict(SD1, timestep_scaling=5.0))
    scheduler_config_from_dict(dict(SD1, original_inference_steps=50, timestep_scaling=10))
    with pytest.raises(ValueError, match="at most"):
        prepare_sampling(scheduler_config_from_dict(SD1), "lcm", 51)
    with pytest.raises(ValueError, match="Karras"):
        prepare_sampling(scheduler_config_from_dict(SD1), "lcm", 4, karras=True)


@pytest.mark.parametrize("dim", [32, 33, 256])
def test_guidance_scale_embedding_is_diffusers(dim):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.0, 7.5, 14.25])
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert torch.equal(guidance_scale_embedding(w, dim), expected)


def test_unet_guidance_input_matches_diffusers():
    """`time_cond_proj_dim`: the config reads and writes back, the weights load strictly under
    diffusers' names (time_embedding.cond_proj.weight), the outputs agree with and without the
    w-embedding, and the embedding changes the output."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
                               cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                               time_cond_proj_dim=16).eval()
    cfg = unet_config_from_diffusers(dict(ref.config))
    assert cfg.time_cond_proj_dim == 16 and unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 259.0]), torch.randn(2, 5, 32)
    w = guidance_scale_embedding(torch.tensor([7.5, 2.0]), 16)
    with torch.no_grad():
        for cond in (w, None):
            expected = ref(x, t, ctx, timestep_cond=cond).sample
            torch.testing.assert_close(ours(x, t, ctx, timestep_cond=cond), expected, atol=1e-5, rtol=1e-5)
        assert (ours(x, t, ctx, timestep_cond=w) - ours(x, t, ctx)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        UNet(unet_config_from_diffusers({**dict(ref.config), "time_cond_proj_dim": None}))(x, t, ctx, timestep_cond=w)


# ------------------------------------------------------------------ the LatentConsistencyModelPipeline layout


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lcm") / "model"
    reference = build_lcm(folder)
    return reference, t2i.load(folder)


def _reference(pipe, steps: int, guidance: float, seed: int) -> torch.Tensor:
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
    return out.images


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape
    return ((got - expected).abs().max() / expected.std()).item()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_pipeline_final_latents_match_diffusers(lcm, steps):
    reference, ours = lcm
    expected = _reference(reference, steps, 8.5, seed=3)
    got = ours.generate(PROMPT, seed=3, steps=steps, width=SIZE, height=SIZE).latents  # defaults: lcm, 8.5
    err = _relative_error(got, expected)
    print(f"LCM pipeline, {steps} steps: relative error {err:.2e}")
    assert err < TOLERANCE, f"{steps} steps: relative error {err:.2e}"


def test_lcm_defaults_and_guidance_as_embedding(lcm):
    reference, ours = lcm
    d = ours.defaults
    assert (d.sampler, d.steps, d.guidance) == ("lcm", 4, 8.5)
    assert ours.embeds_guidance
    # another guidance scale is another w-embedding (no CFG batch), still diffusers' latents
    expected = _reference(reference, 2, 3.0, seed=4)
    got = ours.generate(PROMPT, seed=4, steps=2, guidance=3.0, width=SIZE, height=SIZE).latents
    assert _relative_error(got, expected) < TOLERANCE
    default = ours.generate(PROMPT, seed=4, steps=2, width=SIZE, height=SIZE).latents
    assert _relative_error(default, got) > 1e-2  # the embedding reaches the network
    res = ours.generate(PROMPT, "blurry", seed=4, steps=2, guidance=3.0, width=SIZE, height=SIZE)
    assert torch.equal(res.latents, got)  # no unconditional branch: the negative prompt is unused...
    assert any("negative prompt is ignored" in w for w in res.warnings)  # ...and the user is told


def test_sampler_lcm_on_plain_stable_diffusion(tmp_path):
    """`lcm` is a plain sampler: on an SD 1.x folder with CFG it matches diffusers'
    StableDiffusionPipeline with LCMScheduler."""
    reference = build_sd1(tmp_path / "sd1")
    ours = t2i.load(tmp_path / "sd1")
    assert "lcm" in SAMPLERS and "lcm" in ours.capabilities.samplers
    reference.scheduler = diffusers.LCMScheduler.from_config(reference.scheduler.config)
    for steps in (1, 4):
        out = reference(PROMPT, negative_prompt="blurry", num_inference_steps=steps, guidance_scale=5.0,
                        height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(3),
                        output_type="latent")
        got = ours.generate(PROMPT, "blurry", seed=3, steps=steps, guidance=5.0, sampler="lcm", width=SIZE,
                            height=SIZE).latents
        err = _relative_error(got, out.images)
        print(f"SD1 + lcm sampler, {steps} steps: relative error {err:.2e}")
        assert err < TOLERANCE


def test_exported_lcm_stays_an_lcm(lcm, tmp_path):
    """t2i's exporter writes an SD folder with LCMScheduler: t2i reads it back as the same LCM, and
    diffusers' StableDiffusionPipeline (which also feeds the w-embedding instead of CFG for such a
    U-Net) produces the same latents from it."""
    _oracle, ours = lcm
    folder = export(ours, tmp_path / "exported")
    again = t2i.load(folder)
    assert (again.defaults.sampler, again.defaults.steps, again.defaults.guidance) == ("lcm", 4, 8.5)
    got = again.generate(PROMPT, seed=1, steps=2, width=SIZE, height=SIZE).latents
    torch.testing.assert_close(got, ours.generate(PROMPT, seed=1, steps=2, width=SIZE, height=SIZE).latents)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    assert type(reference.scheduler).__name__ == "LCMScheduler"
    assert _relative_error(got, _reference(reference, 2, 8.5, seed=1)) < TOLERANCE
