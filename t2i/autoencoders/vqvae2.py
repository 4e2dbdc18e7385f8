"""VQ-VAE-2: a two-level hierarchy of codes (Razavi et al. 2019, "Generating Diverse High-Fidelity Images
with VQ-VAE-2", sec. 3.1 and Fig. 2a; seed 000 sec. 8.2).

    x --bottom encoder--> h_b (H/f)  --top encoder (stride 2)--> h_t (H/2f) --VQ_top--> e_t
    e_t --top decoder (x2)--> d_t;   [h_b, d_t] --1x1--> VQ_bottom --> e_b
    [upsample(e_t), e_b] --1x1--> decoder --> x_hat

The top codes hold the global structure at half the bottom's resolution; the bottom codes are
quantized with the top's decoding as context, so they only add what the top lacks. Both
codebooks are the EMA ones of `t2i.autoencoders.vq.VectorQuantizer` (the paper's Algorithm 1), each
with dead-code restarts; the loss is reconstruction + both commitment terms.

Codes as one token sequence: the top grid in raster order, then the bottom grid, the bottom codes
offset by the top codebook's size. One vocabulary of top_codes + num_codes tokens, ordered as the
paper's prior factorises, p(top) p(bottom | top): an autoregressive model writes it as it is;
`encode_levels` / `decode_levels` keep the two grids apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2i.autoencoders.conv_shape import ConvShape
from t2i.autoencoders.kl import Decoder, Encoder
from t2i.autoencoders.vq import Quantized, VectorQuantizer


@dataclass
class VQVAE2Config(ConvShape):
    """Shape of a VQ-VAE-2. The bottom level is the VQ-VAE's (the conv blocks of `ConvShape`, f =
    2^(levels - 1) pixels per bottom code); the top adds one stride-2 level of `top_channels`. Both
    codebooks are `latent_channels` wide. `kind` names the tokenizer family in saved configs."""

    kind: str = "vqvae2"
    top_channels: int = 64
    bottom_codes: int = 256
    top_codes: int = 256
    beta: float = 0.25
    decay: float = 0.99
    eps: float = 1e-5
    dead_threshold: float = 1.0

    @property
    def num_codes(self) -> int:
        """Vocabulary of the token sequence: the top codes, then the bottom codes."""
        return self.top_codes + self.bottom_codes

    def tokens(self, height: int, width: int) -> int:
        """Tokens per image of height x width pixels: top grid + bottom grid."""
        h, w = height // self.downsample_factor, width // self.downsample_factor
        return (h // 2) * (w // 2) + h * w

    def allowed_codes(self, height: int, width: int) -> torch.Tensor:
        """(N, num_codes) bool: which tokens each position of the sequence of a height x width image can
        hold, the top codes (ids < top_codes) at the top grid's positions and the bottom codes at the
        bottom's (a token model's sampler keeps its draws to them: a top id at a bottom position has no
        code vector)."""
        n_top = self.tokens(height, width) - (height // self.downsample_factor) * (width // self.downsample_factor)
        is_top = torch.arange(self.tokens(height, width))[:, None] < n_top  # (N, 1)
        top_code = torch.arange(self.num_codes)[None, :] < self.top_codes  # (1, V)
        return is_top == top_code


@dataclass
class TwoLevelQuantized:
    """The two quantizers' outputs. `commitment`, `perplexity` and `dead_codes` are summed / of the
    bottom, as `Quantized` (what the training step logs); `top` and `bottom` are each level's."""

    top: Quantized
    bottom: Quantized

    @property
    def commitment(self) -> torch.Tensor:
        return self.top.commitment + self.bottom.commitment

    @property
    def perplexity(self) -> torch.Tensor:
        return self.bottom.perplexity

    @property
    def dead_codes(self) -> torch.Tensor:
        return self.top.dead_codes + self.bottom.dead_codes


def _conv_stack(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_mid, 3, padding=1), nn.SiLU(), nn.Conv2d(c_mid, c_out, 3, padding=1))


