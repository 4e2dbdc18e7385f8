"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", sec. 4) as a denoiser wrapper.

ADM's Algorithm 1 moves the ancestral step's mean by ``s Sigma grad_{x_t} log p_phi(y | x_t)``; its
Algorithm 2 (DDIM) moves the noise prediction instead, ``eps' = eps - sqrt(1 - abar) s grad log p``,
which is the score-based form of the same idea and works for every sampler. In the denoiser contract
(VE x = x_vp / sqrt(abar), sigma^2 = (1 - abar) / abar, D = x - sigma eps) that eps shift is

    D'(x, sigma) = D(x, sigma) + s sigma sqrt(1 - abar) grad_{x_vp} log p(y | x_vp, t)
                 = D(x, sigma) + s sigma^2 grad_x log p(y | x_vp(x), t),

(x0 = x + sigma^2 score, Tweedie's formula, with the classifier's score added), so the wrapper needs
only the classifier's gradient with respect to its own input x. It composes with classifier-free
guidance: wrap the CFG denoiser, and both apply (GLIDE compares the two, sec. 3).

Under an ancestral DDPM step this moves the (VP) mean by beta_t / sqrt(alpha_t) * s * grad_{x_vp} log p
(the posterior's x0 coefficient times the x0 shift), where Algorithm 1 moves it by Sigma_t * s * grad:
the same direction, with beta_t / sqrt(alpha_t) in place of Sigma_t in [beta~_t, beta_t] (equal up to
sqrt(alpha_t) for DDPM's fixed-large variance, within beta~_t / beta_t of it otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from t2i.diffusion.denoiser import broadcast_sigma

Denoiser = Callable[..., torch.Tensor]


def classifier_log_prob_grad(classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_vp: torch.Tensor,
                             t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """grad_{x_vp} log softmax(classifier(x_vp, t))[y], (B, C, H, W) float32, one backward pass for the
    batch (each row's log-probability depends on its own input only).

    Args:
        classifier: logits (B, K) of VP inputs (B, C, H, W) at timesteps t (B,).
        labels: (B,) the wanted class of each row.
    """
    with torch.enable_grad():
        x_in = x_vp.detach().float().requires_grad_(True)
        log_probs = torch.log_softmax(classifier(x_in, t).float(), dim=-1)  # (B, K)
        picked = log_probs[torch.arange(x_in.shape[0], device=x_in.device), labels.to(x_in.device)]
        (grad,) = torch.autograd.grad(picked.sum(), x_in)
    return grad


class ClassifierGuidance(nn.Module):
    """``D'(x, sigma, **cond) = D(x, sigma, **cond) + scale * sigma^2 * grad_x log p(y | x_vp, t)``.

    Args:
        denoiser: the denoiser to guide (a DiscreteDenoiser, or CFG around one).
        classifier: ``classifier(x_vp (B, C, H, W), t (B,)) -> logits (B, K)``, trained on noised
            images of the same schedule (`t2i.nets.classifier.NoisyClassifier`).
        labels: (B,) the class each image of the batch is guided towards.
        scale: ADM's s (0 disables the guidance and its cost).
        sigma_to_t: noise levels (B,) -> the classifier's timesteps (B,), e.g. the inner
            DiscreteDenoiser's ``sigma_to_t`` so that it sees the run's own timesteps.
    """

    def __init__(self, denoiser: Denoiser, classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 labels: torch.Tensor, scale: float, sigma_to_t: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.inner, self.classifier = denoiser, classifier
        self.labels, self.scale, self.sigma_to_t = labels, scale, sigma_to_t

    def log_prob_grad(self, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_{x_vp} of the log-density the guidance climbs, (B, C, H, W) float32: here log p(y | x_vp, t);
        a subclass climbs another (GLIDE's CLIP guidance, `t2i.diffusion.clip_guidance`)."""
        return classifier_log_prob_grad(self.classifier, x_vp, t, self.labels)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        """x: (B, C, H, W) VE samples at sigma (() or (B,)); cond: the inner denoiser's arguments.
        Returns the guided (B, C, H, W) x0 estimate."""
        denoised = self.inner(x, sigma, **cond)
        if self.scale == 0:
            return denoised
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma  # (B,)
        s = broadcast_sigma(sigma, x)  # (B, 1, 1, 1)
        root = (s**2 + 1) ** 0.5
        grad_vp = self.log_prob_grad(x.float() / root, self.sigma_to_t(sigma).to(x.device))  # (B, C, H, W)
        # grad_x = grad_{x_vp} / sqrt(1 + sigma^2), the chain rule through x_vp = x / sqrt(1 + sigma^2)
        return denoised + self.scale * s**2 * (grad_vp / root)
