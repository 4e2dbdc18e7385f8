"""The discrete VAE of DALL-E (Ramesh et al. 2021, sec. 2.1 and appendix A; seed 000 sec. 5.1.9 and 7.2).

The encoder outputs logits over K codes at every latent position: a categorical posterior
q(k | x). Training cannot sample it differentiably, so it uses the Gumbel-softmax relaxation
(Jang et al. 2017; Maddison et al. 2017):

    y = softmax((logits + g) / tau),  g ~ Gumbel(0, 1) per code,     z = sum_k y_k e_k

a soft one-hot that tends to a sample of q as tau -> 0 (the Gumbel-max trick). DALL-E anneals tau
from 1 to 1/16 and ramps the weight of the KL to the uniform prior up from 0 (its appendix A.2, both
on cosine schedules; `gumbel_temperature`, `kl_weight`). At inference the codes are the hard argmax
of the logits and z is their codebook vectors: z = e_k is the decoder's first 1x1 convolution over
a one-hot input, which is how DALL-E's decoder reads the codes.

    KL(q || U) = sum_k q_k log q_k + log K        per position (0 iff q is uniform)

The encoder and decoder are the KL autoencoder's blocks (`t2i.autoencoders.kl`), as for the VQ-VAE.
The reconstruction term here is MSE (DALL-E uses its logit-Laplace likelihood; on flat-coloured
shapes MSE is enough and keeps every tokenizer's reconstruction loss comparable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.autoencoders.codebook import update_usage
from t2i.autoencoders.conv_shape import ConvShape
from t2i.autoencoders.kl import Decoder, Encoder
from t2i.autoencoders.vq import Quantized, code_perplexity


def cosine_ramp(step: int, start: float, end: float, steps: int) -> float:
    """start at step 0 -> end at `steps` and after, along half a cosine (DALL-E's schedules)."""
    if steps <= 0 or step >= steps:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / steps))


def gumbel_temperature(step: int, start: float = 1.0, end: float = 1.0 / 16, steps: int = 2000) -> float:
    """The relaxation temperature tau at a training step: 1 -> 1/16 (DALL-E appendix A.2)."""
    return cosine_ramp(step, start, end, steps)


def kl_weight(step: int, weight: float, steps: int) -> float:
    """The KL weight beta at a training step: 0 -> weight over `steps` (DALL-E: 0 -> 6.6)."""
    return cosine_ramp(step, 0.0, weight, steps)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, K, h, w) -> mean over positions of KL(softmax(logits) || uniform over K)."""
    log_q = F.log_softmax(logits, dim=1)
    return (log_q.exp() * log_q).sum(1).mean() + math.log(logits.shape[1])


@dataclass
class GumbelQuantized(Quantized):
    """`Quantized` of the dVAE: `commitment` is the weighted KL (the quantizer's loss term), `kl` the
    unweighted one, `tau` the temperature used."""

    kl: torch.Tensor
    tau: float


class GumbelQuantizer(nn.Module):
    """Logits (B, K, h, w) -> code vectors (B, D, h, w): relaxed while training, hard argmax in eval mode.

    The codebook (K, D) is a parameter (DALL-E's decoder input convolution over one-hot codes); the
    usage buffer (an EMA of the codes' counts per step, `t2i.autoencoders.codebook`) counts the dead codes."""

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, dead_threshold: float = 1.0) -> None:
        super().__init__()
        self.num_codes, self.dim, self.decay, self.dead_threshold = num_codes, dim, decay, dead_threshold
        self.codebook = nn.Parameter(torch.randn(num_codes, dim))
        self.register_buffer("usage", torch.ones(num_codes))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> (B, D, h, w)."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def forward(self, logits: torch.Tensor, tau: float = 1.0, kl_weight: float = 0.0,
                generator: torch.Generator | None = None) -> GumbelQuantized:
        """logits (B, K, h, w). Training mode: the Gumbel-softmax mixture of codes at temperature tau
        (noise from `generator`) and a usage update; eval mode: the argmax codes' vectors."""
        codes = logits.argmax(1)  # (B, h, w) the hard codes, also in training (what a token model sees)
        kl = kl_to_uniform(logits)
        if self.training:
            u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            g = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))  # Gumbel(0, 1)
            y = F.softmax((logits + g) / tau, dim=1)  # (B, K, h, w) relaxed one-hot
            z = torch.einsum("bkhw,kd->bdhw", y, self.codebook)  # (B, D, h, w)
            update_usage(self.usage, codes, self.decay)
        else:
            z = self.lookup(codes)
        dead = (self.usage < self.dead_threshold).sum()
        return GumbelQuantized(z, codes, kl_weight * kl, code_perplexity(codes, self.num_codes), dead, kl, tau)


@dataclass
class DVAEConfig(ConvShape):
    """Shape of a dVAE: the conv blocks (`ConvShape`), `latent_channels` wide at the latent, a 1x1
    convolution to K logits, a (K, code_dim) codebook and a 1x1 convolution back.
    `kind` names the tokenizer family in saved configs."""

    kind: str = "dvae"
    latent_channels: int = 32
    num_codes: int = 256
    code_dim: int = 32
    usage_decay: float = 0.99
    dead_threshold: float = 1.0


class DVAE(nn.Module):
    """x (B, 3, H, W) in [-1, 1] <-> codes (B, H / f, W / f): encoder -> to_logits -> quantize ->
    post_quant_conv -> decoder."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        blocks = cfg.blocks()
        self.encoder = Encoder(blocks, double_z=False)
        self.to_logits = nn.Conv2d(cfg.latent_channels, cfg.num_codes, 1)
        self.quantize = GumbelQuantizer(cfg.num_codes, cfg.code_dim, cfg.usage_decay, cfg.dead_threshold)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(blocks)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, K, H / f, W / f) unnormalised log-probabilities of the codes."""
        return self.to_logits(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (codes (B, h, w) = argmax of the logits, their code vectors (B, D, h, w))."""
        codes = self.logits(x).argmax(1)
        return codes, self.quantize.lookup(codes)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D, h, w) -> image (B, C, h f, w f)."""
        return self.decoder(self.post_quant_conv(z))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantize.lookup(codes))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, tau: float = 1.0,
                kl_weight: float = 0.0) -> tuple[torch.Tensor, GumbelQuantized]:
        """(reconstruction, GumbelQuantized) at temperature tau; `commitment` = kl_weight * KL."""
        q = self.quantize(self.logits(x), tau, kl_weight, generator)
        return self.decode(q.z_q), q

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


DVAE_CONFIGS: dict[str, DVAEConfig] = {
    "f4": DVAEConfig(block_channels=(32, 64, 128), num_codes=256),
    "f8": DVAEConfig(block_channels=(32, 64, 128, 128), num_codes=512),
    "tiny": DVAEConfig(block_channels=(8, 16, 16), latent_channels=8, num_codes=32, code_dim=8, mid_attention=False,
                       sample_size=16),
}
