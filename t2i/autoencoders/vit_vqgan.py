"""ViT-VQGAN: a Vision Transformer encoder and decoder over image patches around factorized,
l2-normalised codes (Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN"; seed 000
sec. 5.1.5).

- Encoder: non-overlapping p x p patches -> linear embedding + learned positions -> pre-norm
  transformer blocks -> LayerNorm -> linear to the low-dimensional lookup space (sec. 3.2
  "factorized codes": the code search happens in e.g. 8 dimensions, not the transformer's width).
- Quantization (sec. 3.2): both the projected encoding and every code are l2-normalised, and the
  nearest code by Euclidean distance between unit vectors is the one of largest cosine similarity.
  The codebook is learnt by gradient (the codebook term of VQ-VAE eq. 3 on the normalised vectors)
  rather than by EMA, with VQ-VAE's commitment term and the straight-through gradient; codes whose
  usage fell below a threshold are restarted from the batch (`t2i.autoencoders.codebook`).
- Decoder: linear from the code space to the width + learned positions -> blocks -> LayerNorm ->
  linear to p * p * 3 pixels per token, folded back into the image.
Trained with the VQGAN objective (`t2i.autoencoders.vqgan`). The token interface is the VQ-VAE's:
encode -> (B, h, w) codes, decode_codes, quantize.lookup, cfg.num_codes, cfg.downsample_factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.autoencoders.codebook import restart_dead, update_usage
from t2i.autoencoders.vq import Quantized, code_perplexity
from t2i.nets.transformer import PreNormBlock


class FactorizedQuantizer(nn.Module):
    """Nearest code among l2-normalised codes of a low dimension D, by cosine similarity.

    Args:
        num_codes: codebook size K.
        dim: lookup dimension D (ViT-VQGAN: 32; 8 here by default).
        beta: commitment weight.
        decay: EMA decay of the code usage.
        dead_threshold: codes used fewer than this many times per step (EMA) are restarted; 0: off.
    The codebook (K, D) is a parameter; `lookup` returns its rows normalised to unit length.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, decay: float = 0.99,
                 dead_threshold: float = 1.0) -> None:
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.decay, self.dead_threshold = decay, dead_threshold
        self.codebook = nn.Parameter(torch.randn(num_codes, dim))
        self.register_buffer("usage", torch.ones(num_codes))

    def unit_codebook(self) -> torch.Tensor:
        """(K, D) the codes at unit length."""
        return F.normalize(self.codebook, dim=1)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (N, D) -> (N,) the code of largest cosine similarity (= the nearest on the unit sphere)."""
        return (F.normalize(flat, dim=1) @ self.unit_codebook().t()).argmax(1)  # (N, K) -> (N,)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> unit code vectors (B, D, h, w)."""
        return F.embedding(codes, self.unit_codebook()).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> Quantized:
        """z (B, D, h, w) projected encodings -> Quantized; `commitment` holds both eq. 3 terms on the
        unit vectors (codebook ||sg(z) - e||^2 + beta ||z - sg(e)||^2). In training mode the usage is
        updated and dead codes restarted at this batch's (normalised) encodings, drawn from `generator`."""
        b, d, h, w = z.shape
        z = F.normalize(z, dim=1)  # (B, D, h, w) on the unit sphere
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B h w, D)
        codes = self.nearest(flat.detach())  # (B h w,)
        e = F.embedding(codes, self.unit_codebook()).view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w) with grad
        loss = F.mse_loss(e, z.detach()) + self.beta * F.mse_loss(z, e.detach())
        perplexity = code_perplexity(codes, self.num_codes)
        if self.training:
            update_usage(self.usage, codes, self.decay)
            dead = restart_dead(self.codebook.data, self.usage, flat.detach(), self.dead_threshold, generator)
        else:
            dead = (self.usage < self.dead_threshold).sum()
        z_st = z + (e - z).detach()  # straight-through
        return Quantized(z_st, codes.view(b, h, w), loss, perplexity, dead)


