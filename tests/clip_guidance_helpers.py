"""What the CLIP-guidance tests of GLIDE and DDPM share: eight shapes prompts and the shipped shapes CLIP's
similarity of each final image to its prompt."""

from __future__ import annotations

import torch

from t2i.eval.shapes_clip import ShapesCLIP

PROMPTS = ["a red circle", "a blue square on a white background", "two green triangles", "a small purple circle",
           "a yellow star on a black background", "three red squares", "a large orange triangle",
           "a blue circle above a green square"]


def clip_scores(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosine similarity of each final image (N, 3, H, W) in [-1, 1] with its prompt under the (clean) shipped
    shapes CLIP, (N,)."""
    clip = ShapesCLIP.load()
    with torch.no_grad():
        img = clip.encode_images(torch.nn.functional.interpolate(images.clamp(-1, 1), (64, 64), mode="bilinear"))
        return (img * clip.embed_texts(prompts)).sum(-1)