class VQVAE2(nn.Module):
    """x (B, 3, H, W) <-> (top codes (B, H/2f, W/2f), bottom codes (B, H/f, W/f))."""

    def __init__(self, cfg: VQVAE2Config) -> None:
        super().__init__()
        self.cfg = cfg
        c, t = cfg.latent_channels, cfg.top_channels
        blocks = cfg.blocks()
        self.encoder = Encoder(blocks, double_z=False)  # x -> h_b
        self.encoder_top = nn.Sequential(nn.Conv2d(c, t, 4, stride=2, padding=1), nn.SiLU(), _conv_stack(t, t, c))
        self.quantize_top = VectorQuantizer(cfg.top_codes, c, cfg.beta, cfg.decay, cfg.eps, cfg.dead_threshold)
        self.decoder_top = nn.Sequential(_conv_stack(c, t, t), nn.SiLU(),
                                         nn.ConvTranspose2d(t, c, 4, stride=2, padding=1))
        self.quant_conv = nn.Conv2d(2 * c, c, 1)  # [h_b, d_t] -> the bottom's input
        self.quantize = VectorQuantizer(cfg.bottom_codes, c, cfg.beta, cfg.decay, cfg.eps, cfg.dead_threshold)
        self.upsample_top = nn.ConvTranspose2d(c, c, 4, stride=2, padding=1)
        self.post_quant_conv = nn.Conv2d(2 * c, c, 1)  # [up(e_t), e_b] -> the decoder's input
        self.decoder = Decoder(blocks)

    def _levels(self, x: torch.Tensor, generator: torch.Generator | None, search_only: bool) -> TwoLevelQuantized:
        """Both levels; search_only: the nearest codes alone (no losses, no codebook update in any mode)."""
        h_b = self.encoder(x)  # (B, C, h, w)
        h_t = self.encoder_top(h_b)  # (B, C, h/2, w/2)
        q_t = self._nearest(self.quantize_top, h_t) if search_only else self.quantize_top(h_t, generator)
        z_b = self.quant_conv(torch.cat([h_b, self.decoder_top(q_t.z_q)], 1))  # (B, C, h, w)
        q_b = self._nearest(self.quantize, z_b) if search_only else self.quantize(z_b, generator)
        return TwoLevelQuantized(q_t, q_b)

    @staticmethod
    def _nearest(vq: VectorQuantizer, z: torch.Tensor) -> Quantized:
        """Quantize without touching the codebook (what `encode` uses, even in training mode)."""
        codes = vq.nearest(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])).view(z.shape[0], *z.shape[2:])
        zero = torch.zeros(())
        return Quantized(vq.lookup(codes), codes, zero, zero, zero)

    def encode_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (top codes (B, h/2, w/2), bottom codes (B, h, w)), int64."""
        q = self._levels(x, None, search_only=True)
        return q.top.codes, q.bottom.codes

    def decode_levels(self, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        """(top codes, bottom codes) -> image (B, C, H, W)."""
        return self.decode(self.quantize_top.lookup(top), self.quantize.lookup(bottom))

    def decode(self, e_t: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
        """Code vectors of both levels (B, C, h/2, w/2), (B, C, h, w) -> image."""
        return self.decoder(self.post_quant_conv(torch.cat([self.upsample_top(e_t), e_b], 1)))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x -> (token sequence (B, N) = [top raster; bottom raster + top_codes], (top, bottom) grids)."""
        top, bottom = self.encode_levels(x)
        return torch.cat([top.flatten(1), bottom.flatten(1) + self.cfg.top_codes], 1), (top, bottom)

    def split_tokens(self, tokens: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) tokens of `encode` for height x width images -> (top (B, h/2, w/2), bottom (B, h, w))."""
        h, w = height // self.cfg.downsample_factor, width // self.cfg.downsample_factor
        n_top = (h // 2) * (w // 2)
        return tokens[:, :n_top].view(-1, h // 2, w // 2), (tokens[:, n_top:] - self.cfg.top_codes).view(-1, h, w)

    def decode_codes(self, tokens: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """(B, N) tokens -> image; size: height x width (default: the config's sample_size square)."""
        height = height or self.cfg.sample_size
        return self.decode_levels(*self.split_tokens(tokens, height, width or height))

    def forward(self, x: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, TwoLevelQuantized]:
        """(reconstruction, TwoLevelQuantized); training mode updates both codebooks."""
        q = self._levels(x, generator, search_only=False)
        return self.decode(q.top.z_q, q.bottom.z_q), q

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


VQVAE2_CONFIGS: dict[str, VQVAE2Config] = {
    # 64x64: bottom 16x16 (f4) under a top 8x8.
    "f4": VQVAE2Config(block_channels=(32, 64, 128)),
    # bottom 8x8 (f8) under a top 4x4.
    "f8": VQVAE2Config(block_channels=(32, 64, 128, 128), bottom_codes=512),
    "tiny": VQVAE2Config(block_channels=(8, 16, 16), latent_channels=8, top_channels=16, bottom_codes=32, top_codes=16,
                         mid_attention=False, sample_size=16),
}
