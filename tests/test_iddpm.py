"""IDDPM (Nichol & Dhariwal 2021): the hybrid loss's VLB terms against their formulas and diffusers' learned
range, the stop-gradient that leaves the variance to L_vlb alone, a falling loss on a tiny run, and sampling
with the learned variance equal to diffusers' DDPMScheduler(variance_type="learned_range"), respaced too.
The same with the mean half predicting v (or x0) instead of eps: the VLB is the eps path's for the same x0, the
sampler equals diffusers' v_prediction + learned_range, a tiny cosine run learns, the file keeps the type."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from test_ddpm import tiny_unet2d

import t2i
from t2i.checkpoints.io import CheckpointError
from t2i.diffusion.losses import DiffusionLoss, HybridLoss
from t2i.diffusion.schedules import make_betas, respace_timesteps
from t2i.train.ddpm import DDPMTrainConfig, train_ddpm

pytestmark = pytest.mark.usefixtures("one_thread")

def _acp() -> torch.Tensor:
    return torch.cumprod(1 - make_betas("linear"), 0)  # (1000,) float32, as ScheduleConfig builds it


def _reference_vlb(x0, x_t, t: int, eps_hat, v, acp32: torch.Tensor) -> torch.Tensor:
    """L_t in bits/dim from the formulas, float64, one sample: Ho et al. eq. 6-7 for q(x_{t-1} | x_t, x0),
    IDDPM eq. 15 for Sigma_theta (beta~_0 taken as beta~_1), KL of Gaussians by torch.distributions, and
    the exact (erf) discretized decoder likelihood at t = 0."""
    acp = acp32.double()
    a_t = acp[t]
    a_prev = acp[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
    beta = 1 - a_t / a_prev
    tilde = lambda s: (1 - acp[s - 1]) / (1 - acp[s]) * (1 - acp[s] / acp[s - 1])  # noqa: E731
    beta_tilde = tilde(t) if t > 0 else tilde(1)
    x0, x_t, eps_hat, v = (z.double() for z in (x0, x_t, eps_hat, v))
    x0_hat = (x_t - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
    mean = lambda z: a_prev.sqrt() * beta / (1 - a_t) * z + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x_t  # noqa: E731
    frac = (v + 1) / 2
    var = torch.exp(frac * beta.log() + (1 - frac) * beta_tilde.log())
    p = torch.distributions.Normal(mean(x0_hat), var.sqrt())
    if t > 0:
        q = torch.distributions.Normal(mean(x0), beta_tilde.sqrt().expand_as(x0))
        nats = torch.distributions.kl_divergence(q, p)
    else:
        cdf = p.cdf
        hi = torch.where(x0 > 0.999, torch.ones_like(x0), cdf(x0 + 1 / 255))
        lo = torch.where(x0 < -0.999, torch.zeros_like(x0), cdf(x0 - 1 / 255))
        nats = -(hi - lo).log()
    return nats.mean() / math.log(2)


@pytest.mark.parametrize("t", [0, 1, 7, 300, 999])
def test_vlb_terms_equal_their_formulas(t):
    g = torch.Generator().manual_seed(t)
    x0 = (torch.randint(0, 256, (1, 3, 4, 4), generator=g) / 127.5 - 1)  # 8-bit data, the bins' own values
    eps, err = torch.randn(2, 1, 3, 4, 4, generator=g)
    eps_hat = eps + 0.3 * err  # a network near the truth: the decoder's bins then hold real probability
    v = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    acp = _acp()
    x_t = acp[t].sqrt() * x0 + (1 - acp[t]).sqrt() * eps
    ours = HybridLoss(acp).vlb_terms(x0, x_t, torch.tensor([t]), eps_hat, v)
    ref = _reference_vlb(x0[0], x_t[0], t, eps_hat[0], v[0], acp)
    # t = 0: IDDPM's tanh approximation of the normal cdf against the exact erf
    assert float(ours[0]) == pytest.approx(float(ref), rel=1e-4 if t else 2e-3)


def _same_x0(x_t: torch.Tensor, x0_hat: torch.Tensor, acp: torch.Tensor) -> dict[str, torch.Tensor]:
    """The eps, v and x0 outputs (float64 in, float32 out) that all describe x0_hat at x_t (VP), acp (B, 1, 1, 1)."""
    eps = (x_t - acp.sqrt() * x0_hat) / (1 - acp).sqrt()
    v = acp.sqrt() * eps - (1 - acp).sqrt() * x0_hat  # Salimans & Ho 2022, sec. 4
    return {"epsilon": eps.float(), "v_prediction": v.float(), "sample": x0_hat.float()}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_vlb_of_a_v_or_x0_mean_half_equals_the_eps_paths_for_the_same_x0(schedule):
    """L_vlb reads the mean half only through the x0 it implies: three networks whose outputs describe the same x0
    (eps, v, x0) with the same variance values give the same L_t (at every t, the decoder's t = 0 included), while
    the v output read as eps does not."""
    from t2i.systems.ddpm import ddpm_schedule

    acp32 = ddpm_schedule("squaredcos_cap_v2" if schedule == "cosine" else "linear").alphas_cumprod()
    g = torch.Generator().manual_seed(7)
    t = torch.tensor([0, 1, 10, 250, 500, 800, 990, 999])
    b = t.shape[0]
    x0 = (torch.randint(0, 256, (b, 3, 4, 4), generator=g) / 127.5 - 1).double()
    x0_hat = (x0 + 0.1 * torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)).clamp(-1, 1)
    var = torch.rand(b, 3, 4, 4, generator=g) * 2 - 1
    acp = acp32.double()[t].reshape(b, 1, 1, 1)
    x_t = acp.sqrt() * x0 + (1 - acp).sqrt() * torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    outs = _same_x0(x_t, x0_hat, acp)
    vlb = {k: HybridLoss(acp32, k).vlb_terms(x0.float(), x_t.float(), t, out, var) for k, out in outs.items()}
    torch.testing.assert_close(vlb["v_prediction"], vlb["sample"], rtol=1e-4, atol=0)
    # eps's x0 = (x_t - sqrt(1 - acp) eps) / sqrt(acp) cancels in float32 where acp is tiny (the cosine schedule's
    # 2.4e-9 at t = 999): 8e-3 there, 6e-6 on the linear schedule
    torch.testing.assert_close(vlb["v_prediction"], vlb["epsilon"], rtol=1e-2 if schedule == "cosine" else 1e-5,
                               atol=0)
    wrong = HybridLoss(acp32, "epsilon").vlb_terms(x0.float(), x_t.float(), t, outs["v_prediction"], var)
    assert ((wrong / vlb["epsilon"] - 1).abs()[3:] > 1).all()  # t >= 250 (at small t eps barely moves x0)


def test_model_log_variance_equals_diffusers_learned_range():
    """Sigma_theta of eq. 15 as diffusers' DDPMScheduler(variance_type="learned_range")._get_variance computes it."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(variance_type="learned_range")
    sched.set_timesteps(1000)
    loss = HybridLoss(_acp())
    v = torch.linspace(-1, 1, 5).reshape(1, 5, 1, 1)
    for t in (1, 2, 50, 500, 999):
        ref = sched._get_variance(t, predicted_variance=v)
        ours = loss.model_log_variance(v, torch.tensor([t]))
        torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=0)  # diffusers divides in float32


