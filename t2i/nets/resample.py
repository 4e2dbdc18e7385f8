"""Changing resolution between levels: strided-conv (or pooled) downsampling, nearest-neighbour
upsampling followed by a 3x3 conv, and the fused form of the latter that never builds the
upsampled map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.conv import Conv2d


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

    From `PHASE_MIN_PIXELS` input pixels up, the two run as one (`nearest2x_conv3x3`): on large
    maps it is faster and drops the upsampled copy (the SD VAE decoder's largest allocation); on
    small, wide maps (1280 ch at 8x8, 640 ch at 16x16) the plain path is faster, hence the
    threshold (timings: docs/notes/nets_measurements.md).
    """

    PHASE_MIN_PIXELS = 1024

    def __init__(self, channels: int, out_channels: int | None = None, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C_out, 2H, 2W), or (B, C_out, *size) when the skip connection
        it must match has an odd size (size given)."""
        if (size is None and isinstance(self.conv, nn.Conv2d)  # not an int8 conv (t2i.quantize): no float kernel
                and x.shape[-2] * x.shape[-1] >= self.PHASE_MIN_PIXELS):
            return nearest2x_conv3x3(x, self.conv.weight, self.conv.bias)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return x if self.conv is None else self.conv(x)
