"""A U-Net that draws a given layout: LDM's layout-to-image conditioning by spatial maps (seed 003
3.4), with each box's phrase embedding painted into it.

Each object of the layout is a box (fractions of the canvas) and a phrase embedding (e.g. the
MiniLM mean of "a small red circle"). The phrase embedding is projected to a few channels and
painted into the box on an image-resolution grid, together with a coverage channel and the
pixel's coordinates inside the box (u, v in [-1, 1]), so that the network can draw the shape
relative to its box (a triangle's apex at the top-centre) without working out the box from its
edges. The grid is folded into the latent resolution by pixel-unshuffle (exact sub-latent box
edges survive) and added to the U-Net's first features by a convolution of their own.
The caption still reaches every attention layer as cross-attention context, for what is not
in a box (the background).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.unet import UNet, UNetConfig

# per object: x0, y0, x1, y1 (fractions of the canvas), valid flag, then the phrase embedding
BOX_FIELDS = 5


@dataclass
class LayoutConfig:
    """How a LayoutUNet reads its layout."""

    phrase_dim: int = 384  # width of the phrase embeddings
    phrase_channels: int = 8  # painted channels per pixel
    fold: int = 4  # image pixels per latent side: the maps are drawn at latent size * fold

    @property
    def map_channels(self) -> int:
        """Channels of the folded maps at latent resolution."""
        return (self.phrase_channels + 3) * self.fold * self.fold


def layout_maps(layout: torch.Tensor, proj: nn.Linear, height: int, width: int) -> torch.Tensor:
    """layout: (B, N, 5 + E) objects (box fractions x0, y0, x1, y1, valid, phrase embedding) ->
    (B, D + 3, height, width) maps: projected phrase (D), coverage, u, v; zero outside boxes.
    Overlapping boxes add up (the shapes world has none)."""
    out_dtype, layout = layout.dtype, layout.float()  # pixel centres exact at any size (not in bf16)
    box, valid, phrase = layout[..., :4], layout[..., 4], layout[..., BOX_FIELDS:]
    ys = (torch.arange(height, dtype=layout.dtype, device=layout.device) + 0.5) / height  # pixel centres
    xs = (torch.arange(width, dtype=layout.dtype, device=layout.device) + 0.5) / width
    x0, y0, x1, y1 = (box[..., i, None] for i in range(4))  # (B, N, 1)
    inside_x = (xs >= x0) & (xs < x1)  # (B, N, W)
    inside_y = (ys >= y0) & (ys < y1)  # (B, N, H)
    u = (2 * (xs - x0) / (x1 - x0).clamp_min(1e-6) - 1) * inside_x  # (B, N, W), -1..1 across the box
    v = (2 * (ys - y0) / (y1 - y0).clamp_min(1e-6) - 1) * inside_y  # (B, N, H)
    cover = (inside_y[..., :, None] & inside_x[..., None, :]).to(layout.dtype) * valid[..., None, None]
    feats = proj(phrase.to(out_dtype)).float()  # (B, N, D), projected in the network's own dtype
    painted = torch.einsum("bnhw,bnd->bdhw", cover, feats)
    coverage = cover.sum(1)
    u_map = torch.einsum("bnhw,bnw->bhw", cover, u)
    v_map = torch.einsum("bnhw,bnh->bhw", cover, v)
    return torch.cat([painted, coverage[:, None], u_map[:, None], v_map[:, None]], dim=1).to(out_dtype)


class LayoutUNet(UNet):
    """A UNet whose forward also takes `layout` (B, N, 5 + E): the folded maps go through their own
    3x3 convolution and are added to conv_in's output (zero-initialised, so a warm start from a
    text-only U-Net starts as that network). layout None, or all objects invalid, is the model
    without a layout (trained by layout dropout, for guidance)."""

    def __init__(self, cfg: UNetConfig, layout: LayoutConfig) -> None:
        super().__init__(cfg)
        self.layout_cfg = layout
        self.phrase_proj = nn.Linear(layout.phrase_dim, layout.phrase_channels)
        self.layout_in = nn.Conv2d(layout.map_channels, cfg.block_channels[0], 3, padding=1)
        nn.init.zeros_(self.layout_in.weight)
        nn.init.zeros_(self.layout_in.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,  # type: ignore[override]
                layout: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if layout is not None:
            h, w, f = x.shape[-2], x.shape[-1], self.layout_cfg.fold
            maps = F.pixel_unshuffle(layout_maps(layout.to(x.dtype), self.phrase_proj, h * f, w * f), f)
            kwargs["input_features"] = self.layout_in(maps)  # (B, C0, h, w)
        return super().forward(x, t, context, **kwargs)


def pack_layout(boxes: list[list[tuple[float, float, float, float]]], phrases: list[torch.Tensor],
                max_objects: int) -> torch.Tensor:
    """Per image: boxes (fractions) and their phrase embeddings (n_i, E) -> (B, max_objects, 5 + E),
    unused slots zero (invalid)."""
    e = phrases[0].shape[-1] if phrases else 0
    out = torch.zeros(len(boxes), max_objects, BOX_FIELDS + e)
    for i, (bx, ph) in enumerate(zip(boxes, phrases, strict=True)):
        n = len(bx)
        if n > max_objects:
            raise ValueError(f"{n} objects, at most {max_objects}")
        if n:
            out[i, :n, :4] = torch.tensor(bx, dtype=torch.float32)
            out[i, :n, 4] = 1.0
            out[i, :n, BOX_FIELDS:] = ph
    return out