class _Constant(torch.nn.Module):
    """A 'network' whose (1, 6, 4, 4) output is one parameter: its gradient is the loss's gradient in the output."""

    def __init__(self) -> None:
        super().__init__()
        self.out = torch.nn.Parameter(torch.randn(1, 6, 4, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, t):
        return self.out.expand(x.shape[0], -1, -1, -1) + 0 * x.repeat(1, 2, 1, 1)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_the_variance_half_is_trained_by_l_vlb_alone_and_the_mean_by_l_simple_alone(prediction):
    acp = _acp()
    x0 = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grads = {}
    for name, loss in (("hybrid", HybridLoss(acp, prediction)), ("simple", DiffusionLoss(acp, prediction))):
        net = _Constant()
        out = net if name == "hybrid" else (lambda x, t, n=net: n(x, t)[:, :3])
        loss(out, x0, {}, torch.Generator().manual_seed(2)).backward()
        grads[name] = net.out.grad
    # the mean half: exactly L_simple's gradient (the VLB sees a stopped-gradient mean)
    torch.testing.assert_close(grads["hybrid"][:, :3], grads["simple"][:, :3], rtol=0, atol=0)
    # the variance half: L_simple gives none; all of it is lambda T L_vlb's
    assert grads["simple"][:, 3:].abs().max() == 0 and grads["hybrid"][:, 3:].abs().max() > 0
    loss, net = HybridLoss(acp, prediction), _Constant()
    t, _, _, x_t = loss.noised(x0, torch.Generator().manual_seed(2))
    out = net(x_t, t.float())
    (0.001 * 1000 * loss.vlb_terms(x0, x_t, t, out[:, :3], out[:, 3:]).mean()).backward()
    torch.testing.assert_close(grads["hybrid"][:, 3:], net.out.grad[:, 3:], rtol=1e-5, atol=0)


def test_hybrid_loss_draws_what_diffusion_loss_draws_and_adds_lambda_t_l_vlb():
    """Same t and noise from the same generator; loss = L_simple + 0.001 * T * L_t (IDDPM's rescaled hybrid)."""
    acp = _acp()
    net = _Constant()
    x0 = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    hybrid = HybridLoss(acp)
    total = hybrid(net, x0, {}, torch.Generator().manual_seed(5))
    simple = DiffusionLoss(acp)(lambda x, t: net(x, t)[:, :3], x0, {}, torch.Generator().manual_seed(5))
    t, noise, a, x_t = hybrid.noised(x0, torch.Generator().manual_seed(5))
    out = net(x_t, t.float())
    vlb = hybrid.vlb_terms(x0, x_t, t, out[:, :3], out[:, 3:]).mean()
    assert total.item() == pytest.approx((simple + 0.001 * 1000 * vlb).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

def _held_out(path) -> tuple[float, float]:
    """(hybrid loss, mean L_t) of a saved model on 32 fixed shapes scenes, fixed t and noise."""
    from t2i.systems.ddpm import load_t2i_ddpm
    from t2i.train.data import open_data
    from t2i.train.distributed import DistInfo

    net, cfg = load_t2i_ddpm(path)
    x, _, _ = open_data("shapes", None, cfg.image_size, 123, print).batch(0, 32, DistInfo())
    loss = HybridLoss(cfg.schedule.alphas_cumprod(), cfg.schedule.prediction_type)
    totals, vlbs = [], []
    with torch.no_grad():
        for k in range(4):
            totals.append(loss(net, x, {}, torch.Generator().manual_seed(k)).item())
            t, _, _, x_t = loss.noised(x, torch.Generator().manual_seed(k))
            out = net(x_t, t.float())
            vlbs.append(loss.vlb_terms(x, x_t, t, out[:, :3], out[:, 3:]).mean().item())
    return sum(totals) / 4, sum(vlbs) / 4


# v's target has unit variance at every t, so its loss starts lower and falls less than eps's (measured: eps on
# linear betas 1.14 -> 0.21, v on cosine 0.94 -> 0.57)
@pytest.mark.parametrize(("prediction", "betas", "ratio"),
                         [("epsilon", "linear", 0.6), ("v_prediction", "cosine", 0.7)])
def test_learn_sigma_run_lowers_the_hybrid_loss_and_its_vlb_and_samples_with_the_learned_variance(tmp_path, prediction,
                                                                                                   betas, ratio):
    """`t2i train ddpm --learn-sigma [--prediction v_prediction --beta-schedule cosine]` in-process (unconditional
    tiny preset, 16x16, 30 steps): a 6-channel U-Net whose held-out hybrid loss and VLB term both fall, exported as
    a file (its prediction type in it) the family samples."""
    common = dict(net_preset="tiny_uncond", image_size=16, batch_size=8, warmup=5, ckpt_every=1000, image_every=0,
                  log_every=10, seed=0, ema_decay=0.0, learn_sigma=True, prediction_type=prediction,
                  beta_schedule=betas)
    assert train_ddpm(DDPMTrainConfig(out=str(tmp_path / "r0"), steps=1, lr=1e-12, **common)) == 0
    assert train_ddpm(DDPMTrainConfig(out=str(tmp_path / "r30"), steps=30, lr=3e-3, **common)) == 0
    (before, vlb_before), (after, vlb_after) = (_held_out(tmp_path / r / "model.safetensors") for r in ("r0", "r30"))
    print(f"hybrid {before:.4f} -> {after:.4f}; L_t {vlb_before:.4f} -> {vlb_after:.4f} bits/dim")
    assert after < ratio * before and vlb_after < vlb_before
    assert "ddpm/vlb_bpd" in (tmp_path / "r30" / "log.txt").read_text()
    pipe = t2i.load(tmp_path / "r30" / "model.safetensors")
    assert pipe.learned_variance and pipe.unet.pixel_cfg.out_channels == 6
    assert pipe.schedule.prediction_type == prediction
    images = pipe.generate("", seed=0, steps=10).sample
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


# ---------------------------------------------------------------------------------------
# Sampling parity with diffusers
# ---------------------------------------------------------------------------------------

def _learned_folder(factory, **scheduler) -> tuple:
    """(folder, unet, scheduler): test_ddpm's tiny random UNet2DModel with 6 output channels (the mean half x8,
    the variance half as initialised) under DDPMScheduler(learned_range, **scheduler)."""
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet2d(out_channels=6)
    scheduler = diffusers.DDPMScheduler(variance_type="learned_range", **scheduler)
    folder = factory.mktemp("iddpm") / "iddpm-tiny"
    diffusers.DDPMPipeline(unet, scheduler).save_pretrained(folder)
    return folder, unet, scheduler


@pytest.fixture(scope="module")
def learned_folder(tmp_path_factory):
    """eps on DDPM's linear betas."""
    return _learned_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def learned_v_folder(tmp_path_factory):
    """v on IDDPM's cosine betas: what `t2i train ddpm --learn-sigma --prediction v_prediction --beta-schedule
    cosine` trains."""
    return _learned_folder(tmp_path_factory, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")


def _diffusers_run(unet, scheduler, seed: int, channels: int = 6, **timesteps) -> np.ndarray:
    """DDPMPipeline.__call__'s loop (set_timesteps with num_inference_steps or custom timesteps), output "np";
    channels=3 gives the scheduler the eps half only."""
    g = torch.Generator("cpu").manual_seed(seed)
    image = torch.randn((1, 3, 16, 16), generator=g)
    scheduler.set_timesteps(**timesteps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            image = scheduler.step(unet(image, t).sample[:, :channels], t, image, generator=g).prev_sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _relative(sample: torch.Tensor, ref: np.ndarray) -> float:
    ours = (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return float(np.abs(ours - ref).max() / ref.std())


def test_learned_variance_sampling_equals_diffusers_ddpm_pipeline(learned_folder):
    """20 steps of diffusers' leading spacing, x0 clipped, the noise scaled by the learned variance; the same
    network with its variance ignored (fixed_small) ends far away, so the variance is what is compared."""
    diffusers = pytest.importorskip("diffusers")
    folder, unet, scheduler = learned_folder
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(generator=torch.Generator("cpu").manual_seed(3), num_inference_steps=20, output_type="np").images
    ours = t2i.load(folder)
    assert ours.learned_variance
    err = _relative(ours.generate("", seed=3, steps=20, sampler="ddpm").sample, ref)
    print(f"learned_range DDPMPipeline: {err:.2e} of the std")
    assert err < 2e-4
    # the eps half alone under fixed_small
    fixed = _diffusers_run(unet, diffusers.DDPMScheduler(), 3, channels=3, num_inference_steps=20)
    assert np.abs(fixed - ref).max() / ref.std() > 1e-2


def test_learned_variance_sampling_over_iddpm_respaced_timesteps_equals_diffusers(learned_folder):
    """schedule="iddpm", 25 of 1000 steps: the respaced betas 1 - acp_t / acp_prev (diffusers' custom timesteps
    step between the kept timesteps the same way)."""
    folder, unet, scheduler = learned_folder
    kept = sorted(respace_timesteps(1000, "25"), reverse=True)
    ref = _diffusers_run(unet, scheduler, 4, timesteps=kept)
    err = _relative(t2i.load(folder).generate("", seed=4, steps=25, sampler="ddpm", schedule="iddpm").sample, ref)
    print(f"respaced learned_range: {err:.2e} of the std")
    assert err < 2e-4


@pytest.mark.parametrize("schedule", ["default", "iddpm"])
def test_v_prediction_with_the_learned_variance_samples_as_diffusers_does(learned_v_folder, schedule):
    """The sampler reads x0 from v through the denoiser contract and the variance values beside it: diffusers'
    DDPMScheduler(v_prediction, learned_range) on cosine betas, 20 steps of its leading spacing or 25 IDDPM-respaced
    ones, ends where t2i does; reading the same network as eps ends far away."""
    folder, unet, scheduler = learned_v_folder
    pipe = t2i.load(folder)
    assert pipe.learned_variance and pipe.schedule.prediction_type == "v_prediction"
    if schedule == "default":
        ref, request = _diffusers_run(unet, scheduler, 5, num_inference_steps=20), dict(steps=20)
    else:
        ref = _diffusers_run(unet, scheduler, 5, timesteps=sorted(respace_timesteps(1000, "25"), reverse=True))
        request = dict(steps=25, schedule="iddpm")
    err = _relative(pipe.generate("", seed=5, sampler="ddpm", **request).sample, ref)
    print(f"v + learned_range ({schedule}): {err:.2e} of the std")
    assert err < 2e-4
    pipe.schedule = dataclasses.replace(pipe.schedule, prediction_type="epsilon")
    assert _relative(pipe.generate("", seed=5, sampler="ddpm", **request).sample, ref) > 1e-1


def test_a_folder_pairing_a_learned_variance_type_with_a_plain_unet_is_refused(learned_folder, tmp_path):
    import shutil

    folder, _, _ = learned_folder
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "scheduler" / "scheduler_config.json").read_text())
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "variance_type": "fixed_small"}))
    with pytest.raises(CheckpointError, match="variance_type"):
        t2i.load(bad)


