"""Guidance wrappers: classifier-free guidance (with rescale), dynamic thresholding, clipping."""

from __future__ import annotations

import pytest
import torch

from t2i.diffusion.denoiser import DiscreteDenoiser
from t2i.diffusion.guidance import CFGDenoiser, ClipDenoised, cat_cond, rescale_guidance
from t2i.diffusion.schedules import alphas_cumprod_from_betas, make_betas
from t2i.diffusion.thresholding import DynamicThresholding

ACP = alphas_cumprod_from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012))


class CondNet(torch.nn.Module):
    """A small nonlinear 'network' of (x_vp, t, context, extra) that records its batch sizes."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.randn(4, 4, generator=g) * 0.5
        self.calls: list[int] = []

    def forward(self, x, t, context, added=None):
        self.calls.append(x.shape[0])
        h = torch.einsum("bchw,cd->bdhw", x, self.w).tanh()
        bias = context.mean(dim=1)[:, :4, None, None]  # (B, 4, 1, 1)
        if added is not None:
            bias = bias + added["pooled"][:, :4, None, None]
        return h + bias + 1e-3 * t.reshape(-1, 1, 1, 1)


def _inputs(b=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, 5, 5, generator=g) * 3
    sigma = torch.full((b,), 2.5)

    def branch():
        context = torch.randn(b, 7, 8, generator=g)
        return {"context": context, "added": {"pooled": torch.randn(b, 8, generator=g)}}

    cond, uncond = branch(), branch()
    return x, sigma, cond, uncond


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_cfg_equals_hand_computed_guidance_in_one_batched_pass(prediction):
    net = CondNet()
    den = DiscreteDenoiser(net, ACP, prediction)
    x, sigma, cond, uncond = _inputs()
    guided = CFGDenoiser(den, scale=7.5)(x, sigma, cond=cond, uncond=uncond)
    assert net.calls == [4]  # cond and uncond in one pass of batch 2B
    d_c = den(x, sigma, **cond)
    d_u = den(x, sigma, **uncond)
    torch.testing.assert_close(guided, d_u + 7.5 * (d_c - d_u), atol=1e-5, rtol=1e-5)


def test_cfg_scale_one_or_no_uncond_runs_the_conditional_branch_only():
    net = CondNet()
    den = DiscreteDenoiser(net, ACP, "epsilon")
    x, sigma, cond, uncond = _inputs()
    a = CFGDenoiser(den, scale=1.0)(x, sigma, cond=cond, uncond=uncond)
    b = CFGDenoiser(den, scale=5.0)(x, sigma, cond=cond)
    assert net.calls == [2, 2]
    torch.testing.assert_close(a, den(x, sigma, **cond))
    torch.testing.assert_close(b, a)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_guidance_rescale_matches_diffusers(prediction):
    """diffusers rescales the network outputs (eps or v); our wrapper works in x0 space."""
    pipeline = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    net = CondNet()
    den = DiscreteDenoiser(net, ACP, prediction)
    x, sigma, cond, uncond = _inputs()
    ours = CFGDenoiser(den, scale=6.0, rescale=0.7)(x, sigma, cond=cond, uncond=uncond)

    s = sigma.reshape(-1, 1, 1, 1)
    t = den.sigma_to_t(sigma)
    x_vp = x / (s**2 + 1) ** 0.5
    out_c, out_u = net(x_vp, t, **cond), net(x_vp, t, **uncond)
    out = pipeline.rescale_noise_cfg(out_u + 6.0 * (out_c - out_u), out_c, guidance_rescale=0.7)
    if prediction == "epsilon":
        ref = x - s * out
    else:
        ref = out * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    plain = CFGDenoiser(den, scale=6.0)(x, sigma, cond=cond, uncond=uncond)
    assert (ours - plain).abs().max() > 0.05  # the rescale did something


def test_rescale_guidance_formula():
    g = torch.Generator().manual_seed(1)
    cfg, pos = torch.randn(2, 3, 4, 4, generator=g) * 3, torch.randn(2, 3, 4, 4, generator=g)
    out = rescale_guidance(cfg, pos, 1.0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), pos.std(dim=(1, 2, 3)))
    torch.testing.assert_close(rescale_guidance(cfg, pos, 0.0), cfg)


def test_dynamic_thresholding_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 6, 6, generator=g) * torch.tensor([0.5, 2.0, 5.0]).reshape(3, 1, 1, 1)
    wrapped = DynamicThresholding(lambda x, sigma: x0, percentile=0.9, max_value=2.5)
    torch.testing.assert_close(wrapped(torch.zeros(3), 1.0), sched._threshold_sample(x0), atol=0, rtol=0)
    assert wrapped(torch.zeros(3), 1.0)[0].abs().max() <= 1.0  # row 0: s clamped to 1, i.e. plain clipping


def test_clip_denoised():
    x0 = torch.tensor([-3.0, -0.5, 0.2, 1.7])
    clipped = ClipDenoised(lambda x, s: x0, 1.0)(x0, 1.0)
    torch.testing.assert_close(clipped, torch.tensor([-1.0, -0.5, 0.2, 1.0]))


def test_cat_cond_nested_and_errors():
    a = {"c": torch.zeros(1, 2), "added": {"p": torch.zeros(1, 3)}, "mode": "x"}
    b = {"c": torch.ones(1, 2), "added": {"p": torch.ones(1, 3)}, "mode": "x"}
    both = cat_cond(a, b)
    assert both["c"].shape == (2, 2) and both["added"]["p"][1].sum() == 3 and both["mode"] == "x"
    with pytest.raises(ValueError, match="different keys"):
        cat_cond(a, {"c": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="differs"):
        cat_cond(a, dict(b, mode="y"))
