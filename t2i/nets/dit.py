"""DiT and PixArt-alpha: the diffusion transformers of Peebles & Xie (2023), "Scalable Diffusion
Models with Transformers", and Chen et al. (2023), "PixArt-alpha: Fast Training of Diffusion
Transformer for Photorealistic Text-to-Image Synthesis", as one network with options.

Latents (B, C, H, W) are cut into p x p patches and linearly embedded (a stride-p convolution), a
fixed 2D sin-cos position embedding is added, and a stack of transformer blocks runs over the tokens,
each modulated by the conditioning c = embed(t) [+ embed(class)] [+ embed(size, aspect ratio)]:

- adaLN-Zero (DiT sec. 3.2, `adaln="zero"`): every block maps c by its own zero-initialised MLP to
  (shift, scale, gate) for the attention and the MLP branches, so every block starts as the identity.
- adaLN-single (PixArt sec. 2.3, `adaln="single"`): one MLP shared by all blocks maps c to those
  6 x width values once; each block adds its own learned `scale_shift_table` (6, width). A third of
  DiT-XL's parameters were in the per-block MLPs; this removes them.

With `caption_dim` each block cross-attends to the projected text tokens between self-attention and
the MLP (PixArt sec. 2.3: no norm, no gate; its output projection starts at zero). A final adaptive
LayerNorm and a linear map give p * p * C_out values per token, unpatchified to (B, C_out, H, W).
With learned variance (IDDPM's Sigma, DiT sec. 3.1) C_out = 2C: eps then the variance interpolation
values (`t2i.diffusion.precond.split_learned_variance`).

Class conditioning keeps a row for the null class (id num_classes) that classifier-free guidance
feeds the unconditional branch (DiT's class dropout in training). Names are t2i's own; the diffusers
layouts are mapped in `t2i.checkpoints.diffusers_dit` (DiTTransformer2DModel) and
`t2i.checkpoints.diffusers_pixart` (PixArtTransformer2DModel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.attention import Attention
from t2i.nets.embeddings import SinusoidalEmbedding, TimestepEmbedding
from t2i.nets.transformer import MLP

FREQ_DIM = 256  # width of the sinusoidal timestep (and size) features DiT and PixArt embed
ADALN = ("zero", "single")


@dataclass
class DiTConfig:
    """Shape of a DiT / PixArt network. Defaults: DiT-XL/2 on 256x256 images (32x32x4 SD-VAE latents)."""

    sample_size: int = 32  # latent side the position embedding is made for
    patch_size: int = 2
    in_channels: int = 4
    width: int = 1152
    layers: int = 28
    heads: int = 16
    mlp_dim: int = 4608
    num_classes: int = 1000  # 0: not class-conditional (PixArt)
    null_class: bool = True  # an extra embedding row, id num_classes, for the unconditional branch
    learn_sigma: bool = True  # output 2 * in_channels: eps then the variance values
    mlp_norm_eps: float = 1e-6  # the LayerNorm before the MLP (diffusers' DiT conversion uses 1e-5)
    attn_norm_eps: float = 1e-6  # the LayerNorm before the self-attention
    adaln: str = "zero"  # "zero": DiT's per-block adaLN-Zero MLPs; "single": PixArt's shared adaLN-single
    caption_dim: int = 0  # width of the text token states cross-attended to (0: no text, DiT)
    micro_conditions: bool = False  # PixArt's resolution and aspect-ratio embeddings (its 1024 px models)
    freq_shift: int = 1  # the timestep sinusoid's downscale_freq_shift: 1 in diffusers' DiT, 0 in PixArt
    pos_scale: float = 1.0  # positions divided by this (diffusers' interpolation_scale: 2 at 1024 px)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


_PIXART = {"num_classes": 0, "adaln": "single", "freq_shift": 0}
DIT_PRESETS: dict[str, DiTConfig] = {
    "XL/2": DiTConfig(),
    "B/2": DiTConfig(width=768, layers=12, heads=12, mlp_dim=3072),
    "S/2": DiTConfig(width=384, layers=12, heads=6, mlp_dim=1536),
    # PixArt-alpha XL/2 at 1024 px (128x128 latents, T5-XXL token states, micro-conditions) and 512 px
    "PixArt-XL/2-1024": DiTConfig(sample_size=128, caption_dim=4096, micro_conditions=True, pos_scale=2.0,
                                  **_PIXART),
    "PixArt-XL/2-512": DiTConfig(sample_size=64, caption_dim=4096, **_PIXART),
    # the shapes world: 16x16x4 latents of the shipped f=4 autoencoder, 64 tokens; eps only (`--learn-sigma`
    # trains IDDPM's variance half, which the dit/pixart samplers do not use yet); sized for a 90-minute run on one
    # CPU thread (about 1.9M parameters, ~1 s per step of 32)
    "shapes_s": DiTConfig(sample_size=16, width=128, layers=6, heads=2, mlp_dim=512, num_classes=40,
                          learn_sigma=False),
    "pixart_shapes_s": DiTConfig(sample_size=16, width=128, layers=6, heads=2, mlp_dim=512, caption_dim=384,
                                 learn_sigma=False, **_PIXART),
    # test-sized: 8x8 latents, 16 tokens
    "tiny": DiTConfig(sample_size=8, width=32, layers=2, heads=2, mlp_dim=128, num_classes=8),
    "pixart_tiny": DiTConfig(sample_size=8, width=48, layers=2, heads=2, mlp_dim=192, caption_dim=32, **_PIXART),
}


def sincos_2d(width: int, grid_h: int, grid_w: int, base_size: int, scale: float = 1.0) -> torch.Tensor:
    """The fixed 2D sin-cos position embedding (MAE's, which DiT and PixArt use), (grid_h * grid_w, width)
    float32, tokens row-major. Half the width encodes the column, half the row, each as [sin | cos] of
    pos * 10000^(-k / (width / 4)); positions are scaled so a grid of `base_size` spans 0..base_size - 1
    (diffusers' PatchEmbed at another size), then divided by `scale` (its interpolation_scale).
    Computed in float64."""
    if width % 4:
        raise ValueError(f"a 2D sin-cos embedding needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (W/4,)

    def embed(pos: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, W/2)
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows = torch.arange(grid_h, dtype=torch.float64) / (grid_h / base_size) / scale
    cols = torch.arange(grid_w, dtype=torch.float64) / (grid_w / base_size) / scale
    r, c = torch.meshgrid(rows, cols, indexing="ij")  # (gh, gw) each
    return torch.cat([embed(c.reshape(-1)), embed(r.reshape(-1))], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) normalised elsewhere, shift/scale (B, 1, D) -> x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """One block (DiT Fig. 3; PixArt Fig. 4): self-attention and MLP branches on LayerNorm'd tokens
    modulated by the conditioning, each branch scaled by its gate before the residual add; with text,
    a plain cross-attention branch between them."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.width
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.attn_norm_eps)
        self.attn = Attention(d, cfg.heads, qkv_bias=True)
        # the caption projection maps the text to the width first, so keys/values are width wide
        self.cross_attn = Attention(d, cfg.heads, context_dim=d, qkv_bias=True) if cfg.caption_dim else None
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.mlp_norm_eps)
        self.mlp = MLP(d, cfg.mlp_dim, "gelu_tanh")  # DiT's GELU is the tanh approximation
        self.single = cfg.adaln == "single"
        if self.single:  # PixArt: the block's own shifts/scales/gates, added to the shared modulation
            self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)
        else:
            self.ada = nn.Linear(d, 6 * d)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) tokens; c: (B, D) conditioning (adaLN-Zero) or (B, 6D) the shared modulation
        (adaLN-single); context: (B, T, D) projected text, mask (B, T) True on real tokens -> (B, N, D)."""
        if self.single:
            mod = self.scale_shift_table[None] + c.unflatten(1, (6, -1))  # (B, 6, D)
        else:
            mod = self.ada(F.silu(c)).unflatten(1, (6, -1))  # (B, 6, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=1)  # each (B, 1, D)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, mask)  # PixArt: un-normalised queries, no gate
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class DiT(nn.Module):
    """eps (and variance values) of latents x_t: forward(x (B, C, H, W), t (B,), class_labels (B,) long,
    context (B, T, caption_dim), mask (B, T) bool, resolution (B, 2) pixels (h, w), aspect_ratio (B, 1)
    h / w) -> (B, C_out, H, W), each conditioning input required exactly when the config has it.
    H and W must be multiples of patch_size."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"heads={cfg.heads} does not divide width={cfg.width}")
        if cfg.adaln not in ADALN:
            raise ValueError(f"adaln must be one of {ADALN}, got {cfg.adaln!r}")
        if cfg.micro_conditions and cfg.width % 3:
            raise ValueError(f"micro-conditions embed h, w and h/w in thirds of the width; {cfg.width} is not 3k")
        self.cfg = cfg
        d, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, p, stride=p)
        self.time_proj = SinusoidalEmbedding(FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=cfg.freq_shift)
        self.t_embed = TimestepEmbedding(FREQ_DIM, d)
        self.class_embed = nn.Embedding(cfg.num_classes + int(cfg.null_class), d) if cfg.num_classes else None
        if cfg.micro_conditions:  # PixArt-alpha's 1024 px models: sec. 2.3 / its PixArtMS
            self.micro_proj = SinusoidalEmbedding(FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.size_embed = TimestepEmbedding(FREQ_DIM, d // 3)  # h and w, each
            self.aspect_embed = TimestepEmbedding(FREQ_DIM, d // 3)
        if cfg.caption_dim:  # PixArt's caption embedder: Linear-GELU(tanh)-Linear to the width
            self.caption_proj = nn.Sequential(nn.Linear(cfg.caption_dim, d), nn.GELU(approximate="tanh"),
                                              nn.Linear(d, d))
        if cfg.adaln == "single":
            self.t_block = nn.Linear(d, 6 * d)  # the one modulation MLP (after a SiLU) every block shares
            self.final_table = nn.Parameter(torch.randn(2, d) / d**0.5)  # the final layer's shift, scale
        else:
            self.final_ada = nn.Linear(d, 2 * d)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.layers))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(d, p * p * cfg.out_channels)
        self._pos: dict[tuple[int, int], torch.Tensor] = {}  # per token grid; fixed, not in the state dict
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's and PixArt's `initialize_weights`: Xavier-uniform linear layers with zero biases (the
        patch embedding as a linear map too), N(0, 0.02) embeddings; zero adaLN-Zero MLPs, cross-attention
        output projections and final layer, so that a new network starts from blocks that pass their
        input through and an output of zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.cfg.width, -1))
        nn.init.zeros_(self.patch_embed.bias)
        normal = [self.t_embed.linear_1, self.t_embed.linear_2]
        if self.class_embed is not None:
            normal.append(self.class_embed)
        if self.cfg.caption_dim:
            normal += [self.caption_proj[0], self.caption_proj[2]]
        if self.cfg.adaln == "single":
            normal.append(self.t_block)
        for m in normal:
            nn.init.normal_(m.weight, std=0.02)
        zero = [self.proj_out] + ([] if self.cfg.adaln == "single" else [self.final_ada])
        for block in self.blocks:
            zero += [] if block.single else [block.ada]
            zero += [] if block.cross_attn is None else [block.cross_attn.to_out[0]]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        """The class id of the unconditional branch."""
        if not self.cfg.num_classes or not self.cfg.null_class:
            raise ValueError("this DiT has no null class, so it cannot be guided by class")
        return self.cfg.num_classes

    def position_embedding(self, gh: int, gw: int, like: torch.Tensor) -> torch.Tensor:
        if (gh, gw) not in self._pos:
            base = self.cfg.sample_size // self.cfg.patch_size
            self._pos[(gh, gw)] = sincos_2d(self.cfg.width, gh, gw, base, self.cfg.pos_scale)
        return self._pos[(gh, gw)].to(like.device, like.dtype)

    def conditioning(self, t: torch.Tensor, dtype: torch.dtype, class_labels: torch.Tensor | None = None,
                     resolution: torch.Tensor | None = None, aspect_ratio: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """c = MLP(sinusoid(t)) [+ embedding(class)] [+ [MLP(sin(h)), MLP(sin(w)), MLP(sin(h/w))]], (B, D)."""
        c = self.t_embed(self.time_proj(t).to(dtype))  # (B, D)
        b = c.shape[0]
        if self.class_embed is not None:
            if class_labels is None:
                raise ValueError("this DiT is class-conditional: give class_labels")
            c = c + self.class_embed(class_labels.reshape(-1).expand(b))
        if self.cfg.micro_conditions:
            if resolution is None or aspect_ratio is None:
                raise ValueError("this network embeds the image size: give resolution and aspect_ratio")
            size = self.size_embed(self.micro_proj(resolution.reshape(-1)).to(dtype)).reshape(b, -1)  # (B, 2D/3)
            aspect = self.aspect_embed(self.micro_proj(aspect_ratio.reshape(-1)).to(dtype))  # (B, D/3)
            c = c + torch.cat([size, aspect], dim=1)
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None, *,
                context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                resolution: torch.Tensor | None = None, aspect_ratio: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, gh * gw, D)
        tokens = tokens + self.position_embedding(gh, gw, tokens)
        c = self.conditioning(t, tokens.dtype, class_labels, resolution, aspect_ratio)  # (B, D)
        if self.cfg.caption_dim:
            if context is None:
                raise ValueError("this network cross-attends to text: give context")
            context = self.caption_proj(context)  # (B, T, D)
        single = self.cfg.adaln == "single"
        block_c = self.t_block(F.silu(c)) if single else c  # (B, 6D) shared modulation, or (B, D)
        for block in self.blocks:
            tokens = block(tokens, block_c, context, mask)
        if single:
            shift, scale = (self.final_table[None] + c[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        else:
            shift, scale = self.final_ada(F.silu(c)).unflatten(1, (2, -1)).chunk(2, dim=1)  # (B, 1, D) each
        out = self.proj_out(modulate(self.norm_out(tokens), shift, scale))  # (B, N, p * p * C_out)
        out = out.reshape(b, gh, gw, p, p, self.cfg.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, self.cfg.out_channels, h, w)
