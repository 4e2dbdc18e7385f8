"""VQ-VAE: a convolutional autoencoder whose latent is a grid of codebook entries.

van den Oord et al. 2017 ("Neural Discrete Representation Learning"), with the codebook learnt
by exponential moving averages as in its appendix A.1 and VQ-VAE-2 (Razavi et al. 2019,
appendix / Algorithm 1), and dead codes restarted from the batch's encodings (Dhariwal et al.
2020, Jukebox, sec. 3.1 "random restarts"). An image becomes (B, h, w) integer codes, the tokens
the autoregressive and masked models of `t2i.tokens` write.

- Quantization (eq. 1-2): z_q = e_k with k = argmin_j ||z_e - e_j||^2, per latent position.
- Straight-through gradient (sec. 3.2): the decoder's gradient at z_q is copied to z_e,
  written as z_e + sg(z_q - z_e).
- Loss (eq. 3) without the codebook term, which the EMA update replaces:
  beta * ||z_e - sg(e)||^2 (the commitment loss; beta = 0.25 in the paper).
- EMA codebook (VQ-VAE eq. 6-8): N_i <- g N_i + (1 - g) n_i, m_i <- g m_i + (1 - g) sum of the
  encodings assigned to i, e_i = m_i / N_i, with N Laplace-smoothed
  (N_i + eps) / (n + K eps) * n (n = sum N) so an unused code never divides by zero.

The encoder and decoder are the KL autoencoder's (`t2i.autoencoders.kl`), composed, and the
parameter names are those of diffusers' `VQModel` (which shares that layout), so its weights
load through `t2i.checkpoints.diffusers_vq`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from t2i.autoencoders.kl import AutoencoderKLConfig, Decoder, Encoder


@dataclass
class Quantized:
    """What the quantizer returns for latents (B, D, h, w).

    z_q: (B, D, h, w) the chosen codes, with the straight-through gradient to z_e.
    codes: (B, h, w) int64 codebook indices.
    commitment: scalar beta * mean ||z_e - sg(z_q)||^2 (the encoder's VQ loss).
    perplexity: scalar exp(entropy of the batch's code histogram): K if every code is used
        equally, 1 if one code takes everything.
    dead_codes: scalar int, codes whose EMA usage N_i is below the restart threshold (before this
        step's restarts, so in training: how many were just restarted).
    """

    z_q: torch.Tensor
    codes: torch.Tensor
    commitment: torch.Tensor
    perplexity: torch.Tensor
    dead_codes: torch.Tensor


def code_perplexity(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """exp(-sum_k p_k log p_k) of the histogram p of `codes` (any shape, values in [0, num_codes))."""
    p = torch.bincount(codes.flatten(), minlength=num_codes).float() / codes.numel()  # (K,)
    return torch.exp(-torch.sum(p * torch.log(p.clamp_min(1e-10))))


class VectorQuantizer(nn.Module):
    """Nearest-code quantization with an EMA-learnt codebook and dead-code restarts.

    Args:
        num_codes: codebook size K.
        dim: code width D (the channels of the latents it quantizes).
        beta: commitment loss weight.
        decay: EMA decay g of the cluster sizes and sums (0.99 in VQ-VAE).
        eps: Laplace smoothing of the cluster sizes.
        dead_threshold: a code whose EMA cluster size N_i falls below this (in encodings per step) is
            restarted at a random encoding of the batch; 0 turns restarts off.

    Buffers (checkpointed; none is a parameter, the optimizer never touches the codebook):
        codebook (K, D), cluster_size N (K,), embed_avg m (K, D). N starts at 1 and m at the
        codebook, so e = m / N holds from the first step and a code only drifts when it is used.
    The EMA update and the restarts run in `forward` while the module is training. In a process
    group the cluster sizes and sums are summed over the ranks (the EMA sees the global batch) and
    the restart encodings come from rank 0, so every rank keeps the same codebook by itself.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, decay: float = 0.99, eps: float = 1e-5,
                 dead_threshold: float = 1.0) -> None:
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.decay, self.eps, self.dead_threshold = beta, decay, eps, dead_threshold
        # diffusers' VQModel init; with restarts on, the first step replaces every unused code anyway.
        codebook = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_avg", codebook.clone())

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (N, D) -> (N,) index of the nearest code by squared distance (eq. 1).
        ||z||^2 is the same for every code, so argmin ||e||^2 - 2 z.e suffices."""
        e = self.codebook
        dist = e.pow(2).sum(1) - 2.0 * flat @ e.t()  # (N, K)
        return dist.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> code vectors (B, D, h, w)."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> Quantized:
        """z: (B, D, h, w) encoder output -> Quantized. In training mode the codebook is updated from
        this batch afterwards (the returned z_q holds the codes it was quantized with); `generator`
        draws the restart encodings."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B h w, D)
        codes = self.nearest(flat.detach())  # (B h w,)
        z_q = self.lookup(codes.view(b, h, w))  # (B, D, h, w), no gradient to the codebook
        commitment = self.beta * F.mse_loss(z, z_q)  # eq. 3, third term
        perplexity = code_perplexity(codes, self.num_codes)
        if self.training:
            dead = self.ema_update(flat.detach(), codes, generator)
        else:
            dead = (self.cluster_size < self.dead_threshold).sum()
        z_st = z + (z_q - z).detach()  # straight-through: dL/dz_e = dL/dz_q
        return Quantized(z_st, codes.view(b, h, w), commitment, perplexity, dead)

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, codes: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """One EMA step of the codebook (VQ-VAE eq. 6-8, Laplace-smoothed), then restart the dead
        codes at random rows of `flat`. flat: (N, D) encodings, codes: (N,) their codes.
        Returns the number of codes restarted."""
        onehot = F.one_hot(codes, self.num_codes).type_as(flat)  # (N, K)
        counts = onehot.sum(0)  # (K,) n_i
        sums = onehot.t() @ flat  # (K, D) sum of the encodings assigned to each code
        grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if grouped:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n  # (K,)
        self.codebook.copy_(self.embed_avg / smoothed.unsqueeze(1))
        dead = self.cluster_size < self.dead_threshold  # (K,)
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(0, flat.shape[0], (n_dead,), generator=generator, device=flat.device)
            fresh = flat[pick]  # (n_dead, D)
            if grouped:
                dist.broadcast(fresh, src=0)
            self.codebook[dead] = fresh
            # Counted as one fresh encoding each (the EMA's starting point), so e = m / N still holds.
            self.cluster_size[dead] = 1.0
            self.embed_avg[dead] = fresh
        return torch.tensor(n_dead)


@dataclass
class VQAutoencoderConfig:
    """Shape of a VQ autoencoder: the KL autoencoder's blocks around a vector quantizer.

    Attributes:
        in_channels, out_channels, block_channels, layers_per_block, norm_groups, mid_attention:
            as in `AutoencoderKLConfig` (the same encoder and decoder).
        latent_channels: encoder output / decoder input channels.
        code_dim: codebook width D; 1x1 convs map latent_channels <-> code_dim (diffusers'
            `vq_embed_dim`; None: latent_channels).
        num_codes: codebook size K.
        beta, decay, eps, dead_threshold: of the `VectorQuantizer`.
        sample_size: image size the model was trained at (metadata).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    latent_channels: int = 16
    norm_groups: int = 8
    mid_attention: bool = True
    code_dim: int | None = None
    num_codes: int = 256
    beta: float = 0.25
    decay: float = 0.99
    eps: float = 1e-5
    dead_threshold: float = 1.0
    sample_size: int = 64

    def __post_init__(self) -> None:
        self.block_channels = tuple(self.block_channels)

    @property
    def dim(self) -> int:
        """The codebook width D."""
        return self.latent_channels if self.code_dim is None else self.code_dim

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each axis."""
        return 2 ** (len(self.block_channels) - 1)

    def blocks(self) -> AutoencoderKLConfig:
        """The encoder/decoder shape as the KL autoencoder's config."""
        return AutoencoderKLConfig(
            in_channels=self.in_channels, out_channels=self.out_channels, block_channels=self.block_channels,
            layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
            norm_groups=self.norm_groups, mid_attention=self.mid_attention, scaling_factor=1.0,
            sample_size=self.sample_size)


class VQAutoencoder(nn.Module):
    """x (B, 3, H, W) in [-1, 1] <-> codes (B, H / f, W / f).

    encoder -> quant_conv -> quantize -> post_quant_conv -> decoder, names as diffusers' VQModel.
    """

    def __init__(self, cfg: VQAutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        blocks = cfg.blocks()
        self.encoder = Encoder(blocks, double_z=False)  # the latent itself, not a Gaussian's moments
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.dim, 1)
        self.quantize = VectorQuantizer(cfg.num_codes, cfg.dim, cfg.beta, cfg.decay, cfg.eps, cfg.dead_threshold)
        self.post_quant_conv = nn.Conv2d(cfg.dim, cfg.latent_channels, 1)
        self.decoder = Decoder(blocks)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) -> z_e (B, D, H / f, W / f), before quantization (diffusers' `encode`)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) -> (codes (B, H / f, W / f) int64, z_q (B, D, H / f, W / f)). Does not update
        the codebook, even in training mode."""
        z = self.encode_latents(x)  # (B, D, h, w)
        codes = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))  # (B h w,)
        codes = codes.view(z.shape[0], *z.shape[2:])  # (B, h, w)
        return codes, self.quantize.lookup(codes)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, D, h, w) -> image (B, 3, h * f, w * f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) int64 -> image (B, 3, h * f, w * f)."""
        return self.decode(self.quantize.lookup(codes))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, Quantized]:
        """Reconstruction for training: (x_hat (B, 3, H, W), Quantized); in training mode the
        codebook takes its EMA step (restarts drawn from `generator`)."""
        q = self.quantize(self.encode_latents(x), generator)
        return self.decode(q.z_q), q


VQ_CONFIGS: dict[str, VQAutoencoderConfig] = {
    # f = 4 on the 64x64 shapes world: 16x16 tokens over 256 codes.
    "f4": VQAutoencoderConfig(block_channels=(32, 64, 128), latent_channels=16, num_codes=256),
    # f = 8: 8x8 tokens, a wider codebook for the coarser grid.
    "f8": VQAutoencoderConfig(block_channels=(32, 64, 128, 128), latent_channels=16, num_codes=512),
    # f = 8 at half the width: 0.99 M parameters (2.0 MB in fp16, 1.2 MB of it the decoder), small enough to
    # ship inside a token model of at most 5 MB (issue 19); the shapes world's flat colours need little width.
    "f8-small": VQAutoencoderConfig(block_channels=(16, 32, 64, 64), latent_channels=16, num_codes=512),
    # Test-sized (f = 4): a fraction of a second per step on one core.
    "tiny": VQAutoencoderConfig(block_channels=(8, 16, 16), latent_channels=8, num_codes=32, mid_attention=False,
                                sample_size=16),
}
