"""The autoencoder objective (LDM's first stage without LPIPS): golden values for the hinge loss,
the adaptive weight and the L1/NLL/KL terms; the generator step leaves the discriminator alone."""

from __future__ import annotations

import math

import pytest
import torch

from t2i.autoencoders.losses import (
    AutoencoderLoss,
    AutoencoderLossConfig,
    PatchDiscriminator,
    adaptive_weight,
    hinge_d_loss,
)


def test_hinge_loss_golden():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    w = torch.nn.Parameter(torch.ones(2, 2))
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # |a| = 5
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # |b| = 1
    nll, g = (w * a).sum(), (w * b).sum()
    assert adaptive_weight(nll, g, w).item() == pytest.approx(5 / (1 + 1e-4))
    huge = adaptive_weight(nll, g * 1e-9, w)
    assert huge.item() == 1e4  # clamped


def test_patch_discriminator_gives_a_logit_per_patch():
    d = PatchDiscriminator(3, 16, n_layers=2)
    out = d(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 14, 14)  # 64 -> 32 -> 16 (stride 2), then two 4x4 stride-1 convs: 15, 14
    conv0 = d.main[0].weight
    assert abs(conv0.std().item() - 0.02) < 0.005  # DCGAN init


def test_generator_loss_terms_before_and_after_the_discriminator_starts():
    torch.manual_seed(0)
    cfg = AutoencoderLossConfig(kl_weight=1e-3, disc_weight=0.5, disc_start=10, disc_channels=8, disc_layers=2)
    loss_fn = AutoencoderLoss(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    last = torch.nn.Parameter(torch.randn(16, 16) / 4)
    recon = torch.tanh(x @ last)  # a toy "decoder" whose last layer is `last`
    kl = torch.tensor([4.0, 6.0])
    loss, logs = loss_fn.generator_loss(x, recon, kl, step=9, last_layer=last)
    l1_sum = (x - recon).abs().sum().item()
    # logvar starts at 0: NLL = sum |x - x_hat| / B; KL = sum kl / B = 5
    assert loss.item() == pytest.approx(l1_sum / 2 + 1e-3 * 5.0, rel=1e-6)
    assert logs["ae/l1"] == pytest.approx(l1_sum / x.numel(), rel=1e-6)
    assert "ae/g_loss" not in logs

    loss2, logs2 = loss_fn.generator_loss(x, recon, kl, step=10, last_layer=last)
    g = -loss_fn.discriminator(recon).mean()
    expected = l1_sum / 2 + 1e-3 * 5.0 + logs2["ae/d_weight"] * g.item()
    assert loss2.item() == pytest.approx(expected, rel=1e-5)
    assert logs2["ae/d_weight"] > 0 and math.isfinite(logs2["ae/d_weight"])
    loss2.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())  # frozen in the generator step
    assert last.grad is not None and loss_fn.logvar.grad is not None
    assert all(p.requires_grad for p in loss_fn.discriminator.parameters())  # and unfrozen afterwards


def test_discriminator_loss_is_off_before_start_and_trains_the_discriminator_after():
    torch.manual_seed(0)
    loss_fn = AutoencoderLoss(AutoencoderLossConfig(disc_start=5, disc_channels=8, disc_layers=2))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    recon = x + 0.3 * torch.randn_like(x)
    off, _ = loss_fn.discriminator_loss(x, recon, step=4)
    assert off.item() == 0.0
    opt = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-3)
    first = None
    for _ in range(30):
        d_loss, logs = loss_fn.discriminator_loss(x, recon, step=5)
        first = d_loss.item() if first is None else first
        opt.zero_grad()
        d_loss.backward()
        opt.step()
    assert d_loss.item() < 0.5 * first  # it learns to tell real from fake
    assert logs["disc/real"] > logs["disc/fake"]
