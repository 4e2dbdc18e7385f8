"""Convolutional and transformer building blocks shared by the U-Nets and autoencoders.

The SD U-Net, the SD KL autoencoder and the later pixel-space U-Nets (GLIDE, Imagen) are
all made of the same few pieces: a sinusoidal timestep embedding and its MLP, a
GroupNorm-SiLU-conv residual block, strided-conv downsampling, nearest-neighbour
upsampling, and a "spatial transformer" that runs self-attention, cross-attention to the
text tokens and a GEGLU feed-forward over the pixels of a feature map (Rombach et al.
2022, LDM, Sec. 3.3). Attribute names follow the diffusers layout (`norm1`, `conv1`,
`time_emb_proj`, `proj_in`, `transformer_blocks`, `ff.net.0.proj`, ...) so a diffusers
state dict loads with `strict=True`; the checkpoint layer adapts every other layout.

Level blocks (`DownBlock`, `UpBlock`, `MidBlock`) take already built sub-modules, so the
model files decide what goes in a level and these classes only decide the data flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.attention import Attention

# ---------------------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------------------


def sinusoidal_frequencies(
    dim: int, downscale_freq_shift: float = 0.0, max_period: float = 10000.0
) -> torch.Tensor:
    """The dim // 2 angular frequencies of the sinusoidal embedding, (dim // 2,) float32.

    freq_i = max_period ** (-i / (dim // 2 - downscale_freq_shift)), the DDPM/"Attention is
    all you need" geometric ladder; shift 1 is the original DDPM spacing, 0 the LDM one.
    """
    half = dim // 2
    # An explicit CPU device: modules built under `torch.device("meta")` (fast loading) still get
    # a real table, since it is not in the state dict and nothing would fill it later.
    steps = torch.arange(half, dtype=torch.float32, device="cpu")
    exponent = -math.log(max_period) * steps / (half - downscale_freq_shift)
    return torch.exp(exponent)


def _embed_with(t: torch.Tensor, freqs: torch.Tensor, dim: int, flip_sin_to_cos: bool) -> torch.Tensor:
    """t: (B,) -> (B, dim) [sin | cos] (or [cos | sin]) of t * freqs, zero-padded if dim is odd."""
    args = t[:, None].float() * freqs[None, :]  # (B, dim // 2)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2 * (dim // 2))
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, t: (B,) -> (B, dim) float32.

    SD uses flip_sin_to_cos=True (cos first) and shift 0. Modules that embed every step
    should hold a `SinusoidalEmbedding`, which precomputes the frequencies once.
    """
    freqs = sinusoidal_frequencies(dim, downscale_freq_shift, max_period).to(t.device)
    return _embed_with(t, freqs, dim, flip_sin_to_cos)


class SinusoidalEmbedding(nn.Module):
    """`timestep_embedding` with the frequency table built once. No parameters, nothing in
    the state dict.

    The table is a plain tensor attribute rather than a buffer on purpose: it must stay
    float32 when the model is cast to fp16/bf16 (at t ~ 1000 a half-precision table would
    be off by about a radian); it follows the device of the timesteps instead.
    """

    def __init__(
        self,
        dim: int,
        flip_sin_to_cos: bool = True,
        downscale_freq_shift: float = 0.0,
        max_period: float = 10000.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freqs = sinusoidal_frequencies(dim, downscale_freq_shift, max_period)  # (dim // 2,) float32

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) timesteps (float or int) -> (B, dim) float32."""
        if self.freqs.device != t.device:
            self.freqs = self.freqs.to(t.device)
        return _embed_with(t, self.freqs, self.dim, self.flip_sin_to_cos)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal embedding: Linear-SiLU-Linear, (B, in_dim) -> (B, dim)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(emb)))


# ---------------------------------------------------------------------------------------
# Convolutional blocks
# ---------------------------------------------------------------------------------------


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, same state dict) with a faster inference path for small maps.

    On small feature maps (the SD U-Net's 1280-channel levels at 4x4 and 8x8 latents for a 256 px
    image) PyTorch's oneDNN convolution runs far below the machine's GEMM rate; unfolding the
    input (im2col) and doing one GEMM with the weight as stored was 2-3x faster there (single
    thread, fp32, AVX2: 1280 ch at 4x4 64 -> 22 ms, at 8x8 127 -> 72 ms) and slower from 16x16 up
    (640 ch: 49 -> 63 ms). So: the GEMM when there are at most `SMALL_MAP` output pixels, at
    least `WIDE_INPUT` inputs per output (C_in * kh * kw; the win comes from wide layers, and
    narrow ones keep the library's exact rounding) and autograd is off; the library convolution
    otherwise. Results agree to float rounding (summation order).
    """

    SMALL_MAP = 64
    WIDE_INPUT = 4096

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H', W')."""
        if (torch.is_grad_enabled() or self.groups != 1 or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or self.kernel_size == (1, 1) or x.dim() != 4):
            return super().forward(x)
        b, _, h, w = x.shape
        (kh, kw), (ph, pw), (sh, sw), (dh, dw) = self.kernel_size, self.padding, self.stride, self.dilation
        ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if ho * wo > self.SMALL_MAP or x.shape[1] * kh * kw < self.WIDE_INPUT:
            return super().forward(x)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C_in*kh*kw, H'W')
        out = torch.matmul(self.weight.flatten(1), cols)  # (B, C_out, H'W')
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(b, -1, ho, wo)


class ResBlock(nn.Module):
    """Residual block: GroupNorm-SiLU-conv3x3, (+ time embedding), GroupNorm-SiLU-dropout-conv3x3.

    Args:
        in_channels, out_channels: feature widths (out defaults to in).
        temb_dim: width of the time embedding added after the first conv; None for a block
            without one (autoencoders).
        groups, eps: GroupNorm settings (SD U-Net: 32, 1e-5; SD VAE: 32, 1e-6).
        dropout: dropout probability before the second conv.
        shortcut_kernel: kernel of the shortcut conv used when the widths differ (1 in SD;
            3 is the "use_conv" skip of the original DDPM/ADM code).
        scale_shift: if True the time embedding predicts (scale, shift) applied after the
            second norm, h = norm(h) * (1 + scale) + shift (ADM/Imagen "FiLM"); if False it
            is added before the norm (SD).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_dim: int | None = None,
        groups: int = 32,
        eps: float = 1e-5,
        dropout: float = 0.0,
        shortcut_kernel: int = 1,
        scale_shift: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None
        if temb_dim is not None:
            self.time_emb_proj = nn.Linear(temb_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, shortcut_kernel, padding=shortcut_kernel // 2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C_in, H, W); temb: (B, temb_dim) or None -> (B, C_out, H, W)."""
        # Without an autograd graph (sampling, decoding) the activations overwrite the fresh norm
        # outputs and the residual adds into the conv output: two fewer full-size temporaries per
        # block (the 512x512 decode's peak, set elsewhere, did not move: README "CPU speed").
        in_place = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=in_place))  # (B, C_out, H, W)
        t = None
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.scale_shift and t is not None:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h if t is None else h + t)
        h = self.conv2(self.dropout(F.silu(h, inplace=in_place)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        # (not under autocast, where a bf16 h + a float32 skip promotes to float32)
        return h.add_(skip) if in_place and h.dtype == skip.dtype else skip + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (or 2x2 average pooling if use_conv=False).

    padding=1 pads symmetrically (U-Net); padding=0 pads one pixel on the right and bottom
    only (the SD VAE encoder, which inherited it from the LDM/taming code).
    """

    def __init__(
        self, channels: int, out_channels: int | None = None, use_conv: bool = True, padding: int = 1
    ) -> None:
        super().__init__()
        self.padding = padding
        if use_conv:
            self.conv: nn.Module = Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)
        else:
            self.conv = nn.AvgPool2d(2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C_out, H', W'): H' = ceil(H / 2) with padding=1, floor(H / 2)
        with padding=0 or pooling (the same for even sizes)."""
        if self.padding == 0 and isinstance(self.conv, nn.Conv2d):
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def _phase_taps(k: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3x3 kernel's 3 taps along `dim` -> the 2 taps the even and the odd output phase of a
    nearest 2x upsampling apply to the original input: even (t0, t1 + t2), odd (t0 + t1, t2)."""
    t0, t1, t2 = k.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


def nearest2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)) (zero padding 1) without building the upsampled map.

    Each of the four output phases (even or odd row, even or odd column) sees only 2x2 distinct
    input pixels under the 3x3 kernel, so it is a 2x2 convolution of x with the kernel's taps summed
    accordingly: 4/9 of the multiply-adds, and no (B, C, 2H, 2W) copy of the input. Equal up to
    float summation order. x: (B, C, H, W); weight: (O, C, 3, 3) -> (B, O, 2H, 2W).
    """
    b_, _, h, w = x.shape
    out = x.new_empty(b_, weight.shape[0], 2 * h, 2 * w)
    # the tap sums in float32 at least, also for bf16 weights
    taps = weight.to(torch.promote_types(weight.dtype, torch.float32))
    for a, rows in enumerate(_phase_taps(taps, 2)):  # (O, C, 2, 3) each
        for b, kernel in enumerate(_phase_taps(rows, 3)):  # (O, C, 2, 2) each
            # padded so that pixel (i, j) of this phase reads input rows i-1+a, i+a and columns j-1+b, j+b
            out[:, :, a::2, b::2] = F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), kernel.to(x.dtype), bias)
    return out


class Upsample(nn.Module):
    """Double the resolution by nearest-neighbour interpolation, then a 3x3 conv (if use_conv).

    From `PHASE_MIN_PIXELS` input pixels up, the two run as one (`nearest2x_conv3x3`). Measured on
    one thread, fp32 (session 5): the upsamplers alone 0.49-0.69 of the plain time at 512 ch 64x64
    and 128x128, 256 ch 256x256, 640 ch 32x32 (batch 2), but 2x slower at 1280 ch 8x8, and the SD
    U-Net step at 256x256 got slower with it at 640 ch 16x16 (4.15-4.31 s against 4.07-4.14); the
    SD VAE decoder at 512x512, all three upsamplers on the phase path, took 28.3 s against
    diffusers' 34.1 s, without the upsampled copy that was its largest allocation.
    """

    PHASE_MIN_PIXELS = 1024

    def __init__(self, channels: int, out_channels: int | None = None, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C_out, 2H, 2W), or (B, C_out, *size) when the skip connection
        it must match has an odd size (size given)."""
        if size is None and self.conv is not None and x.shape[-2] * x.shape[-1] >= self.PHASE_MIN_PIXELS:
            return nearest2x_conv3x3(x, self.conv.weight, self.conv.bias)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return x if self.conv is None else self.conv(x)


# ---------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2 * dim_out, value * gelu(gate)."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim_out)."""
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, dim -> mult * dim -> dim. `net` is a ModuleList so the weights are
    `net.0.proj.*` and `net.2.*` (net.1 is the parameter-free dropout), as in the reference."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, GEGLU FF.

    Args:
        dim: token width. heads, head_dim: attention shape (heads * head_dim may differ from dim).
        context_dim: width of the context tokens (text encoder hidden states).
        only_cross_attention: the first attention also attends to the context instead of
            the pixels (a diffusers option; no SD checkpoint uses it).
        eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        only_cross_attention: bool = False,
        dropout: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        # attn1 is self-attention unless only_cross_attention, when it too reads the context.
        self.attn1 = Attention(dim, heads, head_dim, context_dim if only_cross_attention else None)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim); context: (B, T, context_dim) -> (B, N, dim)."""
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on context tokens (LDM Sec. 3.3).

    GroupNorm, proj_in (1x1 conv in SD1, a Linear on tokens in SD2/SDXL), `depth`
    TransformerBlocks, proj_out, plus a residual around the whole thing.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,
        linear_projection: bool = False,
        only_cross_attention: bool = False,
        groups: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, only_cross_attention, dropout)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, T, context_dim) -> (B, C, H, W)."""
        if context is None:
            raise ValueError("SpatialTransformer needs context tokens (B, T, context_dim)")
        b, _, h, w = x.shape
        y = self.norm(x)
        if self.linear_projection:
            y = self.proj_in(y.flatten(2).transpose(1, 2))  # (B, HW, inner)
        else:
            y = self.proj_in(y).flatten(2).transpose(1, 2)  # (B, HW, inner)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_projection:
            y = self.proj_out(y).transpose(1, 2).reshape(b, -1, h, w)  # (B, C, H, W)
        else:
            y = self.proj_out(y.transpose(1, 2).reshape(b, -1, h, w))  # (B, C, H, W)
        return x + y


