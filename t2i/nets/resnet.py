"""The residual block of every U-Net and autoencoder: GroupNorm-SiLU-conv twice, with a skip.

The time embedding enters either added before the second norm (SD, DDPM) or as a scale and
shift after it (ADM/Imagen "FiLM"); blocks without one serve the autoencoders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.conv import Conv2d


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
        # block (what that did to peak memory: docs/notes/nets_measurements.md).
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