@dataclass
class ViTVQGANConfig:
    """Shape of a ViT-VQGAN. `kind` names the tokenizer family in saved configs.

    Attributes:
        sample_size: image side the positions are learnt for (images must have it).
        patch_size: pixels per code along each axis (the downsample factor).
        width, layers, heads, mlp_dim: of the encoder and of the decoder (each `layers` blocks).
        code_dim: the factorized lookup dimension; num_codes: K.
        beta, usage_decay, dead_threshold: of the `FactorizedQuantizer`.
    """

    kind: str = "vit-vqgan"
    in_channels: int = 3
    sample_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_dim: int = 512
    code_dim: int = 8
    num_codes: int = 512
    beta: float = 0.25
    usage_decay: float = 0.99
    dead_threshold: float = 1.0

    @property
    def downsample_factor(self) -> int:
        return self.patch_size

    @property
    def grid(self) -> int:
        """Codes per side."""
        return self.sample_size // self.patch_size


class _Tower(nn.Module):
    """Learned positions + pre-norm blocks + final LayerNorm over (B, N, width) tokens."""

    def __init__(self, cfg: ViTVQGANConfig) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.randn(1, cfg.grid**2, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(PreNormBlock(cfg.width, cfg.heads, cfg.mlp_dim, "gelu", 1e-5)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.position  # (B, N, width)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class ViTVQGAN(nn.Module):
    """x (B, 3, S, S) in [-1, 1] <-> codes (B, S / p, S / p)."""

    def __init__(self, cfg: ViTVQGANConfig) -> None:
        super().__init__()
        if cfg.sample_size % cfg.patch_size:
            raise ValueError(f"sample_size {cfg.sample_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        p2c = cfg.patch_size**2 * cfg.in_channels
        self.patch_embed = nn.Linear(p2c, cfg.width)
        self.encoder = _Tower(cfg)
        self.to_code = nn.Linear(cfg.width, cfg.code_dim)  # factorized: the search runs in code_dim
        self.quantize = FactorizedQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.usage_decay,
                                            cfg.dead_threshold)
        self.from_code = nn.Linear(cfg.code_dim, cfg.width)
        self.decoder = _Tower(cfg)
        self.to_pixels = nn.Linear(cfg.width, p2c)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, S, S) -> projected encodings (B, code_dim, S / p, S / p), before normalisation."""
        p, g = self.cfg.patch_size, self.cfg.grid
        if x.shape[-2:] != (self.cfg.sample_size,) * 2:
            raise ValueError(f"ViT-VQGAN takes {self.cfg.sample_size}px images, got {tuple(x.shape[-2:])}")
        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, N, C p p)
        h = self.encoder(self.patch_embed(patches))  # (B, N, width)
        return self.to_code(h).transpose(1, 2).reshape(x.shape[0], -1, g, g)  # (B, D, g, g)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (codes (B, g, g) int64, unit code vectors (B, D, g, g)); never updates the codebook."""
        z = self.encode_latents(x)
        codes = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])).view(z.shape[0], *z.shape[2:])
        return codes, self.quantize.lookup(codes)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, D, g, g) unit code vectors -> image (B, C, S, S)."""
        s, p = self.cfg.sample_size, self.cfg.patch_size
        h = self.decoder(self.from_code(z_q.flatten(2).transpose(1, 2)))  # (B, N, width)
        return F.fold(self.to_pixels(h).transpose(1, 2), (s, s), p, stride=p)  # (B, C, S, S)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, g, g) -> image (B, C, S, S)."""
        return self.decode(self.quantize.lookup(codes))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, Quantized]:
        """(reconstruction (B, C, S, S), Quantized); training mode updates the usage / restarts."""
        q = self.quantize(self.encode_latents(x), generator)
        return self.decode(q.z_q), q

    def last_layer(self) -> torch.Tensor:
        """The output weight the VQGAN adaptive weight is measured at."""
        return self.to_pixels.weight


VIT_VQGAN_CONFIGS: dict[str, ViTVQGANConfig] = {
    # 64x64 shapes: 8x8 patches -> 8x8 tokens (f8), or 4x4 patches -> 16x16 tokens (f4).
    "f8": ViTVQGANConfig(patch_size=8, num_codes=512),
    "f4": ViTVQGANConfig(patch_size=4, num_codes=256),
    "tiny": ViTVQGANConfig(sample_size=16, patch_size=4, width=32, layers=1, heads=2, mlp_dim=64, num_codes=32),
}
