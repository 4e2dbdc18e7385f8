"""A perceptual distance for the tokenizers' VQGAN objective, on the frozen shapes CLIP image tower.

VQGAN (Esser et al. 2021, sec. 3.1) adds LPIPS (Zhang et al. 2018) to the reconstruction loss:
distances between the activations of a pretrained VGG at several depths, each activation
unit-normalised over its channels. No pretrained VGG can be downloaded here. The network we do
have is the shapes CLIP's ViT image tower (`t2i.eval.shapes_clip`, shipped, frozen), and it is the
better choice for this world anyway:
- it was trained on exactly these images, contrastively against captions that name colours,
  shapes, sizes, counts and positions, so its features are sensitive to what the captions (and the
  judge) care about, where an ImageNet VGG would weigh textures these flat scenes lack;
- it reads 64x64 [-1, 1] images natively (8x8 patches), the tokenizers' own input, no resizing;
- ~0.8M parameters in the tower: cheap next to the decoder on one CPU core.

The distance is LPIPS's recipe without its learnt per-channel weights (which need human
judgements): for the patch tokens after the embedding and after each block, normalise each token's
feature vector to unit length; the distance is the squared difference summed over channels, averaged
over tokens and depths (LPIPS sums over depths; the mean keeps the weight independent of the depth).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.nets.vit import VisionTransformer


class CLIPPerceptual(nn.Module):
    """d(x, y) between images (B, 3, 64, 64) in [-1, 1] -> (B,) on a frozen ViT image tower.

    Not a trained part of any model: load it with `CLIPPerceptual.load()` and keep it out of state
    dicts (it is frozen and reloaded from the shipped CLIP)."""

    def __init__(self, vision: VisionTransformer) -> None:
        super().__init__()
        self.vision = vision.eval().requires_grad_(False)

    @classmethod
    def load(cls, path: str | None = None) -> CLIPPerceptual:
        """The shipped shapes CLIP's image tower (or the CLIP file at `path`)."""
        from t2i.eval.shapes_clip import ShapesCLIP

        return cls(ShapesCLIP.load(path).vision)

    def train(self, mode: bool = True) -> CLIPPerceptual:
        return super().train(False)  # always frozen, whatever the caller's mode

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 3, H, W) (resized to the tower's size if need be) -> per depth, the patch tokens
        (B, N, width), each unit-normalised over width."""
        v = self.vision
        size = v.cfg.image_size
        if x.shape[-2:] != (size, size):  # e.g. a 16 px smoke run: the tower's positions fix its size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        h = v.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = v.class_embedding.to(h.dtype).expand(h.shape[0], 1, -1)
        h = v.pre_norm(torch.cat([cls, h], 1) + v.position_embedding.weight)  # (B, 1 + N, D)
        feats = [F.normalize(h[:, 1:], dim=-1)]
        for layer in v.layers:
            h = layer(h)
            feats.append(F.normalize(h[:, 1:], dim=-1))
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) mean over depths and tokens of ||f(x) - f(y)||^2 (unit features: in [0, 4])."""
        per_depth = [(a - b).pow(2).sum(-1).mean(-1) for a, b in zip(self.features(x), self.features(y), strict=True)]
        return torch.stack(per_depth).mean(0)
