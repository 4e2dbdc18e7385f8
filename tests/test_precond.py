"""The denoiser contract beyond the discrete VP schedule (issue 16): EDM preconditioning,
learned-variance networks, and the sigma schedules that are not diffusers' (EDM, respacing)."""

from __future__ import annotations

import math

import pytest
import torch

from t2i.diffusion.denoiser import DiscreteDenoiser
from t2i.diffusion.precond import (
    EDMDenoiser,
    LearnedVariance,
    edm_preconditioning,
    learned_log_variance,
    split_learned_variance,
)
from t2i.diffusion.schedules import (
    alphas_cumprod_from_betas,
    edm_sigmas,
    make_betas,
    respace_timesteps,
    respaced_sigmas,
)
from t2i.samplers import sample_ddpm, sample_euler, sample_heun

SD = 0.5  # sigma_data


def test_edm_preconditioning_is_table_1():
    # at sigma = sigma_data: c_skip 1/2, c_out sd/sqrt(2), c_in 1/(sd sqrt(2)), c_noise ln(sd)/4
    c_skip, c_out, c_in, c_noise = edm_preconditioning(torch.tensor(SD, dtype=torch.float64), SD)
    assert (c_skip.item(), c_out.item(), c_in.item(), c_noise.item()) == pytest.approx(
        (0.5, SD / math.sqrt(2), 1 / (SD * math.sqrt(2)), math.log(SD) / 4), rel=1e-12)
    # sigma = 80 (EDM's sigma_max), by hand
    c_skip, c_out, c_in, c_noise = edm_preconditioning(torch.tensor(80.0, dtype=torch.float64), SD)
    assert c_skip.item() == pytest.approx(0.25 / 6400.25, rel=1e-12)
    assert c_out.item() == pytest.approx(40 / math.sqrt(6400.25), rel=1e-12)
    assert c_in.item() == pytest.approx(1 / math.sqrt(6400.25), rel=1e-12)
    assert c_noise.item() == pytest.approx(math.log(80) / 4, rel=1e-12)
    # the design goals of sec. 5 / appendix B.6: unit-variance network input and training target
    # for data of std sigma_data, at every noise level
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm_preconditioning(sigma, SD)
    torch.testing.assert_close(c_in**2 * (SD**2 + sigma**2), torch.ones_like(sigma))
    target_var = ((1 - c_skip) ** 2 * SD**2 + c_skip**2 * sigma**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(sigma))


def test_edm_denoiser_with_simple_networks():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 0.5, 20.0])
    seen = []

    def zero(x_in, c_noise):
        seen.append(c_noise)
        return torch.zeros_like(x_in)

    # F = 0 leaves D = c_skip x = sd^2 / (sd^2 + sigma^2) x: the exact denoiser of N(0, sd^2) data
    d = EDMDenoiser(zero, SD)(x, sigma)
    torch.testing.assert_close(d, SD**2 / (SD**2 + sigma[:, None, None, None] ** 2) * x)
    torch.testing.assert_close(seen[0], sigma.log() / 4)
    # identity F: D = (c_skip + c_out c_in) x = (sd^2 + sigma sd) / (sigma^2 + sd^2) x
    d = EDMDenoiser(lambda x_in, c_noise: x_in, SD)(x, sigma)
    s = sigma[:, None, None, None]
    torch.testing.assert_close(d, (SD**2 + s * SD) / (s**2 + SD**2) * x)
    # a scalar sigma is broadcast over the batch; c_skip serves guidance rescale
    torch.testing.assert_close(EDMDenoiser(zero, SD)(x, 0.5), 0.5 * x)
    assert EDMDenoiser(zero, SD).c_skip(sigma, x).shape == (3, 1, 1, 1)


class GaussianF:
    """The EDM network F that makes D exact for data ~ N(mu, s^2) per element:
    D*(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2), F = (D* - c_skip x) / c_out."""

    def __init__(self, shape):
        g = torch.Generator().manual_seed(3)
        self.mu = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
        self.s = torch.rand(shape, generator=g, dtype=torch.float64) * 0.4 + 0.2

    def exact(self, x, sigma):
        return (self.s**2 * x + sigma**2 * self.mu) / (self.s**2 + sigma**2)

    def __call__(self, x_in, c_noise):
        sigma = (4 * c_noise.double()).exp()[:, None, None, None]  # c_noise = ln(sigma) / 4
        c_skip, c_out, c_in, _ = edm_preconditioning(sigma, SD)
        x = x_in.double() / c_in
        return ((self.exact(x, sigma) - c_skip * x) / c_out).float()


def test_euler_and_heun_over_an_edm_denoiser_solve_the_ode():
    """Gaussian data: the probability-flow ODE carries x_T at sigma_max to
    mu + (x_T - mu) s / sqrt(s^2 + sigma_max^2); Euler and Heun over EDM sigmas converge to it at
    their orders (halving the step halves Euler's error and quarters Heun's)."""
    shape = (2, 3, 4, 4)
    f = GaussianF(shape[1:])
    den = EDMDenoiser(f, SD)
    sigmas = edm_sigmas(32)
    assert sigmas.shape == (33,) and sigmas[0].item() == pytest.approx(80.0) and sigmas[-1] == 0
    assert sigmas[-2].item() == pytest.approx(0.002)
    x_t = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 80.0
    torch.testing.assert_close(den(x_t, sigmas[5]).double(), f.exact(x_t.double(), sigmas[5].double()),
                               rtol=1e-4, atol=1e-4)
    exact = f.mu + (x_t.double() - f.mu) * f.s / (f.s**2 + 80.0**2) ** 0.5

    def error(sampler, steps):
        return (sampler(den, x_t, edm_sigmas(steps)).double() - exact).abs().max().item()

    # measured: Euler 0.113 -> 0.057, Heun 0.0198 -> 0.0046 from 32 to 64 steps
    euler, heun = error(sample_euler, 32) / error(sample_euler, 64), error(sample_heun, 32) / error(sample_heun, 64)
    print(f"error ratio 32 -> 64 steps: Euler {euler:.2f}, Heun {heun:.2f}")
    assert 1.7 < euler < 2.3 and 3.4 < heun < 5.0  # first and second order
    assert error(sample_heun, 64) < 0.01


