"""Classifier-free guidance on logits, as a wrapper around a token model (DESIGN principle 4).

A token model is any callable ``model(tokens (B, T) int64, cond) -> logits (B, T', V)``
(``t2i.tokens.autoregressive`` and ``t2i.tokens.masked`` say what T' is for each kind).
``CFGTokenModel`` turns it into a model of the same kind whose cond is a ``GuidedCond``
(the conditional and the unconditional branch), so the token samplers know nothing about
guidance, exactly as the diffusion samplers know nothing about ``CFGDenoiser``.

The mix is ``l_u + scale * (l_c - l_u)`` on the logits, as Parti (Yu et al. 2022, section
"Classifier-Free Guidance and Reranking"), Muse (Chang et al. 2023, section "Classifier Free
Guidance", written there as ``(1 + t) l_c - t l_u``, i.e. scale = 1 + t) and diffusers'
``AmusedPipeline`` do. DALL-E
mini's "super-conditioning" is the same formula (``logits_uncond + condition_scale *
(logits_cond - logits_uncond)``). Mixing log-probs instead gives the same distribution:
``log_softmax(l) = l - logsumexp(l)`` differs from l by one constant per position, the mix
carries over a constant, and softmax removes it. Logits are what we mix because they are
what the networks output and what diffusers compares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from t2i.diffusion.guidance import cat_cond

TokenModel = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class GuidedCond:
    """The conditioning of a guided token model: the prompt's and the unconditional one
    (empty prompt, or a negative prompt as Muse's negative prompting), each batched like the
    tokens (tensors, or mappings of tensors, with B rows)."""

    cond: Any
    uncond: Any


def guide_logits(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """``l_u + scale * (l_c - l_u)`` (any shape): scale 1 is the conditional model, 0 the
    unconditional one, > 1 pushes away from the unconditional distribution."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


class CFGTokenModel:
    """``model_cfg(tokens, GuidedCond(c, u)) = l_u + scale * (l_c - l_u)``.

    Both branches run in one call of batch 2B (unconditional rows first, as diffusers
    batches them). Scale 1, or uncond None, runs the conditional branch alone.

    Args:
        model: the token model to guide.
        scale: guidance scale (diffusers' ``AmusedPipeline`` defaults to 10).
    """

    def __init__(self, model: TokenModel, scale: float):
        self.inner = model
        self.scale = scale

    def __call__(self, tokens: torch.Tensor, cond: GuidedCond) -> torch.Tensor:
        """Args:
            tokens: (B, T) int64.
            cond: the two branches' conditioning, each with B rows.
        Returns:
            (B, T', V) guided logits, T' as the inner model's.
        """
        if cond.uncond is None or self.scale == 1:
            return self.inner(tokens, cond.cond)
        both = cat_cond(cond.uncond, cond.cond)
        uncond_logits, cond_logits = self.inner(torch.cat([tokens, tokens]), both).chunk(2)
        return guide_logits(cond_logits, uncond_logits, self.scale)
