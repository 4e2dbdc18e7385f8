"""Noise schedules, spacings, the denoiser contract, the training loss and the config reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from t2i.checkpoints.diffusers_scheduler import (
    SchedulerConfigError,
    read_scheduler_config,
    scheduler_config_dict,
    scheduler_config_from_dict,
    write_scheduler_config,
)
from t2i.diffusion.denoiser import DiscreteDenoiser
from t2i.diffusion.losses import DiffusionLoss
from t2i.diffusion.schedules import (
    ZERO_SNR_ACP,
    ScheduleConfig,
    add_noise,
    alphas_cumprod_from_betas,
    dpm_timesteps,
    karras_sigmas,
    make_betas,
    rescale_zero_terminal_snr,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    vp_scale,
)
from t2i.samplers import prepare_sampling

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("schedule,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                                ("squaredcos_cap_v2", 1e-4, 0.02)])
def test_betas_match_diffusers_bitwise(schedule, start, end):
    ref = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=start, beta_end=end)
    betas = make_betas(schedule, 1000, start, end)
    assert torch.equal(betas, ref.betas)
    assert torch.equal(alphas_cumprod_from_betas(betas), ref.alphas_cumprod)


def test_cosine_alias_and_unknown_schedule():
    assert torch.equal(make_betas("cosine"), make_betas("squaredcos_cap_v2"))
    assert make_betas("cosine").max().item() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("sigmoid")


def test_zero_terminal_snr():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as ref_rescale

    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), ref_rescale(betas), atol=0, rtol=0)
    acp = alphas_cumprod_from_betas(betas, zero_terminal_snr=True)
    assert acp[-1].item() == ZERO_SNR_ACP  # finite sigma_max, as diffusers' Euler/DPM
    assert acp[0].item() == pytest.approx(alphas_cumprod_from_betas(betas)[0].item(), rel=1e-6)
    ref = diffusers.EulerDiscreteScheduler(rescale_betas_zero_snr=True, **SD)
    assert torch.equal(acp, ref.alphas_cumprod)
    assert sigmas_from_alphas_cumprod(acp)[-1].item() == pytest.approx(4096.0, rel=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 25, 50])
def test_spacings_match_every_diffusers_scheduler(spacing, steps):
    for cls, integer in [(diffusers.DDIMScheduler, True), (diffusers.DDPMScheduler, True),
                         (diffusers.EulerDiscreteScheduler, False), (diffusers.HeunDiscreteScheduler, False)]:
        sched = cls(timestep_spacing=spacing, steps_offset=1)
        sched.set_timesteps(steps)
        ts = torch.from_numpy(spaced_timesteps(spacing, 1000, steps, 1, integer=integer))
        ref = sched.timesteps if cls is not diffusers.HeunDiscreteScheduler else sched.timesteps[::2]
        assert torch.equal(ts.to(ref.dtype), ref), (cls.__name__, ts, ref)
    dpm = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=1)
    dpm.set_timesteps(steps)
    assert torch.equal(torch.from_numpy(dpm_timesteps(spacing, 1000, steps, 1)), dpm.timesteps)


def test_karras_sigmas_golden():
    sig = karras_sigmas(0.0292, 14.6146, 5)
    np.testing.assert_allclose(sig, [14.6146, 4.797174, 1.274516, 0.248104, 0.0292], rtol=1e-6)
    ramp = np.linspace(0, 1, 5)
    hi, lo = 14.6146 ** (1 / 7), 0.0292 ** (1 / 7)
    np.testing.assert_allclose(sig ** (1 / 7), hi + ramp * (lo - hi))  # linear in sigma^(1/rho)


def test_sigma_to_t_matches_diffusers_and_the_denoiser_fallback():
    sched = diffusers.EulerDiscreteScheduler(**SD)
    table = np.array(((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5)
    log_table = np.log(table)
    sig = np.concatenate([karras_sigmas(0.0292, 14.6146, 17), table[[0, 1, 500, 999]].astype(np.float64)])
    ours = sigma_to_t(sig, log_table)
    np.testing.assert_array_equal(ours, sched._sigma_to_t(sig, log_table))
    # near-integer at table sigmas (float32 log table vs float64 sigma: not exact, hence the pins)
    np.testing.assert_allclose(ours[-4:], [0, 1, 500, 999], atol=1e-5)
    den = DiscreteDenoiser(lambda x, t: x, sched.alphas_cumprod)
    # the torch fallback of the denoiser agrees up to the float32 rounding of sigma
    torch.testing.assert_close(den.sigma_to_t(torch.from_numpy(sig).float()), torch.from_numpy(ours).float(),
                               atol=2e-4, rtol=0)


def test_pinned_timesteps_win_over_interpolation():
    acp = alphas_cumprod_from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    den = DiscreteDenoiser(lambda x, t: x, acp)
    sig = torch.tensor([14.6146, 3.0, 0.5])
    pinned = den.with_timesteps(sig, torch.tensor([999.0, 700.0, 123.0]))
    assert pinned.net is den.net
    assert pinned.sigma_to_t(torch.tensor([3.0, 0.5, 14.6146])).tolist() == [700.0, 123.0, 999.0]
    other = torch.tensor([1.7])
    assert pinned.sigma_to_t(other).item() == den.sigma_to_t(other).item()  # unpinned: interpolation
    with pytest.raises(ValueError):
        den.with_timesteps(sig, torch.zeros(2))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_denoiser_preconditioning(prediction):
    acp = alphas_cumprod_from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    seen = {}

    def net(x_vp, t):
        seen["x"], seen["t"] = x_vp, t
        return torch.full_like(x_vp, 0.25)

    den = DiscreteDenoiser(net, acp, prediction)
    t = 400
    sigma = sigmas_from_alphas_cumprod(acp)[t]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2
    d = den(x, sigma)
    a = acp[t]
    torch.testing.assert_close(seen["x"], x * a.sqrt())  # c_in: VE -> VP
    assert seen["t"].tolist() == [400.0, 400.0]
    x_vp = x * a.sqrt()
    if prediction == "epsilon":  # x0 = (x_vp - sqrt(1-a) eps) / sqrt(a)
        ref = (x_vp - (1 - a).sqrt() * 0.25) / a.sqrt()
    elif prediction == "v_prediction":  # x0 = sqrt(a) x_vp - sqrt(1-a) v
        ref = a.sqrt() * x_vp - (1 - a).sqrt() * 0.25
    else:
        ref = torch.full_like(x, 0.25)
    torch.testing.assert_close(d, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        DiscreteDenoiser(net, acp, "flow")


def test_add_noise_is_diffusers_add_noise_in_ve_form():
    sched = diffusers.DDPMScheduler(**SD)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    t = torch.tensor([10, 800])
    sigma = sigmas_from_alphas_cumprod(sched.alphas_cumprod)[t]
    ours = add_noise(x0, noise, sigma) * vp_scale(sigma).reshape(2, 1, 1, 1)
    torch.testing.assert_close(ours, sched.add_noise(x0, noise, t), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_loss_targets_and_weights(prediction):
    acp = alphas_cumprod_from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    sched = diffusers.DDPMScheduler(**SD)
    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    net = torch.nn.Conv2d(4, 4, 1)
    torch.nn.init.constant_(net.weight, 0.1)
    torch.nn.init.zeros_(net.bias)

    def model(x, t):
        return net(x)

    loss = DiffusionLoss(acp, prediction)(model, x0, None, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = sched.add_noise(x0, noise, t)
    target = {"epsilon": noise, "v_prediction": sched.get_velocity(x0, noise, t), "sample": x0}[prediction]
    ref = ((net(x_t) - target) ** 2).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert net.weight.grad.abs().sum() > 0
    # a DiscreteDenoiser is unwrapped to its network
    again = DiffusionLoss(acp, prediction)(DiscreteDenoiser(model, acp, prediction), x0, None,
                                           torch.Generator().manual_seed(5))
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def test_min_snr_weights():
    acp = alphas_cumprod_from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    t = torch.tensor([0, 500, 999])
    snr = acp[t] / (1 - acp[t])
    eps_w = DiffusionLoss(acp, "epsilon", min_snr_gamma=5.0).weights(t)
    v_w = DiffusionLoss(acp, "v_prediction", min_snr_gamma=5.0).weights(t)
    torch.testing.assert_close(eps_w, snr.clamp(max=5) / snr)
    torch.testing.assert_close(v_w, snr.clamp(max=5) / (snr + 1))
    assert eps_w[0].item() < 0.01 and eps_w[2].item() == pytest.approx(1.0)
    assert DiffusionLoss(acp, "epsilon").weights(t).tolist() == [1.0, 1.0, 1.0]


def test_reads_a_saved_diffusers_config(tmp_path):
    sched = diffusers.DDIMScheduler(prediction_type="v_prediction", steps_offset=1, set_alpha_to_one=False,
                                    clip_sample=False, timestep_spacing="trailing", **SD)
    sched.save_config(tmp_path / "scheduler")
    cfg = read_scheduler_config(tmp_path)
    assert cfg == read_scheduler_config(tmp_path / "scheduler" / "scheduler_config.json")
    assert (cfg.prediction_type, cfg.steps_offset, cfg.set_alpha_to_one, cfg.timestep_spacing) == (
        "v_prediction", 1, False, "trailing")
    assert torch.equal(cfg.alphas_cumprod(), sched.alphas_cumprod)
    assert cfg.use_karras_sigmas is False and cfg.final_sigmas_type == "zero"  # every class's default
    assert cfg.class_defaults and "class_defaults" not in scheduler_config_dict(cfg)
    # written back, diffusers reads the same schedule
    path = write_scheduler_config(cfg, tmp_path / "out")
    back = diffusers.DDIMScheduler.from_config(json.loads(path.read_text()))
    assert torch.equal(back.alphas_cumprod, sched.alphas_cumprod)
    assert back.config.prediction_type == "v_prediction" and back.config.timestep_spacing == "trailing"
    assert "lambda_min_clipped" not in scheduler_config_dict(cfg)


def test_config_errors(tmp_path):
    with pytest.raises(SchedulerConfigError, match="no scheduler"):
        read_scheduler_config(tmp_path)
    bad = tmp_path / "scheduler_config.json"
    bad.write_text("{not json")
    with pytest.raises(SchedulerConfigError, match="JSON"):
        read_scheduler_config(tmp_path)
    bad.write_text(json.dumps({"timestep_type": "continuous"}))
    with pytest.raises(SchedulerConfigError, match="timestep_type"):
        read_scheduler_config(bad)
    bad.write_text(json.dumps({"prediction_type": "flow_prediction"}))
    with pytest.raises(SchedulerConfigError, match="prediction_type"):
        read_scheduler_config(bad)


def test_prepare_sampling_errors_and_defaults():
    cfg = scheduler_config_from_dict(SD)  # a diffusers config that states no spacing or clipping
    with pytest.raises(ValueError, match="unknown sampler"):
        prepare_sampling(cfg, "lms", 10)
    with pytest.raises(ValueError, match="Karras"):
        prepare_sampling(cfg, "ddim", 10, karras=True)
    with pytest.raises(ValueError, match="exceed"):
        prepare_sampling(cfg, "euler", 1001)
    # DDIM defaults (as diffusers' DDIMScheduler): leading spacing, clip_sample on, alpha_to_one
    plan = prepare_sampling(cfg, "ddim", 10)
    assert plan.timesteps[:2].tolist() == [900.0, 800.0] and plan.x0_limit == ("clip", 1.0)
    assert plan.sigmas[-1].item() == 0.0
    # Euler defaults: linspace spacing, init scale sigma_max
    plan = prepare_sampling(cfg, "euler", 10)
    assert plan.timesteps[0].item() == 999.0 and plan.init_noise_scale == pytest.approx(plan.sigmas[0].item())
    assert plan.x0_limit is None
    # t2i's own config states everything: trailing spacing and no clipping for every sampler
    own = ScheduleConfig(**SD)
    for sampler in ("ddim", "ddpm", "heun"):
        plan = prepare_sampling(own, sampler, 10)
        assert plan.x0_limit is None and plan.timesteps[0].item() == 999.0


def test_reads_a_saved_dpm_config(tmp_path):
    sched = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min", **SD)
    sched.save_config(tmp_path)
    cfg = read_scheduler_config(tmp_path / "scheduler_config.json")
    assert cfg.lambda_min_clipped is None  # diffusers wrote -Infinity
    assert cfg.use_karras_sigmas and cfg.final_sigmas_type == "sigma_min" and cfg.lower_order_final
    plan = prepare_sampling(cfg, "dpmpp_2m", 10)
    sched.set_timesteps(10)
    assert torch.equal(plan.sigmas, sched.sigmas) and plan.timesteps.tolist() == sched.timesteps.tolist()
