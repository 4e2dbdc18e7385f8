"""A reduced-precision network run by float32 samplers: the inputs cast on the way in."""

from __future__ import annotations

import torch
from torch import nn


class CastInputs(nn.Module):
    """Runs a reduced-precision network (bf16 weights) on float32 samplers: floating inputs are cast
    to the weights' dtype on the way in; the denoiser casts the output back to float32."""

    def __init__(self, net: nn.Module, weights: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net
        self.dtype = next((weights or net).parameters()).dtype

    @classmethod
    def around(cls, net: nn.Module, weights: nn.Module | None = None) -> nn.Module:
        """`net` itself when its weights (`weights`: the module holding them, if `net` wraps it) are
        float32, else a CastInputs around it."""
        dtype = next((weights or net).parameters()).dtype
        return net if dtype == torch.float32 else cls(net, weights)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        cond = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in cond.items()}
        return self.net(x.to(self.dtype), t, **cond)
