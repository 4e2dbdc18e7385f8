"""Sampler parity with diffusers' schedulers over an analytic "network".

Data ~ N(mu, s^2) per element has the exact denoiser D(x, sigma) = (s^2 x + sigma^2 mu) /
(s^2 + sigma^2). Wrapped as an eps- or v-prediction network of (x_vp, t) (sigma(t) by linear
interpolation of the training sigmas, so fractional timesteps matter), it is run through
diffusers' scheduler loop (scale_model_input, step) and through our plan + sampler from the
same seed noise; the final latents must agree to 1e-5 of their std, and the network must see
the same timesteps in the same order.
"""

from __future__ import annotations

import pytest
import torch

from t2i.checkpoints.diffusers_scheduler import scheduler_config_from_dict
from t2i.samplers import prepare_sampling

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 4, 6, 6)
SEED = 1234

SD1 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
           steps_offset=1, set_alpha_to_one=False, clip_sample=False, num_train_timesteps=1000)
SD2 = dict(SD1, prediction_type="v_prediction")

CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


class AnalyticNet:
    """eps / v "network" of (x_vp, t) for Gaussian data; records the timesteps it is given."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        acp = alphas_cumprod.double().clamp(min=2.0**-24)  # zero terminal SNR: keep sigma finite
        self.table = ((1 - acp) / acp) ** 0.5  # (T,)
        g = torch.Generator().manual_seed(7)
        self.mu = torch.randn(SHAPE[1:], generator=g, dtype=torch.float64) * 0.5
        self.s = torch.rand(SHAPE[1:], generator=g, dtype=torch.float64) * 0.8 + 0.3
        self.prediction_type = prediction_type
        self.seen: list[float] = []

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double().clamp(0, len(self.table) - 1)
        lo = t.floor().long().clamp(max=len(self.table) - 2)
        w = t - lo
        return self.table[lo] * (1 - w) + self.table[lo + 1] * w

    def __call__(self, x_vp: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1)
        self.seen.append(float(t[0]))
        sigma = self.sigma(t).reshape(-1, 1, 1, 1)
        x = x_vp.double() * (1 + sigma**2) ** 0.5
        d = (self.s**2 * x + sigma**2 * self.mu) / (self.s**2 + sigma**2)
        eps = (x - d) / sigma
        if self.prediction_type == "epsilon":
            return eps.float()
        a = 1 / (1 + sigma**2)
        return (a.sqrt() * eps - (1 - a).sqrt() * d).float()


def run_diffusers(sampler: str, config: dict, steps: int, karras: bool, eta: float = 0.0):
    cls = getattr(diffusers, CLASSES[sampler])
    extra = {"use_karras_sigmas": True} if karras else {}
    if sampler == "dpmpp_2m":
        extra.update(algorithm_type="dpmsolver++", solver_order=2)
    sched = cls.from_config(config, **extra)
    sched.set_timesteps(steps)
    net = AnalyticNet(sched.alphas_cumprod, config["prediction_type"])
    g = torch.Generator().manual_seed(SEED)
    latents = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = net(sched.scale_model_input(latents, t), t)
        kwargs = {} if sampler == "heun" else {"generator": g}
        if sampler == "ddim":
            kwargs["eta"] = eta
        latents = sched.step(out, t, latents, **kwargs).prev_sample
    return latents, net.seen


def run_ours(sampler: str, config: dict, steps: int, karras: bool, eta: float = 0.0):
    cfg = scheduler_config_from_dict(config)
    plan = prepare_sampling(cfg, sampler, steps, karras=karras, eta=eta)
    net = AnalyticNet(plan.alphas_cumprod, cfg.prediction_type)
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn(SHAPE, generator=g)
    x = plan.run(plan.limit_x0(plan.denoiser(net)), plan.start(noise), generator=g)
    return plan.finish(x), net.seen


def check(sampler, config, steps, karras=False, eta=0.0, tol=1e-5):
    ref, ref_t = run_diffusers(sampler, config, steps, karras, eta)
    ours, our_t = run_ours(sampler, config, steps, karras, eta)
    assert our_t == pytest.approx(ref_t, abs=0, rel=0), (our_t, ref_t)
    err = ((ours - ref).abs().max() / ref.std()).item()
    assert err < tol, f"{sampler} karras={karras}: relative error {err:.2e}"
    return err


CASES = [
    ("ddim", False), ("ddpm", False), ("euler", False), ("euler_a", False), ("heun", False),
    ("dpmpp_2m", False), ("dpmpp_2m", True), ("euler", True), ("heun", True),
]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("config", [SD1, SD2], ids=["sd1_eps", "sd2_v"])
@pytest.mark.parametrize("sampler,karras", CASES, ids=[f"{s}{'_karras' if k else ''}" for s, k in CASES])
def test_parity_with_diffusers(sampler, karras, config, spacing):
    check(sampler, dict(config, timestep_spacing=spacing), steps=10, karras=karras)


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "ddpm", "heun"])
def test_parity_odd_and_long_runs(sampler, steps):
    """7 steps do not divide 1000 (DDIM's trailing quirk); 20 >= 15 keeps DPM's last step
    second order only when the final sigma is not 0."""
    check(sampler, dict(SD1, timestep_spacing="trailing"), steps)
    check(sampler, dict(SD2, timestep_spacing="linspace"), steps)


def test_parity_ddim_eta_and_alpha_to_one():
    check("ddim", dict(SD1, set_alpha_to_one=True), 10)
    check("ddim", dict(SD2, timestep_spacing="trailing"), 10, eta=0.7)
    check("ddim", dict(SD1, timestep_spacing="linspace"), 10, eta=1.0)


@pytest.mark.parametrize("steps", [8, 20])
def test_parity_dpm_final_sigma_min(steps):
    cfg = dict(SD2, timestep_spacing="trailing", final_sigmas_type="sigma_min")
    check("dpmpp_2m", cfg, steps)
    check("dpmpp_2m", dict(cfg, lower_order_final=False), steps)
    check("dpmpp_2m", dict(cfg, euler_at_final=True), steps)
    check("dpmpp_2m", cfg, steps, karras=True)
    check("euler", cfg, steps)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_parity_zero_terminal_snr(sampler):
    cfg = dict(SD2, timestep_spacing="trailing", rescale_betas_zero_snr=True, beta_schedule="linear",
               beta_start=0.0001, beta_end=0.02)
    check(sampler, cfg, 10)


def test_parity_cosine_and_linear_betas():
    check("euler", dict(SD1, beta_schedule="squaredcos_cap_v2"), 10)
    # (diffusers' DPM + Karras + cosine fails inside diffusers: unrounded timesteps cast to int)
    check("dpmpp_2m", dict(SD2, beta_schedule="squaredcos_cap_v2"), 10)
    check("ddim", dict(SD2, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), 10)
    check("ddim", dict(SD1, beta_schedule="linear", beta_start=0.0001, beta_end=0.02), 10)


def test_zero_terminal_snr_ddim_ddpm_known_gap():
    """diffusers' DDIM/DDPM keep alphas_cumprod[-1] = 0 under zero terminal SNR (sigma_max = inf,
    not representable in VE form); we use 2**-24 as diffusers' own Euler/DPM do. With v-prediction
    the final latents then differ by a few 1e-4 of their std (eps-prediction is NaN in diffusers)."""
    cfg = dict(SD2, timestep_spacing="trailing", rescale_betas_zero_snr=True, beta_schedule="linear",
               beta_start=0.0001, beta_end=0.02)
    assert check("ddim", cfg, 10, tol=1e-3) > 1e-5
    assert check("ddpm", cfg, 10, tol=1e-3) > 1e-5


def _diffusers_partial(sampler, config, steps, t_start, stop=None, init=None, latents=None, karras=False):
    """diffusers' img2img / denoising_start loop: begin at index t_start (times the scheduler's
    order), optionally noise init latents with add_noise, and stop after `stop` timesteps."""
    cls = getattr(diffusers, CLASSES[sampler])
    extra = {"use_karras_sigmas": True} if karras else {}
    sched = cls.from_config(config, **extra)
    sched.set_timesteps(steps)
    begin = t_start * sched.order
    timesteps = sched.timesteps[begin:]
    if hasattr(sched, "set_begin_index"):  # as the pipelines do (DDIM steps by timestep value)
        sched.set_begin_index(begin)
    net = AnalyticNet(sched.alphas_cumprod, config["prediction_type"])
    g = torch.Generator().manual_seed(SEED)
    if latents is None:
        noise = torch.randn(SHAPE, generator=g)
        if init is not None:
            latents = sched.add_noise(init, noise, timesteps[:1])
        else:
            latents = noise * sched.init_noise_sigma
    for t in timesteps[:stop]:
        out = net(sched.scale_model_input(latents, t), t)
        kwargs = {} if sampler == "heun" else {"generator": g}
        latents = sched.step(out, t, latents, **kwargs).prev_sample
    return latents, net.seen


def _ours(plan, cfg, noise_seed_latents=None, init=None):
    net = AnalyticNet(plan.alphas_cumprod, cfg.prediction_type)
    g = torch.Generator().manual_seed(SEED)
    if noise_seed_latents is None:
        x = plan.start(torch.randn(SHAPE, generator=g), init)
    else:
        x = noise_seed_latents
    return plan.run(plan.denoiser(net), x, generator=g), net.seen


@pytest.mark.parametrize("sampler,karras", [("euler", False), ("euler_a", False), ("heun", False),
                                            ("ddim", False), ("dpmpp_2m", False), ("dpmpp_2m", True)])
@pytest.mark.parametrize("strength", [0.0, 0.35, 0.8, 1.0])
def test_img2img_strength_parity(sampler, karras, strength):
    config = dict(SD1, timestep_spacing="leading")
    steps = 10
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    cfg = scheduler_config_from_dict(config)
    plan = prepare_sampling(cfg, sampler, steps, karras=karras).from_strength(strength)
    ours, our_t = _ours(plan, cfg, init=init)
    assert plan.steps == int(steps * strength)
    if plan.steps == 0:
        assert torch.equal(plan.finish(ours), init)  # strength 0 returns the input
        return
    ref, ref_t = _diffusers_partial(sampler, config, steps, steps - plan.steps, init=init, karras=karras)
    assert our_t == ref_t
    err = ((plan.finish(ours) - ref).abs().max() / ref.std()).item()
    assert err < 1e-5, err


@pytest.mark.parametrize("sampler,karras", [("euler", False), ("euler", True), ("euler_a", False),
                                            ("ddim", False), ("dpmpp_2m", False), ("dpmpp_2m", True)])
@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_refiner_handoff_parity(sampler, karras, fraction):
    """SDXL base (denoising_end) -> refiner (denoising_start) at a fraction of the schedule."""
    config = dict(SD1, timestep_spacing="trailing")
    steps = 12
    cfg = scheduler_config_from_dict(config)
    head, tail = prepare_sampling(cfg, sampler, steps, karras=karras).split(fraction)
    assert head.steps + tail.steps == steps and 0 < head.steps < steps
    x_mid, t_head = _ours(head, cfg)
    held = head.finish(x_mid)  # the latents diffusers' base pipeline returns
    ours, t_tail = _ours(tail, cfg, noise_seed_latents=tail.resume(held))

    ref_mid, ref_t_head = _diffusers_partial(sampler, config, steps, 0, stop=head.steps, karras=karras)
    cutoff = int(round(1000 - fraction * 1000))
    sched = getattr(diffusers, CLASSES[sampler]).from_config(config, use_karras_sigmas=karras)
    sched.set_timesteps(steps)
    assert int((sched.timesteps >= cutoff).sum()) == head.steps  # diffusers' denoising_end count
    ref, ref_t_tail = _diffusers_partial(sampler, config, steps, head.steps, latents=ref_mid, karras=karras)
    assert t_head == ref_t_head and t_tail == ref_t_tail
    assert ((held - ref_mid).abs().max() / ref_mid.std()).item() < 1e-5
    err = ((tail.finish(ours) - ref).abs().max() / ref.std()).item()
    assert err < 1e-5, err


def test_parity_dpm_lambda_min_clipped():
    check("dpmpp_2m", dict(SD2, timestep_spacing="linspace", lambda_min_clipped=-5.1), 10)
    check("dpmpp_2m", dict(SD1, timestep_spacing="leading", lambda_min_clipped=-5.1), 10)


# Configs as diffusers folders hold them, saved by one scheduler class and sampled with another
# (an SDXL folder ships EulerDiscreteScheduler, SD 1.5 PNDMScheduler): `<Target>.from_config`
# keeps what the file states and takes the target class's defaults for the rest, e.g. DDIM
# clips x0 to +-1 when an Euler config says nothing about clip_sample (issue 16).
SAVED_BY = {
    "euler_sdxl": ("EulerDiscreteScheduler", dict(SD1, timestep_spacing="leading", clip_sample=None,
                                                  set_alpha_to_one=None)),
    "pndm_sd15": ("PNDMScheduler", dict(SD1, skip_prk_steps=True, clip_sample=None)),
    "ddim_defaults": ("DDIMScheduler", dict(SD2, clip_sample=None, set_alpha_to_one=None)),
}


@pytest.mark.parametrize("saved_by", list(SAVED_BY))
@pytest.mark.parametrize("sampler", list(CLASSES))
def test_parity_with_a_config_saved_by_another_scheduler(tmp_path, saved_by, sampler):
    import json

    cls_name, kwargs = SAVED_BY[saved_by]
    getattr(diffusers, cls_name)(**{k: v for k, v in kwargs.items() if v is not None}).save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())  # with its _class_name
    assert saved["_class_name"] == cls_name
    check(sampler, saved, 10)
