"""The VQGAN objective (Esser et al. 2021, "Taming Transformers", sec. 3.1; seed 000 sec. 5.1.4).

A VQGAN is a VQ autoencoder trained as the generator of a GAN: its network is the VQ-VAE's
(`t2i.autoencoders.vq.VQAutoencoder`, the same conv ResNet + attention as taming's VQModel), what
changes is the loss (eq. 5-6):

    L = L_rec + w_p * L_perceptual + L_VQ + lambda * L_GAN

- L_rec: L1 (VQGAN) or MSE per pixel.
- L_perceptual: LPIPS in VQGAN; here the frozen shapes CLIP image tower's features
  (`t2i.autoencoders.perceptual`, which says why).
- L_VQ: the quantizer's own term (commitment, or ViT-VQGAN's codebook + commitment).
- L_GAN = -D(x_hat) with a patch discriminator trained on the hinge loss, switched on at
  `disc_start`, and lambda the adaptive weight (eq. 7): ||grad L_rec'|| / ||grad L_GAN|| at the
  decoder's last layer, times `disc_weight`, where L_rec' is the reconstruction + perceptual term.
The same objective trains ViT-VQGAN (Yu et al. 2022 sec. 3.3: L2 + perceptual + GAN).
The discriminator, the hinge loss and the adaptive weight are the KL autoencoder's
(`t2i.autoencoders.losses`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.autoencoders.losses import AutoencoderLoss, PatchDiscriminator, adaptive_weight


@dataclass
class VQGANLossConfig:
    """Weights of the VQGAN objective."""

    rec_loss: str = "l1"  # "l1" (VQGAN) or "mse" (ViT-VQGAN's L2)
    perceptual_weight: float = 1.0  # 0: no perceptual term
    disc_weight: float = 0.8  # taming's default, on top of the adaptive weight; 0: no GAN
    disc_start: int = 1000  # step at which the adversarial terms switch on
    disc_channels: int = 32
    disc_layers: int = 2  # 2 strided layers suit 64 px


def reconstruction_loss(kind: str, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel L1 ("l1") or squared error ("mse")."""
    if kind == "l1":
        return F.l1_loss(recon, x)
    if kind == "mse":
        return F.mse_loss(recon, x)
    raise ValueError(f"rec_loss must be l1 or mse, not {kind!r}")


def adversarial_term(discriminator: nn.Module, recon: torch.Tensor, nll: torch.Tensor,
                     last_layer: torch.Tensor | None, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_GAN = -mean D(recon), its weight lambda = adaptive weight (eq. 7) * `weight`) for the generator
    step. The discriminator is called unwrapped with its parameters frozen: it gets no gradient here.
    Without `last_layer` (or outside autograd) lambda is `weight` alone."""
    discriminator.requires_grad_(False)
    try:
        g_loss = -discriminator(recon).mean()
    finally:
        discriminator.requires_grad_(True)
    if last_layer is not None and torch.is_grad_enabled():
        return g_loss, adaptive_weight(nll, g_loss, last_layer) * weight
    return g_loss, torch.tensor(weight)


class VQGANLoss(nn.Module):
    """The generator and discriminator losses. Holds the discriminator (trained, checkpointed); the
    frozen perceptual network is held outside the module tree (not in any state dict)."""

    def __init__(self, cfg: VQGANLossConfig, perceptual: nn.Module | None, in_channels: int = 3) -> None:
        super().__init__()
        if cfg.perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual network")
        self.cfg = cfg
        self.__dict__["perceptual"] = perceptual  # plain attribute: frozen, reloaded, never checkpointed
        self.discriminator = PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers)

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, vq_loss: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the tokenizer for images x and reconstructions (B, C, H, W) in [-1, 1], the
        quantizer's term `vq_loss`, at training `step`; last_layer: the decoder's output weight (the
        adaptive weight's; None: weight `disc_weight` alone)."""
        rec = reconstruction_loss(self.cfg.rec_loss, x, recon)
        nll = rec
        logs = {"vq/rec": rec.item()}
        if self.cfg.perceptual_weight > 0:
            p = self.perceptual(recon, x).mean()
            nll = nll + self.cfg.perceptual_weight * p
            logs["vq/perceptual"] = p.item()
        loss = nll + vq_loss
        if step >= self.cfg.disc_start and self.cfg.disc_weight > 0:
            g_loss, d_weight = adversarial_term(self.discriminator, recon, nll, last_layer, self.cfg.disc_weight)
            loss = loss + d_weight * g_loss
            logs.update({"vq/g_loss": g_loss.item(), "vq/d_weight": d_weight.item()})
        return loss, logs

    # The KL autoencoder's discriminator step reads only `cfg.disc_start` and `discriminator`, which
    # this loss has too: hinge loss on real x and detached reconstructions in one batch.
    discriminator_loss = AutoencoderLoss.discriminator_loss
