"""Golden values for every sampler over an analytic denoiser.

Data ~ N(mu, s^2) per channel has the exact denoiser D(x, sigma) = (s^2 x + sigma^2 mu) /
(s^2 + sigma^2), and the probability-flow ODE has the closed-form solution
x(0) = mu + (x_T - mu) s / sqrt(s^2 + sigma_max^2). The hard-coded numbers below were computed
once with t2i (12 Karras steps, sigma 14.6 -> 0.03 -> 0, seed 0) and checked for plausibility:
the deterministic samplers land near the exact solution (Euler first order, Heun and
DPM-Solver++(2M) several times closer), DDIM(eta=0) equals Euler, DDPM equals ancestral Euler
with the same generator, and the stochastic samplers reproduce the data moments.
"""

from __future__ import annotations

import pytest
import torch

from t2i.diffusion.schedules import karras_sigmas
from t2i.samplers import SAMPLERS, sample_ddim

MU = torch.tensor([0.5, -0.3]).reshape(1, 2, 1, 1)
S = torch.tensor([0.7, 0.2]).reshape(1, 2, 1, 1)
SIGMAS = torch.cat([torch.from_numpy(karras_sigmas(0.03, 14.6, 12)).float(), torch.zeros(1)])


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, 1, 1, 1)
    return (S**2 * x + s**2 * MU) / (S**2 + s**2)


def ddim_eta_half(denoiser, x, sigmas, extra_args=None, callback=None, generator=None):
    return sample_ddim(denoiser, x, sigmas, extra_args, callback, generator, eta=0.5)


RUNS = dict(SAMPLERS, ddim_eta_half=ddim_eta_half)

# name -> (x.flatten()[[0, 5, 17, 30]], x.sum())
GOLDEN = {
    "ddpm": ([0.443805, 0.638107, -0.133349, -0.096796], 3.55874),
    "ddim": ([-0.201235, 0.897596, -0.579915, -0.138464], 2.12392),
    "euler": ([-0.201235, 0.897596, -0.579915, -0.138464], 2.12392),
    "euler_a": ([0.443805, 0.638107, -0.133349, -0.096796], 3.55874),
    "heun": ([-0.343611, 0.978323, -0.651218, -0.097316], 1.92659),
    "dpmpp_2m": ([-0.342507, 0.977697, -0.640067, -0.103751], 1.91263),
    "ddim_eta_half": ([0.086007, 0.982537, -0.430983, -0.037607], 2.70662),
}

# max |x - exact ODE solution| each deterministic sampler must stay under (12 steps)
ODE_ERROR = {"euler": 0.25, "ddim": 0.25, "heun": 0.07, "dpmpp_2m": 0.07}


def run(name: str, shape=(1, 2, 4, 4), seed: int = 0, sigmas: torch.Tensor = SIGMAS):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(shape, generator=g) * sigmas[0]
    return x_t, RUNS[name](gaussian_denoiser, x_t, sigmas, generator=g)


def exact(x_t: torch.Tensor, sigma_max: torch.Tensor) -> torch.Tensor:
    return MU + (x_t - MU) * S / (S**2 + sigma_max**2).sqrt()


def test_registry_names():
    assert set(SAMPLERS) == {"ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "lcm"}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_values(name):
    _, x = run(name)
    values, total = GOLDEN[name]
    torch.testing.assert_close(x.flatten()[[0, 5, 17, 30]], torch.tensor(values), atol=2e-5, rtol=0)
    assert x.sum().item() == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize("name", list(ODE_ERROR))
def test_deterministic_samplers_track_the_exact_ode(name):
    x_t, x = run(name)
    err = (x - exact(x_t, SIGMAS[0])).abs().max().item()
    assert err < ODE_ERROR[name]
    # second-order methods are several times closer than Euler
    if name in ("heun", "dpmpp_2m"):
        _, x_euler = run("euler")
        assert err < 0.4 * (x_euler - exact(x_t, SIGMAS[0])).abs().max().item()


def test_euler_converges_first_order():
    errs = []
    for n in (10, 40):
        sig = torch.cat([torch.from_numpy(karras_sigmas(0.03, 14.6, n)).float(), torch.zeros(1)])
        x_t, x = run("euler", sigmas=sig)
        errs.append((x - exact(x_t, sig[0])).abs().max().item())
    assert 2.5 < errs[0] / errs[1] < 6  # ~4x for 4x the steps


def test_equivalences():
    _, euler = run("euler")
    _, ddim = run("ddim")
    torch.testing.assert_close(ddim, euler, atol=1e-6, rtol=0)  # DDIM(eta=0) is Euler in sigma space
    _, euler_a = run("euler_a")
    _, ddpm = run("ddpm")
    torch.testing.assert_close(ddpm, euler_a, atol=1e-6, rtol=0)  # DDPM posterior = ancestral step
    _, ddim_1 = run("ddim_eta_half")
    assert not torch.allclose(ddim_1, ddim, atol=1e-3)


@pytest.mark.parametrize("name", ["euler_a", "ddpm"])
def test_stochastic_samplers_reproduce_the_data_moments(name):
    sig = torch.cat([torch.from_numpy(karras_sigmas(0.03, 14.6, 50)).float(), torch.zeros(1)])
    _, x = run(name, shape=(1, 2, 64, 64), seed=1, sigmas=sig)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), MU.flatten(), atol=0.03, rtol=0)
    # ancestral Euler under-disperses a little at 50 steps (0.184 for s = 0.2; the last step to
    # sigma 0 alone shrinks by s^2 / (s^2 + 0.03^2)); a wrong noise scale would be far off
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), S.flatten(), atol=0, rtol=0.1)


@pytest.mark.parametrize("name", ["euler_a", "ddpm"])
def test_generator_list_gives_each_row_its_own_stream(name):
    """A list of generators (one per image, seeded s + i) makes row i independent of the batch."""
    x_t = torch.randn((2, 2, 4, 4), generator=torch.Generator().manual_seed(5)) * SIGMAS[0]
    gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    both = SAMPLERS[name](gaussian_denoiser, x_t, SIGMAS, generator=gens)
    for i in range(2):
        alone = SAMPLERS[name](gaussian_denoiser, x_t[i : i + 1], SIGMAS,
                               generator=torch.Generator().manual_seed(10 + i))
        torch.testing.assert_close(both[i : i + 1], alone, atol=1e-6, rtol=0)


def test_callback_and_extra_args():
    seen = []

    def denoiser(x, sigma, offset):
        return gaussian_denoiser(x, sigma) + offset

    x_t = torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(0)) * SIGMAS[0]
    x = SAMPLERS["heun"](denoiser, x_t, SIGMAS, extra_args={"offset": 0.0}, callback=seen.append)
    assert [c["i"] for c in seen] == list(range(12))
    torch.testing.assert_close(seen[-1]["x"], x)
    assert float(seen[0]["sigma"]) == pytest.approx(14.6, rel=1e-6)
