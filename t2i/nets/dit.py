"""DiT: the diffusion transformer of Peebles & Xie (2023), "Scalable Diffusion Models with Transformers".

Latents (B, C, H, W) are cut into p x p patches and linearly embedded (a stride-p convolution), a
fixed 2D sin-cos position embedding is added, and a stack of transformer blocks conditioned by
adaLN-Zero (sec. 3.2) runs over the tokens: the conditioning c = embed(t) + embed(class) is mapped
per block to (shift, scale, gate) for the attention and the MLP branches; the map is zero-initialised,
so every block starts as the identity. A final adaLN layer and a linear map give p * p * C_out values
per token, unpatchified to (B, C_out, H, W). With learned variance (IDDPM's Sigma, sec. 3.1)
C_out = 2C: eps then the variance interpolation values (`t2i.diffusion.precond.split_learned_variance`).

Class conditioning keeps a row for the null class (id num_classes) that classifier-free guidance
feeds the unconditional branch (DiT's class dropout in training). Names are t2i's own; the diffusers
layout (`DiTTransformer2DModel`) is mapped in `t2i.checkpoints.diffusers_dit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.attention import Attention
from t2i.nets.embeddings import SinusoidalEmbedding, TimestepEmbedding
from t2i.nets.transformer import MLP

FREQ_DIM = 256  # width of the sinusoidal timestep features DiT embeds (its TimestepEmbedder)


@dataclass
class DiTConfig:
    """Shape of a DiT. Defaults: DiT-XL/2 on 256x256 images (32x32x4 SD-VAE latents)."""

    sample_size: int = 32  # latent side the position embedding is made for
    patch_size: int = 2
    in_channels: int = 4
    width: int = 1152
    layers: int = 28
    heads: int = 16
    mlp_dim: int = 4608
    num_classes: int = 1000
    null_class: bool = True  # an extra embedding row, id num_classes, for the unconditional branch
    learn_sigma: bool = True  # output 2 * in_channels: eps then the variance values
    mlp_norm_eps: float = 1e-6  # the LayerNorm before the MLP (diffusers' conversion uses 1e-5)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


DIT_PRESETS: dict[str, DiTConfig] = {
    "XL/2": DiTConfig(),
    "B/2": DiTConfig(width=768, layers=12, heads=12, mlp_dim=3072),
    "S/2": DiTConfig(width=384, layers=12, heads=6, mlp_dim=1536),
    # test-sized: 8x8 latents, 16 tokens
    "tiny": DiTConfig(sample_size=8, width=32, layers=2, heads=2, mlp_dim=128, num_classes=8),
}


def sincos_2d(width: int, grid_h: int, grid_w: int, base_size: int) -> torch.Tensor:
    """The fixed 2D sin-cos position embedding (MAE's, which DiT uses), (grid_h * grid_w, width) float32,
    tokens row-major. Half the width encodes the column, half the row, each as [sin | cos] of
    pos * 10000^(-k / (width / 4)); positions are scaled so a grid of `base_size` spans 0..base_size - 1
    (diffusers' PatchEmbed at another size). Computed in float64 as the reference does."""
    if width % 4:
        raise ValueError(f"a 2D sin-cos embedding needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (W/4,)

    def embed(pos: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, W/2)
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows = torch.arange(grid_h, dtype=torch.float64) / (grid_h / base_size)
    cols = torch.arange(grid_w, dtype=torch.float64) / (grid_w / base_size)
    r, c = torch.meshgrid(rows, cols, indexing="ij")  # (gh, gw) each
    return torch.cat([embed(c.reshape(-1)), embed(r.reshape(-1))], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) normalised elsewhere, shift/scale (B, D) -> x * (1 + scale) + shift."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """One adaLN-Zero block (DiT Fig. 3): attention and MLP branches on LayerNorm'd tokens modulated
    by the conditioning, each branch scaled by its gate before the residual add."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.width
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.mlp_norm_eps)
        self.mlp = MLP(d, cfg.mlp_dim, "gelu_tanh")  # DiT's GELU is the tanh approximation
        self.ada = nn.Linear(d, 6 * d)
        # adaLN-Zero: the modulation starts at zero, so the gates are 0 and the block is the identity
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) tokens, c: (B, D) conditioning -> (B, N, D)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(F.silu(c)).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class DiT(nn.Module):
    """eps (and variance values) of latents x_t: forward(x (B, C, H, W), t (B,), class_labels (B,) long)
    -> (B, C_out, H, W). H and W must be multiples of patch_size."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"heads={cfg.heads} does not divide width={cfg.width}")
        self.cfg = cfg
        d, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, p, stride=p)
        self.time_proj = SinusoidalEmbedding(FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=1)
        self.t_embed = TimestepEmbedding(FREQ_DIM, d)
        self.class_embed = nn.Embedding(cfg.num_classes + int(cfg.null_class), d)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.layers))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, p * p * cfg.out_channels)
        for layer in (self.final_ada, self.proj_out):  # zero-initialised as DiT's final layer
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._pos: dict[tuple[int, int], torch.Tensor] = {}  # per token grid; fixed, not in the state dict

    @property
    def null_class(self) -> int:
        """The class id of the unconditional branch."""
        if not self.cfg.null_class:
            raise ValueError("this DiT has no null class, so it cannot be guided")
        return self.cfg.num_classes

    def position_embedding(self, gh: int, gw: int, like: torch.Tensor) -> torch.Tensor:
        if (gh, gw) not in self._pos:
            base = self.cfg.sample_size // self.cfg.patch_size
            self._pos[(gh, gw)] = sincos_2d(self.cfg.width, gh, gw, base)
        return self._pos[(gh, gw)].to(like.device, like.dtype)

    def conditioning(self, t: torch.Tensor, class_labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """c = MLP(sinusoid(t)) + embedding(class), (B, D)."""
        return self.t_embed(self.time_proj(t).to(dtype)) + self.class_embed(class_labels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, gh * gw, D)
        tokens = tokens + self.position_embedding(gh, gw, tokens)
        c = self.conditioning(t, class_labels.reshape(-1).expand(b), tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=1)
        out = self.proj_out(modulate(self.norm_out(tokens), shift, scale))  # (B, N, p * p * C_out)
        out = out.reshape(b, gh, gw, p, p, self.cfg.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, self.cfg.out_channels, h, w)