def test_learned_variance_takes_the_mean_half():
    g = torch.Generator().manual_seed(0)
    full = torch.nn.Conv2d(4, 8, 1)  # eps (4 channels) then variance values (4 channels)
    plain = torch.nn.Conv2d(4, 4, 1)
    with torch.no_grad():
        torch.nn.init.normal_(full.weight, generator=g)
        plain.weight.copy_(full.weight[:4])
        plain.bias.copy_(full.bias[:4])
    acp = alphas_cumprod_from_betas(make_betas("linear"))
    x = torch.randn(2, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.3, 7.0])
    learned = DiscreteDenoiser(LearnedVariance(lambda x, t: full(x)), acp)
    ours = DiscreteDenoiser(lambda x, t: plain(x), acp)
    assert torch.equal(learned(x, sigma), ours(x, sigma))
    mean, var_values = LearnedVariance(lambda x, t: full(x)).both(x, torch.zeros(2))
    assert torch.equal(torch.cat([mean, var_values], dim=1), full(x))
    assert torch.equal(split_learned_variance(full(x))[1], var_values)
    with pytest.raises(ValueError, match="even"):
        split_learned_variance(torch.zeros(1, 3, 2, 2))


def test_learned_log_variance_spans_beta_and_posterior_variance():
    """IDDPM eq. 15 on the unrespaced linear schedule: v = 1 gives log beta_t, v = -1 the
    posterior variance beta_t (1 - acp_(t-1)) / (1 - acp_t) of Ho et al. eq. 7."""
    betas = make_betas("linear").double()
    acp = torch.cumprod(1 - betas, 0)
    t = torch.tensor([1, 500, 999])
    ones = torch.ones(3, 1, 2, 2)
    hi = learned_log_variance(ones, acp[t], acp[t - 1])
    lo = learned_log_variance(-ones, acp[t], acp[t - 1])
    mid = learned_log_variance(0 * ones, acp[t], acp[t - 1])
    torch.testing.assert_close(hi[:, 0, 0, 0].double(), betas[t].log(), rtol=1e-4, atol=1e-5)
    posterior = betas[t] * (1 - acp[t - 1]) / (1 - acp[t])
    torch.testing.assert_close(lo[:, 0, 0, 0].double(), posterior.log(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mid, (hi + lo) / 2)


def test_respace_timesteps_as_iddpm():
    kept = respace_timesteps(300, [10, 15, 20])
    assert len(kept) == 45
    assert kept[:10] == list(range(0, 100, 11))  # stride 99/9 = 11 exactly
    # stride 99/14 accumulated in float: the 8th index is 49.4999..., not 49.5, so 149 (IDDPM's value)
    assert kept[10:19] == [100, 107, 114, 121, 128, 135, 142, 149, 157] and kept[24] == 199
    assert kept[25] == 200 and kept[-1] == 299
    assert respace_timesteps(300, "10,15,20") == kept
    assert respace_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    steps = respace_timesteps(1000, "25")
    assert len(steps) == 25 and steps[:3] == [0, 42, 83] and steps[-1] == 999
    with pytest.raises(ValueError, match="cannot take"):
        respace_timesteps(10, [20])
    with pytest.raises(ValueError, match="stride"):
        respace_timesteps(1000, "ddim999")


def test_ddpm_over_respaced_sigmas_is_iddpm_respaced_posterior():
    """One sample_ddpm step between kept timesteps equals IDDPM's posterior q(x_prev | x_t, x0)
    with the respaced betas 1 - acp[t] / acp[t_prev] (mean coefficients and variance of Ho et al.
    eq. 7), in VP form; a whole run feeds the network exactly the kept timesteps."""
    acp = alphas_cumprod_from_betas(make_betas("linear"))
    kept = respace_timesteps(1000, "25")
    sigmas, timesteps = respaced_sigmas(acp, kept)
    assert timesteps.tolist() == sorted(kept, reverse=True) and sigmas[-1] == 0
    x0 = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    i = 5
    t, t_prev = int(timesteps[i]), int(timesteps[i + 1])
    a, a_prev = acp[t].double(), acp[t_prev].double()
    beta = 1 - a / a_prev
    x_vp = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4)).double()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9)).double()
    mean = beta * a_prev.sqrt() / (1 - a) * x0.double() + (1 - a_prev) * (1 - beta).sqrt() / (1 - a) * x_vp
    expected = mean + (beta * (1 - a_prev) / (1 - a)).sqrt() * z  # VP x_prev
    x_ve = (x_vp / a.sqrt()).float()
    got = sample_ddpm(lambda x, s: x0.expand_as(x), x_ve, sigmas[i : i + 2],
                      generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got.double() * a_prev.sqrt(), expected, rtol=1e-5, atol=1e-5)

    seen = []

    def net(x_vp, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x_vp)

    den = DiscreteDenoiser(net, acp).with_timesteps(sigmas[:-1], timesteps)
    sample_ddpm(den, torch.randn(1, 3, 4, 4) * sigmas[0], sigmas, generator=torch.Generator().manual_seed(0))
    assert seen == sorted(kept, reverse=True)
