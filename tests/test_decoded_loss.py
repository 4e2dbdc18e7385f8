"""DecodedLoss: the latent objective plus the acp-weighted L1 of the decoded x0 estimate on the
least noisy samples (the layout renderer's --pixel-weight, issue 17)."""

from __future__ import annotations

import pytest
import torch

from t2i.diffusion.losses import DecodedLoss, DiffusionLoss
from t2i.diffusion.schedules import ScheduleConfig


@pytest.fixture
def parts():
    torch.manual_seed(0)
    acp = ScheduleConfig(beta_schedule="linear").alphas_cumprod()
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    decoder = torch.nn.ConvTranspose2d(4, 3, 4, stride=4)  # (B, 4, 4, 4) -> (B, 3, 16, 16)
    decoder.requires_grad_(False)
    return acp, (lambda x, t, **c: net(x)), net, decoder


def test_it_equals_the_latent_loss_plus_the_formula_on_the_least_noisy_samples(parts):
    acp, model, _, decoder = parts
    x0, pixels = torch.randn(6, 4, 4, 4), torch.rand(6, 3, 16, 16) * 2 - 1
    loss = DecodedLoss(acp, "v_prediction", 5.0, decoder, pixel_weight=0.7, pixel_batch=2)
    got = loss(model, x0, {}, torch.Generator().manual_seed(3), pixels=pixels)
    # by hand, with the same draws
    plain = DiffusionLoss(acp, "v_prediction", 5.0)
    t, noise, a, x_t = plain.noised(x0, torch.Generator().manual_seed(3))
    out = model(x_t, t.float())
    latent = (plain.weights(t) * plain.simple(out, x0, noise, a)).mean()
    terms = []
    for i in sorted(range(6), key=lambda i: t[i].item())[:2]:
        x0_hat = a[i].sqrt() * x_t[i] - (1 - a[i]).sqrt() * out[i]  # v-prediction's x0
        terms.append(a[i].flatten() * (decoder(x0_hat[None]) - pixels[i]).abs().mean())
    want = latent + 0.7 * torch.cat(terms).mean()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.item() > latent.item() + 1e-3  # the pixel term is there


def test_the_pixel_term_trains_the_network_through_the_frozen_decoder(parts):
    acp, model, net, decoder = parts
    x0, pixels = torch.randn(4, 4, 4, 4), torch.rand(4, 3, 16, 16) * 2 - 1
    grads = []
    for weight in (0.0, 1.0):
        net.zero_grad()
        DecodedLoss(acp, "epsilon", None, decoder, weight, 4)(model, x0, {}, torch.Generator().manual_seed(1),
                                                              pixels=pixels).backward()
        grads.append(net.weight.grad.clone())
    assert (grads[1] - grads[0]).abs().max() > 1e-4
    assert decoder.weight.grad is None
    with pytest.raises(ValueError, match="pixels"):
        DecodedLoss(acp, "epsilon", None, decoder)(model, x0, {}, None)
