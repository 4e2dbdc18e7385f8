"""Level blocks: one resolution level of a U-Net or autoencoder (down, up, middle).

They take already built sub-modules, so the model files decide what goes in a level and these
classes only decide the data flow (which skip goes where, when to resample).
"""

from __future__ import annotations

import torch
from torch import nn


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
