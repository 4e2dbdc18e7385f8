"""CLIP guidance (GLIDE, Nichol et al. 2021, sec. 2.4) as a denoiser wrapper.

GLIDE replaces the classifier of classifier guidance by a CLIP model: the reverse step's mean moves along the
gradient of the image-caption similarity,

    mu'(x_t | c) = mu(x_t | c) + s Sigma(x_t | c) grad_{x_t} (f(x_t, t) . g(c)),

where f is a *noise-aware* CLIP image encoder (trained on noised images x_t at the diffusion model's timesteps,
`t2i.nets.glide_clip`) and g the CLIP text encoder, both unit-normalised (GLIDE's `image_embeddings` /
`text_embeddings`). That is ADM's classifier guidance with log p(y | x_t) replaced by f(x_t, t) . g(c), so the
wrapper is `ClassifierGuidance` (`t2i.diffusion.classifier_guidance`, the same move of the x0 estimate,
s sigma^2 grad_x, for every sampler) with the gradient of the dot product in place of the log-probability's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from t2i.diffusion.classifier_guidance import ClassifierGuidance, Denoiser


def clip_similarity_grad(image_encoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_vp: torch.Tensor,
                         t: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """grad_{x_vp} of f(x_vp, t) . g(c), (B, C, H, W) float32, one backward pass for the batch (each row's
    similarity depends on its own input only).

    Args:
        image_encoder: (B, C, H, W) VP images, (B,) timesteps -> (B, E) image embeddings.
        text_embeds: (B, E) the caption embedding each row is guided towards.
    """
    with torch.enable_grad():
        x_in = x_vp.detach().float().requires_grad_(True)
        similarity = (image_encoder(x_in, t).float() * text_embeds.to(x_in.device).float()).sum()
        (grad,) = torch.autograd.grad(similarity, x_in)
    return grad


class ClipGuidance(ClassifierGuidance):
    """``D'(x, sigma, **cond) = D(x, sigma, **cond) + scale * sigma^2 * grad_x (f(x_vp, t) . g(c))``.

    Args:
        denoiser: the denoiser to guide (a DiscreteDenoiser, or CFG around one).
        image_encoder: ``f(x_vp (B, C, H, W), t (B,)) -> (B, E)`` unit-norm embeddings of noised images of the
            diffusion model's schedule (`t2i.nets.glide_clip.NoisyCLIP.encode_noisy`).
        text_embeds: (B, E) unit-norm CLIP embeddings of each row's caption.
        scale: GLIDE's s (0 disables the guidance and its cost).
        sigma_to_t: noise levels (B,) -> the encoder's timesteps (B,) (the inner DiscreteDenoiser's).
    """

    def __init__(self, denoiser: Denoiser, image_encoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 text_embeds: torch.Tensor, scale: float, sigma_to_t: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(denoiser, image_encoder, text_embeds, scale, sigma_to_t)

    def log_prob_grad(self, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The similarity's gradient where the classifier's log-probability's was (`self.labels`: the text
        embeddings)."""
        return clip_similarity_grad(self.classifier, x_vp, t, self.labels)


@dataclass
class ClipGuide:
    """A noise-aware CLIP file's content as a guide (`t2i.systems.guide_files.GuideFiles`): it steers any caption
    towards itself, so every prompt is one it can take (a classifier's guide takes only its class names).

    clip: `t2i.nets.glide_clip.NoisyCLIP` (anything with `encode_noisy(x_vp, t)` and `embed_texts(texts)`)."""

    clip: Any

    def check_prompt(self, prompt: str) -> None:
        """Every caption can be guided towards."""

    def around(self, denoiser: Denoiser, sigma_to_t: Callable[[torch.Tensor], torch.Tensor], prompts: list[str],
               scale: float) -> ClipGuidance:
        """GLIDE's guidance at scale s towards each image's caption (prompts: one per batch row)."""
        return ClipGuidance(denoiser, self.clip.encode_noisy, self.clip.embed_texts(prompts), scale, sigma_to_t)