def test_t2i_train_dit_learn_sigma_trains_the_variance_half_and_its_family_samples_the_eps_half(tmp_path):
    """`t2i train dit --preset tiny --learn-sigma`, 20 steps: the exported DiT outputs 2C channels, its held-out
    hybrid loss and VLB term fall from the untrained model's, and the DiT family samples its eps half (the
    learned variance is used by the ddpm family's sampler only, not yet by dit/pixart)."""
    from t2i.cli import main
    from t2i.systems.dit import LatentTransformer
    from t2i.train.distributed import DistInfo
    from t2i.train.dit import SingleObjects

    common = ["--preset", "tiny", "--learn-sigma", "--image-size", "16", "--batch-size", "8", "--warmup", "5",
              "--ckpt-every", "1000", "--image-every", "0", "--log-every", "10", "--seed", "0", "--ema-decay", "0",
              "--threads", "1"]
    assert main(["train", "dit", "--out", str(tmp_path / "r0"), "--steps", "1", "--lr", "1e-12", *common]) == 0
    assert main(["train", "dit", "--out", str(tmp_path / "r20"), "--steps", "20", "--lr", "3e-3", *common]) == 0
    x, labels = SingleObjects(123, 16, 0.0).batch(0, 32, DistInfo())

    def held_out(run: str) -> tuple[float, float]:
        model = LatentTransformer.load(tmp_path / run / "model.safetensors", "dit")
        assert model.cfg.net.learn_sigma
        z = model.vae.scale(model.vae.encode(x).mode())
        loss = HybridLoss(model.cfg.schedule.alphas_cumprod())
        with torch.no_grad():
            total = loss(model.net, z, {"class_labels": labels}, torch.Generator().manual_seed(0)).item()
            t, _, _, z_t = loss.noised(z, torch.Generator().manual_seed(0))
            eps, v = model.net(z_t, t.float(), class_labels=labels).chunk(2, dim=1)
            return total, loss.vlb_terms(z, z_t, t, eps, v).mean().item()

    (before, vlb_before), (after, vlb_after) = held_out("r0"), held_out("r20")
    print(f"dit hybrid {before:.4f} -> {after:.4f}; L_t {vlb_before:.4f} -> {vlb_after:.4f} bits/dim")
    assert after < 0.8 * before and vlb_after < vlb_before
    sample = t2i.load(tmp_path / "r20" / "model.safetensors").generate("a red circle", seed=0, steps=2).sample
    assert torch.isfinite(sample).all()


