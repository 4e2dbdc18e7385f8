"""`Conv2d`: `nn.Conv2d` with an im2col + GEMM inference path for small, wide feature maps.

Every convolution of the residual blocks and the resamplers is this class, so the SD U-Net's
narrow levels take the fast path without the model files knowing about it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, same state dict) with a faster inference path for small maps.

    On small feature maps (the SD U-Net's 1280-channel levels at 4x4 and 8x8 latents for a 256 px
    image) PyTorch's oneDNN convolution runs far below the machine's GEMM rate; unfolding the
    input (im2col) and doing one GEMM with the weight as stored is faster there and slower on
    larger maps (timings: docs/notes/nets_measurements.md). So: the GEMM when there are at most
    `SMALL_MAP` output pixels, at least `WIDE_INPUT` inputs per output (C_in * kh * kw; the win
    comes from wide layers, and narrow ones keep the library's exact rounding) and autograd is
    off; the library convolution otherwise. Results agree to float rounding (summation order).
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
        # one GEMM over the batch's pixels: (B*H'W', C_in*kh*kw) @ weight^T. The weight is read as
        # stored; a batched matmul would broadcast it to (B, C_out, C_in*kh*kw) and copy it, which
        # cost more than the GEMM itself in the SD U-Net in bf16 (session 14: 10.5 against 11.0 s a step, one thread)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        weight = self.weight.flatten(1).t()
        out = rows @ weight if self.bias is None else torch.addmm(self.bias, rows, weight)  # (B*H'W', C_out)
        return out.view(b, ho * wo, -1).transpose(1, 2).reshape(b, -1, ho, wo)
