"""Dynamic thresholding (Imagen sec. 2.3) vs diffusers' `thresholding=True`.

The function against `_threshold_sample` of the schedulers that have it, on inputs whose
per-sample percentile falls below 1, between 1 and the cap, and above the cap; then whole
sampler runs (the plan's wrapper / DDIM's x0 limiter) against diffusers' scheduler loops with
thresholding on, over the analytic network of the sampler parity tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from t2i.checkpoints.diffusers_scheduler import scheduler_config_from_dict
from t2i.diffusion.thresholding import DynamicThresholding, dynamic_threshold
from t2i.samplers import prepare_sampling

diffusers = pytest.importorskip("diffusers")

from test_samplers_parity import SD1, SD2, check, run_ours  # noqa: E402


def _x0(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(4, 3, 8, 8): samples of spread 0.3, 1, 1.3 and 6, so s lands below 1, twice between 1
    and the caps used below, and above them."""
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([0.3, 1.0, 1.3, 6.0]).reshape(4, 1, 1, 1)
    return (torch.randn(4, 3, 8, 8, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("ratio,cap", [(0.9, 2.5), (0.995, 1.5), (0.6, 10.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_function_equals_diffusers_threshold_sample(cls, ratio, cap, dtype):
    sched = getattr(diffusers, cls)(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=cap)
    x0 = _x0(dtype)
    want = sched._threshold_sample(x0)
    got = dynamic_threshold(x0, ratio, cap)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    # the wrapper is the same function of the inner denoiser's x0, with cond passed through
    wrapped = DynamicThresholding(lambda x, sigma, bias: x0 + bias, percentile=ratio, max_value=cap)
    assert torch.equal(wrapped(torch.zeros(4), 1.0, bias=0.0), want)


def test_the_three_regimes_of_s():
    """s < 1: plain clipping to [-1, 1]; 1 < s < cap: the sample's own percentile becomes 1;
    s > cap: divided by the cap, with values beyond it clipped."""
    x0 = _x0().double()
    flat = x0.abs().flatten(1)
    s = torch.quantile(flat, 0.9, dim=1)
    assert s[0] < 1 < s[1] < 2.5 < s[3] and s[2] < 2.5  # the inputs do reach every regime
    out = dynamic_threshold(x0, 0.9, 2.5).flatten(1)
    torch.testing.assert_close(out[0], x0[0].flatten().clamp(-1, 1), rtol=0, atol=0)
    for i in (1, 2):
        torch.testing.assert_close(out[i], x0[i].flatten().clamp(-s[i], s[i]) / s[i], rtol=0, atol=1e-15)
        assert out[i].abs().max() == 1.0
    torch.testing.assert_close(out[3], x0[3].flatten().clamp(-2.5, 2.5) / 2.5, rtol=0, atol=1e-15)
    # without a cap (the paper's form) the last sample is divided by its own percentile
    uncapped = dynamic_threshold(x0, 0.9).flatten(1)
    assert uncapped[3].abs().max() == 1.0 and not torch.allclose(uncapped[3], out[3])
    assert dynamic_threshold(x0, 0.9, math.inf).equal(dynamic_threshold(x0, 0.9))


def test_percentile_is_checked():
    with pytest.raises(ValueError, match="percentile"):
        DynamicThresholding(lambda x, sigma: x, percentile=99.5)


THRESHOLD = dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.5)


@pytest.mark.parametrize("config", [SD1, SD2], ids=["eps", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_sampler_runs_equal_diffusers_with_thresholding(sampler, config):
    """Our plan (wrapper, or DDIM's x0 limiter) vs diffusers' scheduler with thresholding=True."""
    config = {**config, **THRESHOLD}
    err = check(sampler, config, steps=6)
    assert err < 1e-5
    # thresholding changed the run by far more than the tolerance, so the check above has teeth
    with_thr, _ = run_ours(sampler, config, 6, False)
    without, _ = run_ours(sampler, {**config, "thresholding": False}, 6, False)
    assert ((with_thr - without).abs().max() / without.std()).item() > 0.05


def test_plan_wraps_with_the_one_implementation():
    cfg = scheduler_config_from_dict({**SD1, **THRESHOLD})
    plan = prepare_sampling(cfg, "ddpm", 4)
    wrapped = plan.limit_x0(lambda x, sigma: x)
    assert isinstance(wrapped, DynamicThresholding)
    assert (wrapped.percentile, wrapped.max_value) == (0.8, 1.5)
    ddim = prepare_sampling(cfg, "ddim", 4)
    x0 = _x0()
    assert torch.equal(ddim.x0_limiter()(x0), dynamic_threshold(x0, 0.8, 1.5))