def test_a_v_prediction_learned_variance_file_round_trips_and_samples_as_the_network_in_memory(tmp_path):
    """save_ddpm -> t2i.load: the file says v and 6 channels, its weights are the network's, and its ddpm samples
    (learned variance) are the in-memory network's; the same weights read as eps sample something else."""
    from t2i.nets.pixel_unet import PIXEL_UNET_PRESETS, PixelUNet
    from t2i.systems.ddpm import DDPMConfig, DDPMPipeline, ddpm_schedule, save_ddpm

    net_cfg = dataclasses.replace(PIXEL_UNET_PRESETS["tiny_uncond"], out_channels=6)
    schedule = dataclasses.replace(ddpm_schedule("squaredcos_cap_v2"), prediction_type="v_prediction")
    cfg = DDPMConfig(net=net_cfg, schedule=schedule, text_encoder=None, image_size=net_cfg.sample_size)
    torch.manual_seed(0)
    net = PixelUNet(net_cfg).eval()
    with torch.no_grad():
        for p in net.parameters():  # a random net's zero-initialised output layer would hide the parameterisation
            p.add_(0.05 * torch.randn_like(p))
    save_ddpm(net, cfg, tmp_path / "model.safetensors")
    loaded = t2i.load(tmp_path / "model.safetensors")
    assert loaded.learned_variance and loaded.schedule.prediction_type == "v_prediction"
    request = dict(seed=1, steps=8, sampler="ddpm")
    ours = loaded.generate("", **request).sample
    assert all(torch.equal(w, loaded.unet.state_dict()[k]) for k, w in net.state_dict().items())
    # the same weights; the loaded tensors (read from the file, not allocated by torch) take other CPU kernel paths
    # by ~1e-6, so the in-memory network's samples agree to float32 rounding
    torch.testing.assert_close(ours, DDPMPipeline(net, schedule).generate("", **request).sample, rtol=0, atol=1e-5)
    as_eps = DDPMPipeline(net, dataclasses.replace(schedule, prediction_type="epsilon")).generate("", **request)
    assert (as_eps.sample - ours).abs().max() > 0.1
