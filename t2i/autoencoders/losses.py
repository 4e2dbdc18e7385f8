"""Losses for training the KL autoencoder (seed 002, "Perceptual Image Compression").

The first stage of latent diffusion is trained as a VAE-GAN: a pixel reconstruction term,
a small KL pull of the posterior towards N(0, I) so the latent space stays well-scaled,
and a patch-based adversarial term that makes reconstructions locally realistic instead
of blurry. The adversarial term starts after a warm-up (the discriminator is useless
against a random decoder) and is weighted adaptively so its gradient at the decoder's last
layer has the size of the reconstruction gradient (Esser et al., "Taming Transformers",
eq. 7). No LPIPS term: it needs pretrained VGG weights we cannot download.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (pix2pix): strided 4x4 convolutions whose output is one logit per
    overlapping patch of the input, not one per image.

    Args:
        in_channels: image channels.
        channels: width of the first layer, doubled per layer up to 8x.
        n_layers: strided layers; each halves the resolution (3 for 256 px, 2 suits 64 px).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # The DCGAN init pix2pix and LDM use: N(0, 0.02) convolutions, N(1, 0.02) norm scales.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> patch logits (B, 1, h, w)."""
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator: real logits pushed above +1, fake below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


@dataclass
class AutoencoderLossConfig:
    """Weights of the autoencoder objective (LDM's `LPIPSWithDiscriminator` without LPIPS)."""

    kl_weight: float = 1e-6  # KL is summed over the latent, reconstruction over pixels
    disc_weight: float = 0.5  # scale on top of the adaptive weight
    disc_start: int = 2000  # step at which the adversarial terms switch on
    disc_channels: int = 32
    disc_layers: int = 2
    logvar_init: float = 0.0  # learned output log-variance of the Gaussian likelihood


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||dNLL/dW|| / ||dG/dW|| at the decoder's last layer W, clamped to [0, 1e4] and detached
    (Taming Transformers, eq. 7): the adversarial gradient is kept on the reconstruction's scale."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class AutoencoderLoss(nn.Module):
    """L1 reconstruction as a Gaussian NLL with a learned log-variance, KL, and a patch
    adversarial term. Holds the discriminator and the log-variance (both trained)."""

    def __init__(self, cfg: AutoencoderLossConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.logvar = nn.Parameter(torch.full((), cfg.logvar_init))
        self.discriminator = PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers)

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, kl: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the autoencoder (and logvar).

        x, recon: (B, C, H, W) in [-1, 1]; kl: (B,) KL of each posterior to N(0, I), summed over
        the latent. last_layer: the decoder's output weight, for the adaptive weight (None: use
        weight 1). The discriminator is called unwrapped (never through DDP) with its parameters
        frozen: it gets no gradient from this loss.
        """
        b = x.shape[0]
        rec = (x - recon).abs()  # (B, C, H, W)
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / b
        kl_loss = kl.sum() / b
        loss = nll + self.cfg.kl_weight * kl_loss
        logs = {"ae/l1": rec.mean().item(), "ae/nll": nll.item(), "ae/kl": kl_loss.item(),
                "ae/logvar": self.logvar.item()}
        if step >= self.cfg.disc_start and self.cfg.disc_weight > 0:
            disc = self.discriminator
            disc.requires_grad_(False)  # the generator step must not move the discriminator
            try:
                g_loss = -disc(recon).mean()
            finally:
                disc.requires_grad_(True)
            if last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_weight(nll, g_loss, last_layer) * self.cfg.disc_weight
            else:
                d_weight = torch.tensor(self.cfg.disc_weight)
            loss = loss + d_weight * g_loss
            logs.update({"ae/g_loss": g_loss.item(), "ae/d_weight": d_weight.item()})
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor, step: int,
                           discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss for the discriminator on real x and detached reconstructions (B, C, H, W).
        Real and fake go through in one batch so batch-norm statistics see both."""
        disc = discriminator or self.discriminator
        logits = disc(torch.cat([x.detach(), recon.detach()]))  # (2B, 1, h, w)
        real, fake = logits.chunk(2)
        d_loss = hinge_d_loss(real, fake)
        on = 1.0 if step >= self.cfg.disc_start else 0.0
        return on * d_loss, {"disc/loss": d_loss.item(), "disc/real": real.mean().item(),
                             "disc/fake": fake.mean().item()}