class SpatialSelfAttention(Attention):
    """Single-head-by-default self-attention over the pixels of a feature map, with a
    GroupNorm in front and a residual around it (the SD VAE mid-block attention).

    Subclasses `Attention` so the parameters sit flat next to the projections
    (`group_norm.*`, `to_q.*`, ..., `to_out.0.*`), as in the reference layout.
    """

    def __init__(self, channels: int, heads: int = 1, groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__(channels, heads, channels // heads, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W). `context` is accepted (and must be None) so level
        blocks can call every spatial attention the same way."""
        if context is not None:
            raise ValueError("SpatialSelfAttention is self-attention only")
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        out = super().forward(tokens)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------
# Level blocks: a resolution level of a U-Net or autoencoder
# ---------------------------------------------------------------------------------------


def _paired_attentions(resnets: list[nn.Module], attentions: list[nn.Module] | None) -> nn.ModuleList | None:
    """One attention per ResBlock (as a ModuleList), or None for a level without attention."""
    if attentions is None:
        return None
    if len(attentions) != len(resnets):
        raise ValueError(f"a level needs one attention per ResBlock: {len(attentions)} for {len(resnets)}")
    return nn.ModuleList(attentions)


class DownBlock(nn.Module):
    """One encoder level: [ResBlock (-> spatial attention)] * n, then an optional Downsample.

    Args:
        resnets: the n residual blocks. attentions: n spatial attention modules (called as
            `attn(x, context)`) or None for a level without attention. downsample: the
            Downsample module or None on the last level.
    """

    def __init__(
        self,
        resnets: list[nn.Module],
        attentions: list[nn.Module] | None = None,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = _paired_attentions(resnets, attentions)
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, C_in, H, W) -> (out, skips): out (B, C, H', W'); skips: the feature map after
        each ResBlock(+attention) and after the Downsample, for the U-Net's up path."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One decoder level: [concat skip -> ResBlock (-> spatial attention)] * n, then an optional
    Upsample. Without skips (autoencoder decoder) the ResBlocks just run in sequence."""

    def __init__(
        self,
        resnets: list[nn.Module],
        attentions: list[nn.Module] | None = None,
        upsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = _paired_attentions(resnets, attentions)
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor] | None = None,
        temb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W); skips: the encoder features for this level, consumed last-first (one
        per ResBlock, concatenated on channels); upsample_size: target (H', W') of the Upsample
        when it is not exactly 2x (odd sizes). Returns (B, C_out, H', W')."""
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock(nn.Module):
    """The bottleneck: ResBlock, then [spatial attention, ResBlock] per attention module (one
    attention in SD). With attentions=None the ResBlocks just run in sequence (the VAE mid
    block without attention keeps both of its ResBlocks; diffusers' `UNetMidBlock2D` has one)."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None = None) -> None:
        super().__init__()
        if attentions is not None and len(resnets) != len(attentions) + 1:
            raise ValueError("a MidBlock needs one more ResBlock than attentions")
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        x = self.resnets[0](x, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            x = resnet(x, temb)
        return x
